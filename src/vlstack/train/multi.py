"""Train many LoRA adapters at once over one frozen base (mLoRA's BatchLoRA).

Each fused step takes the next micro-batch of every running job, packs their rows back to back into
one row (no padding: attention stays within each sequence), runs one base forward/backward over it
with each job's adapter routed to its own tokens, and sums the jobs' losses (the adapters are
disjoint, so each gets exactly its own gradient). Every job keeps its own AdamW, clipping,
learning-rate schedule, gradient accumulation and data order (the jobs ready at a micro-step stepped in one
multi-tensor AdamW step, optim.py), so a job ends with the same adapter
whether it was trained alone or fused with others. Jobs wait in a queue until their rows fit under
`max_rows`, and leave (their adapter written) when they finish.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.distributed as dist

from ..adapters import save_adapter
from ..api import VLM
from ..layers.lora import add_adapter, remove_adapter
from ..layers.step import upload
from .batch import learned, passes, prepare_pass
from .data import DatasetError, Example, count_cut, encode_example, read_dataset
from .fsdp import gathered, is_sharded, shard
from .jobs import Job, JobError, check_outputs
from .losses import Critic, job_losses, teacher_logits
from .optim import step_jobs
from .pipeline import Pipe, pipe_for
from .preference import PairStep, Preference
from .progress import plot_loss, record
from .running import Running, start, total_steps, world
from .state import load_state, save_state
from .teacher import shared_features


def job_rows(vlm: VLM, running: list[Running], split: bool = True) -> list[tuple[int, dict]]:
    """The next micro-batch of every running job, encoded: [(job index, row)], in job order. Under data
    parallelism (split) each process takes every world-th row of each job's micro-batch. A row's `key` names it
    within its job's run (micro-step and place in the micro-batch): its tokens' dropout masks follow from it. Its
    `learned` counts the tokens it learns, `weight` is each one's weight in its job's loss (the job's objective's)."""
    rank, size = world() if split else (0, 1)
    rows = []
    for i, r in enumerate(running):
        paired = isinstance(r.job.objective, Preference)
        for j, ex in list(enumerate(r.stream.next()))[rank::size]:
            for side, part in enumerate(ex.sides()):  # (a pair: its chosen row, then its rejected row)
                row = encode_example(vlm.processor, part, r.job.max_len)
                row["key"] = (r.micro * r.job.batch_size + j) * (2 if paired else 1) + side
                row["learned"] = learned(row)
                # (a pair's rows are reduced by preference.py, not weighted into the job's token sum)
                row["weight"] = 0.0 if paired else r.job.objective.token_weight(row["learned"])
                row["side"] = side if paired else None
                rows.append((i, row))
    return rows


def train_step(
    vlm: VLM, running: list[Running], max_tokens: int | None = None, pipe: Pipe | None = None
) -> torch.Tensor:
    """One fused micro-step over every running job; returns each job's loss [jobs] (on the device: read back
    when metrics are written, not at every step).

    The rows go through the base in one forward/backward, or with max_tokens in passes of at most that many
    tokens whose gradients add up: the same gradients, with the activations of one pass at a time. Everything
    about the rows is worked out on the host first: no step waits on the device. pipe: pipelined over stages,
    each job's rows a pass (pipeline.py)."""
    model, device = vlm.model, vlm.model.device
    split = world()[1] > 1 and pipe is None  # data parallelism: each process a share of the rows (pipelined: all)
    rows = job_rows(vlm, running, split)
    jobs = len(running)
    # each job's loss is its weighted token losses over the whole (global) micro-batch's weight: sum it first
    # (a preference job's: its pairs and its chosen answers' tokens; its loss comes normalised: preference.py)
    weight, seen, pairs, chosen = [0.0] * jobs, [0] * jobs, [0] * jobs, [0] * jobs
    for i, x in rows:
        weight[i] += x["learned"] * x["weight"]
        seen[i] += len(x["input_ids"])
        pairs[i] += x["side"] == 0
        chosen[i] += x["learned"] if x["side"] == 0 else 0
    if split:
        stats = torch.tensor([weight, seen, pairs, chosen], dtype=torch.float64, device=device)  # [4, jobs]
        dist.all_reduce(stats)
        weight, (seen, pairs, chosen) = stats[0].tolist(), stats[1:].long().tolist()
    counts = torch.tensor(weight, dtype=torch.float32).clamp(min=1)  # [jobs] (a preference job's: 1)
    paired = any(isinstance(r.job.objective, Preference) for r in running)
    denominators = upload(counts * torch.tensor([r.job.grad_accum for r in running]), device)
    if pipe is not None:  # each job's rows a pass of their own, through the stages (pipeline.py)
        groups = [[row for row in rows if row[0] == i] for i in range(jobs)]
        sums = pipe.run(vlm, running, [prepare_pass(vlm, running, g) for g in groups if g], denominators)
    else:
        sums = torch.zeros(jobs, device=device)  # [jobs]: each job's summed token losses
        scale = world()[1] if is_sharded(model) else 1  # (FSDP averages what it reduces: fsdp.py)
        groups = passes(rows, max_tokens)
        pair_step = PairStep(model, running, list(zip(pairs, chosen)), split) if paired else None
        if pair_step is not None and pair_step.early(len(groups)):  # (BCO's shift first: preference.py)
            for k, group in enumerate(groups):
                p = prepare_pass(vlm, running, group)
                feats = shared_features(vlm, running, p.pixels)
                with torch.no_grad():
                    _, terms = job_losses(model, p.ids, p.step, p.pixels, p.targets, p.in_job, None, feats)
                pair_step.observe(k, p, terms, feats)
            pair_step.close()
        for k, group in enumerate(groups):
            p = prepare_pass(vlm, running, group)
            feats = shared_features(vlm, running, p.pixels)  # (once for the student and its teachers)
            kd = teacher_logits(running, p.jobs, p.ids, p.pixels, p.step, feats)
            pass_sums, terms = job_losses(model, p.ids, p.step, p.pixels, p.targets, p.in_job, kd, feats)
            if pair_step is not None:
                pass_sums = pass_sums + pair_step.sums(k, p, terms, feats)
            ((pass_sums / denominators).sum() * scale).backward()
            sums += pass_sums.detach()
        if pair_step is not None and pair_step.deltas is None:  # (no rows here: the others' reduction joined)
            pair_step.close()
    if split:
        dist.all_reduce(sums)
    losses = sums / upload(counts, device)  # [jobs]
    ready = []  # the jobs whose accumulation ends here
    for i, (r, n) in enumerate(zip(running, seen)):
        r.tokens += n
        r.micro += 1
        r.pending.append(losses[i])
        if r.micro % r.job.grad_accum == 0:
            if split and not is_sharded(model):  # once per optimizer step, over the gradients accumulated here
                sum_gradients(r.params)  # (sharded: FSDP summed them in backward)
            ready.append(r)
    reduce = pipe.norms if pipe is not None else None  # (pipelined: a job's norm over every stage)
    norms = step_jobs([r.optimizer for r in ready], [r.job.max_grad_norm for r in ready], reduce=reduce)  # all at once
    for i, r in enumerate(ready):
        r.scheduler.step()
        r.step += 1
        if norms is not None:
            r.pending_norms.append(norms[i])
    return losses


