"""Training jobs from a YAML file: each job is one LoRA adapter with its own data, shape and schedule.
With `vlstack train --watch`, jobs added to the file while training runs join the run (PlanWatcher).

model: tiny                 # checkpoint directory, or "tiny"
max_rows: 16                # rows (examples) per fused step, all running jobs together
max_tokens: 4096            # optional: a step's rows go through the base in passes of at most this many
                            #   tokens, gradients adding up (the same adapters; one pass's activations at a time)
gradient_checkpointing: false  # recompute each LLM layer in backward: less memory, ~1/3 more compute
log_every: 1                # optimizer steps per metrics line (its loss: the mean since the last line); on a
                            #   GPU, more lets steps run without waiting to read the losses back
jobs:
  - name: finance
    data: finance.jsonl     # relative to the YAML file
    output: out/finance     # the PEFT adapter directory written at the end
    rank: 8
    alpha: 16
    dropout: 0.05
    rslora: false
    targets: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]
    parts: [language]       # and/or vision, projector
    lr: 2.0e-4
    weight_decay: 0.0
    schedule: cosine        # cosine | linear | constant, after warmup_steps of linear warm-up
    warmup_steps: 0
    batch_size: 4
    grad_accum: 1
    steps: 100              # optimizer steps; or epochs: 2
    max_len: 2048
    max_grad_norm: 1.0
    objective: sft          # sft | mpo | dpo | prm | distil (distil: with a teacher, below); prm trains a critic
                            #   on step-labelled answers (train/data.py); mpo and dpo learn from
                            #   preference pairs (data: {image, question, chosen, rejected} lines), the reference
                            #   being the base with the job's adapter off: train/preference.py
    # beta: 0.1             # mpo/dpo: the pull back to the reference
    # dpo_weight: 0.8       # mpo's mix (InternVL3's): 0.8 DPO + 0.2 BCO + 1.0 SFT on the chosen answer; dpo
    # bco_weight: 0.2       #   is 1, 0, 0
    # sft_weight: 1.0
    loss_weighting: token   # each row's tokens in the job's loss: token (every token alike), sample (every row
                            #   alike: 1/l a token) or square (1/sqrt(l), InternVL's default); l: the row's tokens
    seed: 0
    save_every: 50          # checkpoint every K optimizer steps, for --resume (0: only at the end)
  # - name: base            # full: true trains every weight of the model instead of an adapter (a small model
  #   full: true            #   from scratch, say): output gets a whole checkpoint; such a job runs alone.
  #   parts: [language, projector]  # a full job's parts are all three unless given: the others stay frozen
  #   part_lr: {vision: 1.0e-4}     # a full job's learning rate for some of its parts (the others: lr); a key may
  #                                 #   also be a prefix of weights' names (vision_tower.embeddings): the longest wins

Bounds: name 1-64 letters, digits, '_', '-' or ':' (a YAML string: quote names such as off or 1e3); rank
1-1024; batch_size and grad_accum 1-1024; max_len 8-1048576; numbers finite.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError, VLStackError
from ..files import overlap, read_yaml
from ..layers.lora import MAX_RANK, LoRASpec, check_name
from ..models.internvl import MODULES, PARTS, part_of
from .losses import SFT, WEIGHTINGS, Critic, Distill, Objective
from .preference import Preference
from .state import run_dir

MAX_BATCH, MAX_LEN, MAX_STEPS, MAX_EPOCHS = 1024, 1 << 20, 10**9, 10**4


class JobError(VLStackError):
    """A jobs file that cannot be run, with the job and the field named."""


@dataclass
class Job:
    """One job: its data and output, its adapter's shape (for a full job, only its parts: what it trains), its
    objective, and its optimisation. Job.of makes one from the jobs file's flat fields."""

    name: str
    data: Path
    output: Path
    lora: LoRASpec = field(default_factory=LoRASpec)
    objective: Objective = SFT
    lr: float = 2e-4
    weight_decay: float = 0.0
    schedule: str = "cosine"
    warmup_steps: int = 0
    batch_size: int = 4
    grad_accum: int = 1
    steps: int | None = None
    epochs: float | None = None
    max_len: int = 2048
    max_grad_norm: float = 1.0
    seed: int = 0
    save_every: int = 0  # checkpoint every K optimizer steps (0: only at the end)
    full: bool = False  # every weight of the parts trained (no adapter); output: a whole checkpoint
    part_lr: dict[str, float] | None = None  # a full job's learning rate for some parts ({vision: 1.0e-4}); others: lr

    @classmethod
    def of(cls, name: str, data: str | Path, output: str | Path, **flat: Any) -> Job:
        """A job from flat fields, as the jobs file gives them: rank, alpha, dropout, rslora, targets and parts
        make its LoRASpec (parts: [language] for an adapter, all three for a full job, unless given); objective
        and its settings its objective (objective_of); the rest are the Job's own."""
        lora = {k: flat.pop(k) for k in LORA_FIELDS if k in flat}
        lora = {k: tuple(v) if k in ("targets", "parts") else v for k, v in lora.items()}
        lora.setdefault("parts", tuple(sorted(PARTS)) if flat.get("full") else ("language",))
        objective = objective_of(name, flat)
        return cls(name, Path(data), Path(output), LoRASpec(**lora), objective, **flat)


