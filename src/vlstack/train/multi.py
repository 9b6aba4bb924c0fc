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

import math
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..adapters import save_adapter
from ..api import VLM
from ..layers.lora import add_adapter, remove_adapter
from ..layers.step import upload
from ..models.internvl import PARTS, part_of, under
from .batch import learned, passes, prepare_pass
from .data import DatasetError, Example, Stream, count_cut, encode_example, read_dataset
from .fsdp import gathered, is_sharded, shard
from .jobs import Job, JobError, check_outputs
from .losses import job_losses, teacher_logits
from .optim import step_jobs
from .pipeline import Pipe, pipe_for
from .progress import plot_loss, record, truncate_metrics
from .state import clear_run, load_state, restore_state, save_state


def lr_lambda(job: Job, total: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine or linear decay to 0 (or constant) over the remaining steps."""

    def f(step: int) -> float:
        if step < job.warmup_steps:
            return (step + 1) / job.warmup_steps
        if job.schedule == "constant":
            return 1.0
        progress = (step - job.warmup_steps) / max(1, total - job.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * progress)) if job.schedule == "cosine" else 1 - progress

    return f


@dataclass
class Running:
    """A job in training: its data stream, optimizer and counters."""

    job: Job
    stream: Stream
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    total_steps: int
    step: int = 0
    micro: int = 0
    tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    losses: list[float] = field(default_factory=list)  # every micro-step's loss, read back
    recorded: int = 0  # how many of them the metrics have summarised
    pending: list[torch.Tensor] = field(default_factory=list)  # the losses of micro-steps since (on the device)
    pending_norms: list[torch.Tensor] = field(default_factory=list)  # the gradient norms of its steps since
    first_step: int = 0  # where this process started (after a resume)
    first_tokens: int = 0
    teacher: torch.nn.Module | None = None  # distillation: the model whose logits the job learns
    shares_vision: bool | None = None  # its teacher's vision tower and projector are the student's (None: unknown)

    @property
    def tokens_since_start(self) -> int:
        return self.tokens - self.first_tokens

    def read_losses(self) -> list[float]:
        """The losses of the micro-steps since the last read, copied to the host (one wait on the device); a
        non-finite one stops the job (Diverged), naming the optimizer step it belongs to."""
        new = torch.stack(self.pending).tolist() if self.pending else []
        norms = torch.stack(self.pending_norms).tolist() if self.pending_norms else []
        self.pending.clear()
        self.pending_norms.clear()
        bad = [((len(self.losses) + i) // self.job.grad_accum + 1, "loss", v) for i, v in enumerate(new)]
        bad += [(self.step - len(norms) + i + 1, "gradient", v) for i, v in enumerate(norms)]
        bad = sorted(b for b in bad if not math.isfinite(b[2]))
        if bad:
            step, what, value = bad[0]
            raise Diverged(
                f"job {self.job.name!r}: the {what} is {value} at step {step}: training stopped and "
                "nothing written (a learning rate too high? a temperature out of range?)"
            )
        self.losses += new
        return new

    def check_weights(self) -> None:
        """Before anything is written: every trained weight finite (a non-finite gradient makes them NaN before
        any loss shows it)."""
        if not all(bool(torch.isfinite(p).all()) for p in self.params):
            raise Diverged(
                f"job {self.job.name!r}: its weights are not finite at step {self.step} (a gradient "
                "overflowed): training stopped and nothing written"
            )


class Diverged(JobError):
    """A job whose loss or weights stopped being finite: it stops before writing anything."""


def total_steps(job: Job, n_examples: int) -> int:
    if job.steps is not None:
        return job.steps
    per_epoch = math.ceil(n_examples / (job.batch_size * job.grad_accum))
    return max(1, math.ceil(job.epochs * per_epoch))


def rate_of(job: Job, name: str, part: str) -> float:
    """A full job's learning rate for the weight `name`: its longest part_lr key (the part's name or a prefix of
    the weight's name), else the job's lr."""
    keys = [k for k in job.part_lr or () if k == part or under(name, k)]
    return job.part_lr[max(keys, key=lambda k: (k != part, len(k)))] if keys else job.lr


def start(
    vlm: VLM, job: Job, examples: list[Example], state: dict | None = None, params: list | None = None
) -> Running:
    """Add the job's adapter (or, for a full job, make every weight trainable) and optimizer; from a checkpoint's
    state when resuming. params: its adapter's, added already (sharded training)."""
    groups = None
    if params is None and job.full:  # its parts' weights, a param group per learning rate (the schedule scales each)
        named = list(vlm.model.named_parameters())
        for key in set(job.part_lr or ()) - set(PARTS):  # (checked before any weight is made trainable)
            if not any(under(name, key) for name, _ in named):
                raise JobError(f"{job.name}: part_lr: no weight's name starts with {key!r}")
        by_lr: dict[float, list[torch.nn.Parameter]] = {}
        for name, p in named:
            if (part := part_of(name)) in job.lora.parts:
                by_lr.setdefault(rate_of(job, name, part), []).append(p.requires_grad_(True))
        groups = [{"params": group, "lr": lr} for lr, group in by_lr.items()]
        params = [p for group in by_lr.values() for p in group]
    elif params is None:
        params = add_adapter(vlm.model, job.name, job.lora, seed=job.seed)
    # its state and schedule; stepped with every ready job's at once (optim.step_jobs: one foreach step on a GPU,
    # this fused kernel on a CPU: BENCHMARKS.md, "Measurements behind the code")
    sharded = is_sharded(vlm.model)  # (torch's fused AdamW takes no split tensors)
    optimizer = torch.optim.AdamW(groups or params, fused=not sharded, lr=job.lr, weight_decay=job.weight_decay)
    steps = total_steps(job, len(examples))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(job, steps))
    r = Running(job, Stream(examples, job.batch_size, job.seed), params, optimizer, scheduler, steps)
    r.teacher = teacher_of(vlm, job)
    if state is not None:
        restore_state(r, state)
        truncate_metrics(r)
    elif world()[0] == 0:  # a fresh start: no metrics or checkpoint of an earlier run may linger
        clear_run(job.output)
    r.first_step, r.first_tokens = r.step, r.tokens
    return r


