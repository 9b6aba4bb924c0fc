"""Sharded training (`sharding: fsdp` in the jobs file, under torchrun): a base larger than one device.

FSDP2 (`fully_shard`) splits every weight over the processes: each vision layer and each decoder layer is a unit
(its weights gathered just before it runs and freed after), the rest (embeddings, projector, norms, LM head) the
root unit. The jobs' LoRA weights live in the layers they adapt and are split with them, and so are their AdamW
states; gradients are summed across the processes by FSDP's reduce-scatter, which averages: each process's loss
is scaled by the number of processes first (each job's loss being a mean over the whole batch already, as in data
parallelism; a power of two scales exactly). Each process still takes its share of every job's rows.

Since the units are fixed when the model is sharded, every job's adapter is added first: the jobs start together
(no --watch, all under max_rows) and their adapters stay on the model until the run ends. Every process must run
the same units in the same order: the vision tower runs even where a process's rows have no image, and a step is
one pass (no max_tokens, whose passes would differ in number between processes).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def shard(model: nn.Module, device: torch.device) -> None:
    """Split model (on the CPU, its adapters added) over the processes, then move each process's part to device."""
    from torch.distributed.fsdp import fully_shard

    units = [*model.vision_tower.encoder.layer, *model.language_model.layers]
    for unit in units:
        fully_shard(unit)
    fully_shard(model)
    model.fsdp_units = [*units, model]
    model.vision_always = True  # (a process whose rows have no image still runs the vision units, as the others)
    model.to(device)


def is_sharded(model: nn.Module) -> bool:
    return hasattr(model, "fsdp_units")


@contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Every weight whole on every process inside the block (to save an adapter): all processes enter it."""
    for unit in model.fsdp_units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in model.fsdp_units:
            unit.reshard()