LORA_FIELDS = ("rank", "alpha", "dropout", "rslora", "targets", "parts")
DISTILL_FIELDS = ("teacher", "temperature", "hidden_weight")
PREFERENCE_FIELDS = {"beta": "beta", "dpo_weight": "dpo", "bco_weight": "bco", "sft_weight": "sft"}
OBJECTIVES = ("sft", "distil", "mpo", "dpo", "prm")


def objective_of(name: str, flat: dict[str, Any]) -> Objective:
    """A job's objective from its flat fields (taken out of flat): `objective` (sft, distil, mpo or dpo; unless
    given: distil with a teacher, else sft), a teacher's temperature and hidden_weight, the preference objectives'
    beta and dpo_weight, bco_weight, sft_weight (dpo: 1, 0, 0 unless given), and loss_weighting."""
    kind = flat.pop("objective", None)
    distill = {k: flat.pop(k) for k in DISTILL_FIELDS if k in flat}
    preference = {field: flat.pop(k) for k, field in PREFERENCE_FIELDS.items() if k in flat}
    weighting = {"weighting": flat.pop("loss_weighting")} if "loss_weighting" in flat else {}
    teacher = distill.get("teacher") is not None
    kind = kind or ("distil" if teacher else "sft")
    if kind not in OBJECTIVES:
        raise JobError(f"job {name!r}: objective {kind!r} is not one of {', '.join(OBJECTIVES)}")
    if kind != "distil" and distill:
        raise JobError(f"job {name!r}: teacher, temperature and hidden_weight are for distillation (objective distil)")
    if kind == "distil" and not teacher:
        raise JobError(f"job {name!r}: temperature and hidden_weight are for distillation: give a teacher")
    if kind not in ("mpo", "dpo") and preference:
        raise JobError(f"job {name!r}: beta and the *_weight fields are for the objectives mpo and dpo")
    if kind == "distil":
        return Distill(**distill, **weighting)
    if kind in ("mpo", "dpo"):
        plain = {"dpo": 1.0, "bco": 0.0, "sft": 0.0} if kind == "dpo" else {}
        return Preference(**{**plain, **preference}, **weighting)
    if kind == "prm":
        return Critic(**weighting)
    return Objective(**weighting) if weighting else SFT


@dataclass
class Plan:
    model: str
    max_rows: int
    jobs: list[Job]
    gradient_checkpointing: bool = False
    max_tokens: int | None = None  # tokens per pass of a step through the base (None: one pass)
    log_every: int = 1  # optimizer steps per metrics line (each reads the losses back from the device)
    sharding: str | None = None  # "fsdp": the base and the adapters split over the processes (fsdp.py)
    parallel: str | None = None  # "pipeline": the decoder layers in stages over the processes (pipeline.py)


_TYPES = {  # the jobs file's flat fields and their types
    **{f.name: f.type for f in fields(LoRASpec) if f.name in LORA_FIELDS},
    **{f.name: f.type for f in fields(Distill) if f.name in DISTILL_FIELDS},
    **{f.name: f.type for f in fields(Job) if f.name not in ("lora", "objective")},
    "loss_weighting": "str",
    "objective": "str",
    **{k: "float" for k in PREFERENCE_FIELDS},
}