def inputs(job: Job, examples: list[Example]) -> list:
    """A job's dataset files: its JSONL and every image it names."""
    return [job.data, *dict.fromkeys(p for ex in examples for p in ex.images)]


def sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """Every process's accumulated gradients summed, on every process (rows without labels on a process leave
    it no gradient: zeros). Once per optimizer step: summing at each micro-step would count the earlier
    micro-steps' gradients again."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(grads)
    for p, g in zip(params, grads.split([p.numel() for p in params])):
        p.grad.copy_(g.view_as(p))


def check_split(mode: str, processes: int, options: dict[str, object]) -> None:
    """A run split over processes (pipeline stages, FSDP shards) needs 2+ of them and none of the options given
    (name -> value): the error names those it found."""
    if processes < 2:
        raise JobError(f"{mode} splits the run over processes: launch it with torchrun (2+ processes)")
    given = [name for name, value in options.items() if value]
    if given:
        raise JobError(f"{mode} does not go with {', '.join(given)} (yet)")


def check_lengths(vlm: VLM, job: Job, examples: list[Example], verbose: bool = True) -> None:
    """Examples whose answers max_len cuts off teach nothing: none left is an error, some a warning with the
    count."""
    cut = count_cut(vlm.processor, examples, job.max_len)
    if cut == len(examples):
        raise JobError(
            f"job {job.name!r}: max_len {job.max_len} cuts off the answer of every example of "
            f"{job.data}: nothing to learn (raise max_len)"
        )
    if cut and verbose:
        print(
            f"warning: job {job.name!r}: max_len {job.max_len} cuts off the answer of {cut} of {len(examples)} "
            "examples: they teach nothing",
            file=sys.stderr,
            flush=True,
        )


def check_data(job: Job, examples: list[Example]) -> None:
    """A preference job's every line a pair (question, chosen, rejected), a critic's (prm) every line an answer's
    labelled steps; any other job's a conversation."""
    names = {"pairs": "mpo or dpo", "steps": "prm", None: "sft or distil"}
    needs = {
        "pairs": "a preference pair (question, chosen, rejected)",
        "steps": "an answer's labelled steps (question, steps, labels)",
        None: "a conversation",
    }
    want = "pairs" if isinstance(job.objective, Preference) else "steps" if isinstance(job.objective, Critic) else None
    for ex in examples:
        if ("pairs" if ex.rejected is not None else "steps" if ex.steps else None) != want:
            raise JobError(f"{ex.where}: job {job.name!r} ({names[want]}) needs {needs[want]}")