def teacher_of(vlm: VLM, job: Job) -> torch.nn.Module | None:
    """The job's teacher as a frozen model on the student's device: a checkpoint directory is loaded."""
    objective = job.objective
    if not objective.distils:
        return None
    if isinstance(objective.teacher, torch.nn.Module):
        teacher = objective.teacher
    else:
        from ..api import load

        teacher = load(objective.teacher, device=vlm.model.device, dtype=vlm.model.dtype).model
    if objective.hidden_weight and teacher.cfg.text.hidden_size != vlm.cfg.text.hidden_size:
        widths = f"({teacher.cfg.text.hidden_size}) to be the student's ({vlm.cfg.text.hidden_size})"
        raise JobError(f"job {job.name!r}: hidden-state distillation needs the teacher's width {widths}")
    if teacher.cfg.text.vocab_size != vlm.cfg.text.vocab_size:
        raise JobError(
            f"job {job.name!r}: the teacher's vocabulary ({teacher.cfg.text.vocab_size}) is not the "
            f"student's ({vlm.cfg.text.vocab_size})"
        )
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def same_vision(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two models' vision towers and projectors hold the same weights (their image features agree)."""
    parts = [(dict(x.vision_tower.state_dict()), dict(x.multi_modal_projector.state_dict())) for x in (a, b)]
    return all(
        mine.keys() == theirs.keys()
        and all(mine[k].shape == theirs[k].shape and torch.equal(mine[k], theirs[k]) for k in mine)
        for mine, theirs in zip(*parts)
    )


def shared_features(vlm: VLM, running: list[Running], pixel_values: torch.Tensor | None) -> torch.Tensor | None:
    """The image features [N, P, C] computed once for the student and every teacher, where that gives what each
    would compute: the student's vision tower and projector untouched by every running job (no full job, no
    adapter on them) and each teacher's the same weights (checked once per job). None: each computes its own."""
    if pixel_values is None or not any(r.teacher is not None for r in running):
        return None
    if any(r.job.full or set(r.job.lora.parts) & {"vision", "projector"} for r in running):
        return None
    for r in running:
        if r.teacher is not None and r.shares_vision is None:
            r.shares_vision = same_vision(vlm.model, r.teacher)
    if not all(r.shares_vision for r in running if r.teacher is not None):
        return None
    with torch.no_grad():
        return vlm.model.image_features(pixel_values)


def world() -> tuple[int, int]:
    """(rank, world size) under torch.distributed (torchrun), else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def job_rows(vlm: VLM, running: list[Running], split: bool = True) -> list[tuple[int, dict]]:
    """The next micro-batch of every running job, encoded: [(job index, row)], in job order. Under data
    parallelism (split) each process takes every world-th row of each job's micro-batch. A row's `key` names it
    within its job's run (micro-step and place in the micro-batch): its tokens' dropout masks follow from it. Its
    `learned` counts the tokens it learns, `weight` is each one's weight in its job's loss (the job's objective's)."""
    rank, size = world() if split else (0, 1)
    rows = []
    for i, r in enumerate(running):
        for j, ex in list(enumerate(r.stream.next()))[rank::size]:
            row = encode_example(vlm.processor, ex, r.job.max_len)
            row["key"] = r.micro * r.job.batch_size + j
            row["learned"] = learned(row)
            row["weight"] = r.job.objective.token_weight(row["learned"])
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
    weight, seen = [0.0] * jobs, [0] * jobs
    for i, x in rows:
        weight[i] += x["learned"] * x["weight"]
        seen[i] += len(x["input_ids"])
    if split:
        stats = torch.tensor([weight, seen], dtype=torch.float64, device=device)  # [2, jobs]
        dist.all_reduce(stats)
        weight, seen = stats[0].tolist(), stats[1].long().tolist()
    counts = torch.tensor(weight, dtype=torch.float32).clamp(min=1)  # [jobs]
    denominators = upload(counts * torch.tensor([r.job.grad_accum for r in running]), device)
    if pipe is not None:  # each job's rows a pass of their own, through the stages (pipeline.py)
        groups = [[row for row in rows if row[0] == i] for i in range(jobs)]
        sums = pipe.run(vlm, running, [prepare_pass(vlm, running, g) for g in groups if g], denominators)
    else:
        sums = torch.zeros(jobs, device=device)  # [jobs]: each job's summed token losses
        scale = world()[1] if is_sharded(model) else 1  # (FSDP averages what it reduces: fsdp.py)
        for group in passes(rows, max_tokens):
            p = prepare_pass(vlm, running, group)
            feats = shared_features(vlm, running, p.pixels)  # (once for the student and its teachers)
            kd = teacher_logits(running, p.jobs, p.ids, p.pixels, p.step, feats)
            pass_sums = job_losses(model, p.ids, p.step, p.pixels, p.targets, p.in_job, kd, feats)
            ((pass_sums / denominators).sum() * scale).backward()
            sums += pass_sums.detach()
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
    lead, size = world()[0] == 0, world()[1]
    pipe = None
    others = {"--resume": resume, "max_tokens": max_tokens, "full: true": any(j.full for j in jobs)}
    if parallel == "pipeline":
        check_split("parallel: pipeline", size, {**others, "sharding": sharding})
        pipe = pipe_for(model)
    if sharding == "fsdp":  # (a teacher, read whole, beside a split student: not yet)
        teacher = any(j.objective.distils for j in jobs)
        check_split("sharding: fsdp", size, {**others, "a teacher": teacher, "--watch": more is not None})
        if sum(j.batch_size for j in jobs) > max_rows:
            raise JobError("sharding: fsdp starts every job at once: max_rows must hold all their batch sizes")
    for job in jobs:
        check_batch(job, 1 if pipe else size)
    datasets = {job.name: read_dataset(job.data) for job in jobs}  # all checked before any training
    for job in jobs:
        check_lengths(vlm, job, datasets[job.name], verbose)
    known, files = list(jobs), {j.name: inputs(j, datasets[j.name]) for j in jobs}
    check_outputs(known, vlm.directory, files)
    states = {job.name: load_state(job) if resume else None for job in jobs}
    queue = [j for j in jobs if not finished_before(j, states[j.name], len(datasets[j.name]))]
    added_params = {}
    if sharding == "fsdp":  # every adapter added, then the model split (fsdp.py)
        for job in queue:
            add_adapter(model, job.name, job.lora, seed=job.seed)
        shard(model, torch.device(device or "cpu"))
        named = dict(model.named_parameters())
        for job in queue:
            added_params[job.name] = [
                p for n, p in named.items() if f".lora_A.{job.name}." in n or f".lora_B.{job.name}." in n
            ]
    running: list[Running] = []
    finished: dict[str, Running] = {}
    try:
        while queue or running:
            for job in added(more, lead) if more is not None else []:
                try:
                    if job.name in datasets:
                        raise JobError("a job of that name is already in this run")
                    if job.full or any(j.full for j in known):
                        raise JobError("a job with full: true trains the base itself: it runs alone")
                    check_batch(job, 1 if pipe else size)
                    examples = read_dataset(job.data)
                    check_lengths(vlm, job, examples, verbose)
                    check_outputs(known + [job], vlm.directory, {**files, job.name: inputs(job, examples)})
                    datasets[job.name], states[job.name] = examples, None
                    known.append(job)
                    files[job.name] = inputs(job, examples)
                except (JobError, DatasetError) as e:
                    print(f"job {job.name!r} not added: {e}", file=sys.stderr, flush=True)
                    continue
                queue.append(job)
            while queue and sum(r.job.batch_size for r in running) + queue[0].batch_size <= max_rows:
                job = queue.pop(0)
                running.append(start(vlm, job, datasets[job.name], states[job.name], added_params.get(job.name)))
            train_step(vlm, running, max_tokens, pipe)
            for r in list(running):
                if r.micro % r.job.grad_accum:
                    continue  # mid-accumulation: nothing to record or save yet
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
                    if lead:  # one process writes: metrics, adapter, checkpoint, curve
                        if done or r.step % log_every == 0:
                            record(r, verbose)
                        if done and r.job.full:  # the model first: a checkpoint saying "done" implies it is complete
                            vlm.save(r.job.output)
                        elif done:  # likewise the adapter
                            save_adapter(model, r.job.name, r.job.output, r.job.lora, base=str(vlm.directory))
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
                    running.remove(r)
                    finished[r.job.name] = r
    finally:
        model.eval()
        model.language_model.checkpointing = False
    if pipe is not None and (line := pipe.report()) and verbose:
        print(line, file=sys.stderr, flush=True)
    return finished