def _check(job: dict, where: str, root: Path) -> Job:
    unknown = sorted(set(job) - set(_TYPES))
    if unknown:
        raise JobError(f"{where}: unknown field(s) {unknown}; known: {sorted(_TYPES)}")
    for required in ("name", "data", "output"):
        if required not in job:
            raise JobError(f"{where}: missing the field {required!r}")
    kw: dict[str, Any] = {}
    for key, value in job.items():
        kind = _TYPES[key]
        try:
            if key in ("name", "data", "output", "schedule", "teacher", "loss_weighting", "objective"):
                if not isinstance(value, str) or not value:
                    raise ValueError("must be a non-empty string (quote it: YAML reads off, yes, 12... otherwise)")
                paths = ("data", "output", "teacher")
                if key == "output" and Path(value).name in ("", ".", ".."):
                    raise ValueError("must name a directory of its own to write (not . or ..)")
                kw[key] = root / value if key in paths else check_name(value) if key == "name" else value
            elif key == "part_lr":
                if not isinstance(value, dict) or not value or not all(map(is_part_key, value)):
                    raise ValueError(f"must map some of {sorted(PARTS)} (or prefixes of their weights' names) to rates")
                if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value.values()):
                    raise ValueError("must give each part a learning rate > 0")
                kw[key] = {k: float(v) for k, v in value.items()}
            elif key in ("targets", "parts"):
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or not value:
                    raise ValueError("must be a non-empty list of names")
                kw[key] = value
            elif "int" in kind and "float" not in kind:
                if isinstance(value, bool) or int(value) != value:
                    raise ValueError("must be an integer")
                kw[key] = int(value)
            elif "float" in kind:
                if isinstance(value, bool) or not math.isfinite(float(value)):
                    raise ValueError("must be a finite number")
                kw[key] = float(value)
            elif kind == "bool":
                if not isinstance(value, bool):
                    raise ValueError("must be true or false")
                kw[key] = value
        except (TypeError, ValueError, OverflowError, ConfigError) as e:
            raise JobError(f"{where}: field {key!r} = {value!r} {e}") from None
    try:
        j = Job.of(**kw)
    except JobError as e:
        raise JobError(f"{where}: {e}") from None
    spec = j.lora
    problems = [
        (not 1 <= spec.rank <= MAX_RANK, f"rank must be in [1, {MAX_RANK}]"),
        (spec.alpha <= 0, "alpha must be > 0"),
        (j.weight_decay < 0, "weight_decay must be >= 0"),
        (j.max_grad_norm <= 0, "max_grad_norm must be > 0"),
        (j.batch_size > MAX_BATCH or j.grad_accum > MAX_BATCH, f"batch_size and grad_accum must be <= {MAX_BATCH}"),
        (j.max_len > MAX_LEN, f"max_len must be <= {MAX_LEN}"),
        (not 0 <= spec.dropout < 1, "dropout must be in [0, 1)"),
        (j.lr <= 0, "lr must be > 0"),
        (j.batch_size < 1, "batch_size must be >= 1"),
        (j.grad_accum < 1, "grad_accum must be >= 1"),
        (j.max_len < 8, "max_len must be >= 8"),
        (j.schedule not in ("cosine", "linear", "constant"), "schedule must be cosine, linear or constant"),
        (j.objective.weighting not in WEIGHTINGS, f"loss_weighting must be one of {', '.join(WEIGHTINGS)}"),
        ((j.steps is None) == (j.epochs is None), "give exactly one of steps and epochs"),
        (j.steps is not None and not 1 <= j.steps <= MAX_STEPS, f"steps must be in [1, {MAX_STEPS}]"),
        (j.epochs is not None and not 0 < j.epochs <= MAX_EPOCHS, f"epochs must be in (0, {MAX_EPOCHS}]"),
        (j.warmup_steps < 0, "warmup_steps must be >= 0"),
        (not 0 <= j.seed < 2**63, "seed must be in [0, 2**63)"),
        (j.save_every < 0, "save_every must be >= 0"),
        (kw.get("temperature", 1.0) <= 0, "temperature must be > 0"),
        (kw.get("hidden_weight", 0.0) < 0, "hidden_weight must be >= 0"),
        (kw.get("beta", 1.0) <= 0, "beta must be > 0"),
        (any(kw.get(k, 0.0) < 0 for k in PREFERENCE_FIELDS if k != "beta"), "the *_weight fields must be >= 0"),
        (bool(set(spec.parts) - set(PARTS)), f"parts must be among {sorted(PARTS)}"),
        (j.part_lr is not None and not j.full, "part_lr is for a job with full: true"),
        (any(key_part(k) not in spec.parts for k in j.part_lr or ()), "part_lr names a part the job does not train"),
    ]
    for bad, message in problems:
        if bad:
            raise JobError(f"{where} ({j.name}): {message}")
    return j


def is_part_key(key: object) -> bool:
    """A part_lr key: a part's name or a prefix of weights' names (vision_tower.embeddings)."""
    if not isinstance(key, str) or key in PARTS:
        return key in PARTS
    return re.fullmatch(r"\w+(\.\w+)*", key) is not None and key.split(".")[0] in MODULES


def key_part(key: str) -> str:
    """The part a part_lr key's weights belong to."""
    return key if key in PARTS else part_of(key)


