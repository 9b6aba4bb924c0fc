"""Train many LoRA adapters at once over one frozen base (mLoRA's BatchLoRA).

Each fused step takes the next micro-batch of every running job, concatenates their rows into one
batch, runs one base forward/backward over it with each job's adapter routed to its own rows, and
sums the jobs' losses (the adapters are disjoint, so each gets exactly its own gradient). Every job
keeps its own AdamW, clipping, learning-rate schedule, gradient accumulation and data order, so a
job ends with the same adapter whether it was trained alone or fused with others. Jobs wait in a
queue until their rows fit under `max_rows`, and leave (their adapter written) when they finish.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..adapters import save_adapter
from ..api import VLM
from ..model.language import attention_mask
from ..model.lora import add_adapter, remove_adapter, route
from .data import IGNORE, Example, Stream, encode_example, read_dataset
from .jobs import Job


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
    losses: list[float] = field(default_factory=list)


def total_steps(job: Job, n_examples: int) -> int:
    if job.steps is not None:
        return job.steps
    per_epoch = math.ceil(n_examples / (job.batch_size * job.grad_accum))
    return max(1, math.ceil(job.epochs * per_epoch))


def start(vlm: VLM, job: Job, examples: list[Example]) -> Running:
    params = add_adapter(vlm.model, job.name, job.spec, seed=job.seed)
    optimizer = torch.optim.AdamW(params, lr=job.lr, weight_decay=job.weight_decay)
    steps = total_steps(job, len(examples))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(job, steps))
    return Running(job, Stream(examples, job.batch_size, job.seed), params, optimizer, scheduler, steps)


def fused_batch(vlm: VLM, running: list[Running]) -> tuple[dict[str, torch.Tensor], list[tuple[int, int]]]:
    """The next micro-batch of every running job as one right-padded batch; returns it and each job's rows."""
    rows, spans = [], []
    for r in running:
        first = len(rows)
        rows += [encode_example(vlm.processor, ex, r.job.max_len) for ex in r.stream.next()]
        spans.append((first, len(rows)))
    longest = max(len(x["input_ids"]) for x in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE, dtype=torch.long)
    valid = torch.zeros(len(rows), longest, dtype=torch.bool)
    for i, x in enumerate(rows):
        n = len(x["input_ids"])
        ids[i, :n], labels[i, :n], valid[i, :n] = x["input_ids"], x["labels"], True
    tiles = [x["pixel_values"] for x in rows if "pixel_values" in x]
    batch = {"input_ids": ids, "labels": labels, "valid": valid}
    if tiles:
        batch["pixel_values"] = torch.cat(tiles)
    return batch, spans


def train_step(vlm: VLM, running: list[Running]) -> list[float]:
    """One fused micro-step over every running job; returns each job's loss."""
    model, device = vlm.model, vlm.model.device
    batch, spans = fused_batch(vlm, running)
    batch = {k: v.to(device) for k, v in batch.items()}
    valid = batch["valid"]
    positions = torch.arange(valid.shape[1], device=device)[None].expand(valid.shape[0], -1)
    mask = attention_mask(valid, valid.shape[1])
    adapters = [r.job.name for r, (a, b) in zip(running, spans) for _ in range(a, b)]
    lengths = {r.job.name: int(valid[a:b].sum(1).max()) for r, (a, b) in zip(running, spans)}
    with route(model, adapters, lengths):
        logits = model(batch["input_ids"], batch.get("pixel_values"), positions, mask=mask)  # [R, T, V]
    targets = batch["labels"][:, 1:]
    per_token = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none",
        ignore_index=IGNORE,
    ).view_as(targets)  # [R, T-1]
    losses, total = [], 0.0
    for r, (a, b) in zip(running, spans):
        n = (targets[a:b] != IGNORE).sum().clamp(min=1)
        loss = per_token[a:b].sum() / n  # mean over this job's learned tokens
        total = total + loss / r.job.grad_accum
        losses.append(loss.item())
        r.tokens += int(valid[a:b].sum())
    total.backward()
    for r, loss in zip(running, losses):
        r.micro += 1
        r.losses.append(loss)
        if r.micro % r.job.grad_accum == 0:
            torch.nn.utils.clip_grad_norm_(r.params, r.job.max_grad_norm)
            r.optimizer.step()
            r.scheduler.step()
            r.optimizer.zero_grad(set_to_none=True)
            r.step += 1
    return losses


def report(r: Running, out=sys.stderr) -> None:
    elapsed = time.perf_counter() - r.started
    eta = elapsed / max(r.step, 1) * (r.total_steps - r.step)
    loss = sum(r.losses[-r.job.grad_accum :]) / len(r.losses[-r.job.grad_accum :])
    print(
        f"[{r.job.name}] step {r.step}/{r.total_steps} loss {loss:.4f} {r.tokens / elapsed:.0f} tok/s "
        f"eta {eta:.0f}s",
        file=out,
        flush=True,
    )


def train(vlm: VLM, jobs: list[Job], max_rows: int, verbose: bool = True) -> dict[str, Running]:
    """Run jobs fused: a queue admitted while their rows fit in max_rows; returns each finished job."""
    model = vlm.model
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    datasets = {job.name: read_dataset(job.data) for job in jobs}  # all checked before any training
    queue, running, finished = list(jobs), [], {}
    try:
        while queue or running:
            while queue and sum(r.job.batch_size for r in running) + queue[0].batch_size <= max_rows:
                job = queue.pop(0)
                running.append(start(vlm, job, datasets[job.name]))
            train_step(vlm, running)
            for r in list(running):
                if verbose and r.micro % r.job.grad_accum == 0:
                    report(r)
                if r.step >= r.total_steps:
                    save_adapter(model, r.job.name, r.job.output, r.job.spec, base=str(vlm.directory))
                    remove_adapter(model, r.job.name)
                    running.remove(r)
                    finished[r.job.name] = r
    finally:
        model.eval()
    return finished
