"""A job in training (Running): its data stream, optimizer, learning-rate schedule and counters, made by start()
from a Job (an adapter added, or a full job's weights made trainable; resumed from its checkpoint's state)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..api import VLM
from ..layers.lora import add_adapter
from ..models.internvl import PARTS, part_of, under
from .data import Example, Stream
from .fsdp import is_sharded
from .jobs import Job, JobError
from .preference import Preference, RewardShift
from .progress import truncate_metrics
from .state import clear_run, restore_state
from .teacher import teacher_of


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
    shift: RewardShift = field(default_factory=RewardShift)  # a preference job's BCO reward shift (preference.py)
    reference: torch.nn.Module | None = None  # a full preference job's: its starting weights, frozen

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
    if job.full and isinstance(job.objective, Preference):  # (before a resume's weights: the starting policy)
        r.reference = frozen_copy(vlm.model)
    if state is not None:
        restore_state(r, state)
        truncate_metrics(r)
    elif world()[0] == 0:  # a fresh start: no metrics or checkpoint of an earlier run may linger
        clear_run(job.output)
    r.first_step, r.first_tokens = r.step, r.tokens
    return r


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The model's weights as they are now, in a copy without gradients (a full job's reference: the one place
    a second copy of the model cannot be avoided, its own weights being what trains)."""
    copy = deepcopy(model)
    for p in copy.parameters():
        p.requires_grad_(False)
    return copy


def world() -> tuple[int, int]:
    """(rank, world size) under torch.distributed (torchrun), else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