def read_plan(path: str | Path) -> Plan:
    path = Path(path)
    raw = read_yaml(path, "jobs file", JobError)
    if not isinstance(raw, dict) or not isinstance(raw.get("jobs"), list) or not raw["jobs"]:
        raise JobError(f"{path}: needs a non-empty 'jobs' list")
    top = {"model", "max_rows", "max_tokens", "gradient_checkpointing", "log_every", "sharding", "parallel", "jobs"}
    unknown = sorted(set(raw) - top)
    if unknown:
        raise JobError(f"{path}: unknown top-level field(s) {unknown}; known: {sorted(top)}")
    jobs = []
    for i, job in enumerate(raw["jobs"]):
        if not isinstance(job, dict):
            raise JobError(f"{path}: job {i + 1} must be a mapping of fields")
        jobs.append(_check(job, f"{path}: job {i + 1}", path.parent))
    if len(jobs) > 1 and any(j.full for j in jobs):
        raise JobError(f"{path}: a job with full: true trains the base itself, which the others share: it runs alone")
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise JobError(f"{path}: job names must be unique (got {names})")
    max_rows = raw.get("max_rows", sum(j.batch_size for j in jobs))
    if not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < max(j.batch_size for j in jobs):
        raise JobError(f"{path}: max_rows must be an integer >= the largest batch_size")
    checkpointing = raw.get("gradient_checkpointing", False)
    if not isinstance(checkpointing, bool):
        raise JobError(f"{path}: gradient_checkpointing must be true or false")
    max_tokens = raw.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        raise JobError(f"{path}: max_tokens must be a positive integer (tokens per pass through the base)")
    log_every = raw.get("log_every", 1)
    if not isinstance(log_every, int) or isinstance(log_every, bool) or log_every < 1:
        raise JobError(f"{path}: log_every must be a positive integer (optimizer steps per metrics line)")
    sharding = raw.get("sharding")
    if sharding not in (None, "fsdp"):
        raise JobError(f"{path}: sharding must be fsdp (the base split over the processes) or left out")
    parallel = raw.get("parallel")
    if parallel not in (None, "pipeline"):
        raise JobError(f"{path}: parallel must be pipeline (the layers in stages over the processes) or left out")
    if parallel and sharding:
        raise JobError(f"{path}: sharding and parallel: pipeline do not go together (yet)")
    return Plan(str(raw.get("model", "tiny")), max_rows, jobs, checkpointing, max_tokens, log_every, sharding, parallel)


def check_outputs(jobs: list[Job], model_dir: Path | None, inputs: dict[str, list[Path]]) -> None:
    """Refuse, before any work, jobs whose outputs (adapter directory and run directory) overlap each other,
    a dataset (its JSONL or images; inputs: job name -> those files) or the base model's directory."""
    places = [
        (f"job {j.name!r}'s {what}", p.resolve())
        for j in jobs
        for what, p in (("output", j.output), ("run directory", run_dir(j.output)))
    ]
    for i, (what, p) in enumerate(places):
        for other, q in places[i + 1 :]:
            if overlap(p, q):
                raise JobError(f"{what} {p} overlaps {other} {q}: give each job its own output")
        if model_dir is not None and overlap(p, model_dir):
            raise JobError(f"{what} {p} overlaps the base model's directory {model_dir.resolve()}")
        for name, files in inputs.items():
            hit = next((f for f in files if f.resolve().is_relative_to(p)), None)
            if hit is not None:
                raise JobError(f"{what} {p} holds job {name!r}'s dataset file {hit}: write outputs elsewhere")
    for j in jobs:  # (the last check: it makes the outputs' parent directories)
        try:
            j.output.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise JobError(f"job {j.name!r}: cannot write its output under {j.output.parent}: {e.strerror}") from None


class PlanWatcher:
    """`vlstack train --watch`: the jobs file, read again whenever it changes while training runs (the run ends
    with its last job: it does not wait for more). A call returns the jobs with names not seen before (they join
    the run); jobs already known keep the settings they started with (a change to one is reported, and not
    used), a job taken out of the file runs on, and a file that no longer reads is reported and changes
    nothing."""

    def __init__(self, path: str | Path, plan: Plan):
        self.path, self.known = Path(path), {j.name: j for j in plan.jobs}
        self.stamp = self._stamp()

    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def __call__(self) -> list[Job]:
        stamp = self._stamp()
        if stamp == self.stamp:
            return []
        self.stamp = stamp
        try:
            plan = read_plan(self.path)
        except JobError as e:
            print(f"the changed jobs file is not used: {e}", file=sys.stderr, flush=True)
            return []
        new = [j for j in plan.jobs if j.name not in self.known]
        for j in plan.jobs:
            if j.name in self.known and j != self.known[j.name]:
                print(
                    f"job {j.name!r} changed in the jobs file: it goes on with the settings it started with",
                    file=sys.stderr,
                    flush=True,
                )
                self.known[j.name] = j  # (said once per change)
        self.known.update({j.name: j for j in new})
        return new
