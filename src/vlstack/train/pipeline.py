"""Pipelined multi-adapter training (`parallel: pipeline` in the jobs file, under torchrun): mLoRA's LoRAPP.

The base's decoder layers are split into consecutive stages, one per process: the first stage also runs the
vision tower, the projector and the embedding; the last the final norm, the LM head and the losses. Since the
jobs' adapters are independent, each job's micro-batch is a pass of its own through the stages, and the passes
of different jobs follow each other down the pipeline with nothing between them: while stage 1 works on job A's
rows, stage 0 has moved on to job B's (GPipe's schedule over the jobs: every pass's forward, then every pass's
backward, last first). Of each step's time, a stage idles for (stages - 1) passes' worth of its share in the fill
and the drain: the bubble fraction is (S - 1) / (P + S - 1) for S stages and P passes of equal cost, so more jobs
fill the pipeline better (`bubble`).

Every process reads every job's rows (the same rows on each stage); activations go forward and their gradients
back by send/recv ([T, C] each: the stages agree on T from the rows). Each process keeps the whole model's
LoRA weights but trains only its stage's; a job's gradient norm (for clipping) is summed over the stages, and its
adapter is gathered from the stages that trained it before rank 0 writes it. The adapters equal the fused
one-process run's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ..layers.lora import lora_layers
from ..models.internvl import InternVL, layer_of
from .losses import pass_losses, teacher_logits


def split(layers: int, stages: int) -> list[range]:
    """Consecutive layers per stage, as even as they go (the first stages take the remainder)."""
    base, extra = divmod(layers, stages)
    bounds = [0]
    for s in range(stages):
        bounds.append(bounds[-1] + base + (s < extra))
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def bubble(stages: int, passes: int) -> float:
    """The fraction of a step a stage idles in GPipe's schedule, for passes of equal cost."""
    return (stages - 1) / (passes + stages - 1)


@dataclass
class Pipe:
    rank: int
    size: int
    layers: range  # this stage's decoder layers
    spans: list[range]  # every stage's
    steps: list[tuple[int, float, float]] = field(default_factory=list)  # per step: passes, seconds computing, in all

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.size - 1

    def owner(self, name: str) -> int:
        """The stage that trains a parameter, by its name: its decoder layer's, else the first stage (vision tower,
        projector)."""
        layer = layer_of(name)
        if layer is None:
            return 0
        return next(s for s, span in enumerate(self.spans) if layer in span)

    def run(self, vlm, running: list, passes: list, denominators: torch.Tensor) -> torch.Tensor:
        """Every pass forward through this stage, then every pass backward (last first); returns each job's summed
        token losses [jobs], known on every stage. A distilling job's teacher runs whole on the last stage, its
        images encoded by itself (the student's vision tower is the first stage's)."""
        model: InternVL = vlm.model
        device, dtype, width = model.device, model.dtype, vlm.cfg.text.hidden_size
        start, busy = time.perf_counter(), 0.0
        sums = torch.zeros(len(denominators), device=device)  # [jobs]
        kept = []  # per pass: (its input activations, its output or loss)
        for p in passes:
            x = None
            if not self.first:
                x = torch.empty(len(p.ids), width, device=device, dtype=dtype)
                dist.recv(x, self.rank - 1)
                x.requires_grad_(True)
            t = time.perf_counter()
            h = model.embed(p.ids, p.pixels, lora=p.step.lora) if self.first else x
            h = model.language_model(h, p.step, span=self.layers)  # [T, C] (the last stage: normed)
            if self.last:
                recompute = model.language_model.checkpointing
                kd = teacher_logits(running, p.jobs, p.ids, p.pixels, p.step)
                pass_sums = pass_losses(model.lm_head, h[p.step.logits], p.targets, p.in_job, recompute, kd)
                sums += pass_sums.detach()
                h = (pass_sums / denominators).sum()
            busy += time.perf_counter() - t
            if not self.last:
                dist.send(h.detach().contiguous(), self.rank + 1)
            kept.append((x, h))
        for x, h in reversed(kept):
            if self.last:
                t = time.perf_counter()
                h.backward()
            else:
                grad = torch.empty_like(h)
                dist.recv(grad, self.rank + 1)
                t = time.perf_counter()
                torch.autograd.backward(h, grad)
            busy += time.perf_counter() - t
            if not self.first:
                dist.send(x.grad.contiguous(), self.rank - 1)
        dist.broadcast(sums, self.size - 1)
        self.steps.append((len(passes), busy, time.perf_counter() - start))
        return sums

    def report(self) -> str | None:
        """Each stage's idle share of its steps (the first step, a warm-up, left out), beside GPipe's bubble for
        passes of equal cost; gathered from every stage (all take part), None off rank 0."""
        steps = self.steps[1:] or self.steps
        idle = 1 - sum(b for _, b, _ in steps) / max(1e-9, sum(w for _, _, w in steps))
        every = [None] * self.size
        dist.all_gather_object(every, idle)
        if self.rank:
            return None
        passes = sum(p for p, _, _ in steps) / max(1, len(steps))
        shares = ", ".join(f"{x:.0%}" for x in every)
        return (
            f"pipeline: {self.size} stages, {passes:.1f} passes a step; each stage idle {shares} of its steps "
            f"(GPipe's bubble for equal passes: {bubble(self.size, round(passes)):.0%})"
        )

    def norms(self, squares: torch.Tensor) -> torch.Tensor:
        """Each job's squared gradient norm on this stage [jobs] -> over every stage."""
        where = squares.to("cuda") if dist.get_backend() == "nccl" else squares
        dist.all_reduce(where)
        return where.cpu()

    def gather(self, model: nn.Module, name: str) -> None:
        """Adapter `name`'s weights, each from the stage that trained it, on every stage."""
        for module, layer in lora_layers(model).items():
            if name in layer.lora_A:
                owner = self.owner(module + ".")
                for p in (layer.lora_A[name].weight, layer.lora_B[name].weight):
                    dist.broadcast(p.data, owner)


def pipe_for(model: InternVL) -> Pipe:
    """This process's stage of the model's decoder layers; the base weights it never runs are freed."""
    rank, size = dist.get_rank(), dist.get_world_size()
    spans = split(model.cfg.text.num_hidden_layers, size)
    if any(len(s) == 0 for s in spans):
        raise ValueError(f"{size} stages for {model.cfg.text.num_hidden_layers} layers: some would have none")
    pipe = Pipe(rank, size, spans[rank], spans)
    keep_stage(model, pipe)
    return pipe


def keep_stage(model: InternVL, pipe: Pipe) -> None:
    """Free the base weights of every part of model this stage does not run (other stages' decoder layers; the
    vision tower, projector and embedding off the first stage; the LM head off the last): each becomes one element
    seen at its shape (its dtype and device kept, for the LoRA weights added to its layer, which other stages
    train and this one receives to write the adapter)."""
    lm = model.language_model
    unused: list[nn.Module] = [lm.layers[i] for i in range(len(lm.layers)) if i not in pipe.layers]
    if not pipe.first:
        unused += [model.vision_tower, model.multi_modal_projector]
    shared = model.lm_head.weight is lm.embed_tokens.weight
    if not pipe.first and not (shared and pipe.last):
        unused.append(lm.embed_tokens)
    if not pipe.last and not (shared and pipe.first):
        unused.append(model.lm_head)
    for module in unused:
        for p in module.parameters():
            p.data = p.data.new_zeros(1).expand(p.shape)