def check_batch(job: Job, processes: int) -> None:
    if job.batch_size % processes:
        raise JobError(f"job {job.name!r}: batch_size {job.batch_size} is not a multiple of {processes} processes")


def added(more: Callable[[], list[Job]], lead: bool) -> list[Job]:
    """The jobs more() adds now; under data parallelism the first process asks and tells the others, so
    every process admits the same jobs at the same step."""
    if world()[1] == 1:
        return more()
    box = [more() if lead else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def finished_before(job: Job, state: dict | None, n_examples: int) -> bool:
    """A resumed job whose checkpoint says it ended, with its adapter written."""
    done = state is not None and state["step"] >= total_steps(job, n_examples)
    return done and (job.output / ("model.safetensors" if job.full else "adapter_model.safetensors")).is_file()


def train(
    vlm: VLM,
    jobs: list[Job],
    max_rows: int,
    verbose: bool = True,
    resume: bool = False,
    gradient_checkpointing: bool = False,
    more: Callable[[], list[Job]] | None = None,
    max_tokens: int | None = None,
    log_every: int = 1,
    sharding: str | None = None,
    device: str | torch.device | None = None,
    parallel: str | None = None,
) -> dict[str, Running]:
    """Run jobs fused: a queue admitted while their rows fit in max_rows; returns each job finished here.

    With resume, each job continues from its last checkpoint, and jobs that had finished are skipped.
    With gradient_checkpointing, the language model's layers are recomputed in backward instead of keeping
    their activations: less memory for a third more compute, the same adapters.
    With max_tokens, each step's rows go through the base in passes of at most that many tokens (see train_step).
    log_every: a job's metrics line (and the losses read back from the device) every that many optimizer steps.
    more() is asked before every step for jobs added while the others run (`vlstack train --watch`): they
    join the queue; one whose dataset or batch size is bad is reported and left out, the others go on.
    sharding="fsdp": the base and the adapters split over the processes (fsdp.py), moved to device once split.
    parallel="pipeline": the decoder layers split into stages over the processes (pipeline.py).
    """
    model = vlm.model
    model.train()
    model.language_model.checkpointing = gradient_checkpointing
    for p in model.parameters():
        p.requires_grad_(False)
    split = {"--resume": resume, "max_tokens": max_tokens, "--watch": more is not None}
    pipe = check_parallel(model, jobs, max_rows, split, sharding, parallel)
    run = Run(vlm, jobs, resume, verbose, pipe)
    params = shard_adapters(model, run.queue, torch.device(device or "cpu")) if sharding == "fsdp" else {}
    try:
        while run.queue or run.running:
            for job in added(more, world()[0] == 0) if more is not None else []:
                run.add(job)
            run.fill(max_rows, params)
            train_step(vlm, run.running, max_tokens, pipe)
            for r in list(run.running):
                if r.micro % r.job.grad_accum == 0:  # (mid-accumulation: nothing to record or save yet)
                    run.stepped(r, log_every)
    finally:
        model.eval()
        model.language_model.checkpointing = False
    if pipe is not None and (line := pipe.report()) and verbose:
        print(line, file=sys.stderr, flush=True)
    return run.finished


def check_parallel(
    model: torch.nn.Module, jobs: list[Job], max_rows: int, options: dict, sharding: str | None, parallel: str | None
) -> Pipe | None:
    """A run split over processes checked (options: --resume, max_tokens, --watch as given); the pipeline's stage
    of this process, when pipelined. Every job's batch size is checked against the processes sharing its rows."""
    size = world()[1]
    full = any(j.full for j in jobs)
    for job in jobs:
        check_objective(job, parallel == "pipeline")
    pipe = None
    if parallel == "pipeline":
        given = {k: v for k, v in options.items() if k != "--watch"}
        check_split("parallel: pipeline", size, {**given, "full: true": full, "sharding": sharding})
        pipe = pipe_for(model)
    if sharding == "fsdp":  # (a teacher, read whole, beside a split student: not yet)
        teacher = any(j.objective.distils for j in jobs)
        check_split("sharding: fsdp", size, {**options, "full: true": full, "a teacher": teacher})
        if sum(j.batch_size for j in jobs) > max_rows:
            raise JobError("sharding: fsdp starts every job at once: max_rows must hold all their batch sizes")
    for job in jobs:
        check_batch(job, 1 if pipe else size)
    return pipe


def check_objective(job: Job, pipelined: bool) -> None:
    """A preference job's pairs are compared within one pass of the base: not (yet) over the pipeline's stages,
    where each job's rows are a pass of their own through stages that hold no lm_head but the last."""
    if isinstance(job.objective, Preference) and pipelined:
        raise JobError(f"job {job.name!r}: a preference objective does not go with parallel: pipeline (yet)")


def shard_adapters(model: torch.nn.Module, jobs: list[Job], device: torch.device) -> dict[str, list]:
    """sharding: fsdp: every job's adapter added, then the model split (fsdp.py); each job's adapter weights."""
    for job in jobs:
        add_adapter(model, job.name, job.lora, seed=job.seed)
    shard(model, device)
    named = dict(model.named_parameters())
    return {
        job.name: [p for n, p in named.items() if f".lora_A.{job.name}." in n or f".lora_B.{job.name}." in n]
        for job in jobs
    }


class Run:
    """The jobs of one train() call: their datasets and files (checked against every job's outputs before any
    training), the queue waiting for room, the jobs running and those finished."""

    def __init__(
        self,
        vlm: VLM,
        jobs: list[Job],
        resume: bool,
        verbose: bool,
        pipe: Pipe | None,
    ):
        self.vlm, self.verbose, self.pipe = vlm, verbose, pipe
        self.datasets = {job.name: read_dataset(job.data) for job in jobs}
        for job in jobs:
            check_data(job, self.datasets[job.name])
            check_lengths(vlm, job, self.datasets[job.name], verbose)
        self.known, self.files = list(jobs), {j.name: inputs(j, self.datasets[j.name]) for j in jobs}
        check_outputs(self.known, vlm.directory, self.files)
        self.states = {job.name: load_state(job) if resume else None for job in jobs}
        self.queue = [j for j in jobs if not finished_before(j, self.states[j.name], len(self.datasets[j.name]))]
        self.running: list[Running] = []
        self.finished: dict[str, Running] = {}

    def add(self, job: Job) -> None:
        """A job added while the others run (--watch) joins the queue; one that cannot is reported, left out."""
        try:
            if job.name in self.datasets:
                raise JobError("a job of that name is already in this run")
            if job.full or any(j.full for j in self.known):
                raise JobError("a job with full: true trains the base itself: it runs alone")
            check_batch(job, 1 if self.pipe else world()[1])
            check_objective(job, self.pipe is not None)
            examples = read_dataset(job.data)
            check_data(job, examples)
            check_lengths(self.vlm, job, examples, self.verbose)
            files = {**self.files, job.name: inputs(job, examples)}
            check_outputs(self.known + [job], self.vlm.directory, files)
        except (JobError, DatasetError) as e:
            print(f"job {job.name!r} not added: {e}", file=sys.stderr, flush=True)
            return
        self.datasets[job.name], self.states[job.name], self.files = examples, None, files
        self.known.append(job)
        self.queue.append(job)

    def fill(self, max_rows: int, params: dict[str, list]) -> None:
        """Start the queued jobs, in order, while their rows fit in max_rows (params: sharded adapters' weights)."""
        while self.queue and sum(r.job.batch_size for r in self.running) + self.queue[0].batch_size <= max_rows:
            job = self.queue.pop(0)
            examples, state = self.datasets[job.name], self.states[job.name]
            self.running.append(start(self.vlm, job, examples, state, params.get(job.name)))

    def stepped(self, r: Running, log_every: int) -> None:
        """After job r's optimizer step: its losses read back and checked, its metrics line, checkpoint and, when
        it is done, its adapter (or model) written by one process, and the job taken out of the run."""
        model, pipe = self.vlm.model, self.pipe
        done = r.step >= r.total_steps
        if done and pipe is not None:  # the adapter's weights from the stages that trained them
            pipe.gather(model, r.job.name)
        sharded = is_sharded(model)
        checkpoint_now = not sharded and (done or (r.job.save_every and r.step % r.job.save_every == 0))
        if done or checkpoint_now or r.step % log_every == 0:  # (every process: each stops alike)
            r.read_losses()
            if (done or checkpoint_now) and not sharded:
                r.check_weights()
        with gathered(model) if done and sharded else nullcontext():  # (split weights: every process)
            if world()[0] == 0:  # one process writes: metrics, adapter, checkpoint, curve
                if done or r.step % log_every == 0:
                    record(r, self.verbose)
                if done and r.job.full:  # the model first: a checkpoint saying "done" implies it is complete
                    self.vlm.save(r.job.output)
                elif done:  # likewise the adapter
                    save_adapter(model, r.job.name, r.job.output, r.job.lora, base=str(self.vlm.directory))
                if checkpoint_now:
                    save_state(r)  # (no checkpoints of split weights yet)
                if done:
                    plot_loss(r)
        if done:
            if r.job.full:
                for p in r.params:
                    p.requires_grad_(False)
            elif not sharded:  # (sharded: the units are fixed; the adapter stays to the end)
                remove_adapter(model, r.job.name)
            self.running.remove(r)
            self.finished[r.job.name] = r
