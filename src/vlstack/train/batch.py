"""A fused step's rows as passes through the base: every running job's rows packed back to back (no padding),
with what the forward and the losses need worked out on the host first (nothing waits on the device).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..layers.lora import route
from ..layers.step import Step, packed_step, upload, v2pe_rope
from .data import IGNORE

if TYPE_CHECKING:
    from ..api import VLM
    from .running import Running


def passes(rows: list[tuple[int, dict]], max_tokens: int | None) -> list[list[tuple[int, dict]]]:
    """Consecutive groups of rows of at most max_tokens tokens each (a longer row alone, a preference pair's two
    rows always together: its loss compares them); one group without a limit."""
    units: list[list[tuple[int, dict]]] = []  # rows, a pair's rejected row joined to its chosen one
    for row in rows:
        if row[1].get("side") == 1:
            units[-1].append(row)
        else:
            units.append([row])
    groups: list[list[tuple[int, dict]]] = []
    tokens = 0
    for unit in units:
        n = sum(len(x["input_ids"]) for _, x in unit)
        if not groups or (max_tokens is not None and tokens + n > max_tokens):
            groups.append([])
            tokens = 0
        groups[-1].extend(unit)
        tokens += n
    return groups


def pack(rows: list[tuple[int, dict]]) -> dict:
    """Rows back to back, no padding: input_ids [T], labels [T], seqlens, each token's job [T] and weight in its
    job's loss [T], the rows' [(dropout key, tokens)], and the rows' pixel_values."""
    seqlens = [len(x["input_ids"]) for _, x in rows]
    batch = {
        "input_ids": torch.cat([x["input_ids"] for _, x in rows]),  # [T]
        "labels": torch.cat([x["labels"] for _, x in rows]),
        "seqlens": seqlens,
        "job": torch.repeat_interleave(torch.tensor([i for i, _ in rows]), torch.tensor(seqlens)),  # [T]
        "weight": torch.repeat_interleave(torch.tensor([x["weight"] for _, x in rows]), torch.tensor(seqlens)),  # [T]
        "rows": [(x["key"], n) for (_, x), n in zip(rows, seqlens)],
    }
    tiles = [x["pixel_values"] for _, x in rows if "pixel_values" in x]
    if tiles:
        batch["pixel_values"] = torch.cat(tiles)
    return batch


@dataclass
class Pass:
    """One pass's rows back to back, worked out on the host (nothing waits on the device): its tokens and
    images, step metadata (with the LoRA route: each row's adapter, length and dropout key), learned tokens'
    targets [N] and jobs [N] (host) and in_job [jobs, N]."""

    ids: torch.Tensor  # [T]
    pixels: torch.Tensor | None  # [tiles, 3, S, S]
    step: Step
    targets: torch.Tensor  # [N]
    jobs: torch.Tensor  # [N] each learned token's job, on the host
    in_job: torch.Tensor  # [jobs, N]
    rows: torch.Tensor  # [N] each learned token's row in the pass, on the host
    row_jobs: list[int]  # each row's job
    sides: list[int | None]  # each row's side of a preference pair (0 chosen, 1 rejected; None: no pair)


def prepare_pass(vlm: VLM, running: list[Running], group: list[tuple[int, dict]]) -> Pass:
    device = vlm.model.device
    batch = pack(group)
    seqlens, keyed, labels = batch.pop("seqlens"), batch.pop("rows"), batch.pop("labels")
    targets = torch.full_like(labels, IGNORE)  # [T]: the token each position predicts, within its sequence
    targets[:-1] = labels[1:]
    targets[torch.tensor(seqlens).cumsum(0) - 1] = IGNORE  # a sequence's last token predicts nothing
    learn = targets != IGNORE  # [T]: positions with a label; logits are computed only there
    rope = v2pe_rope([x["input_ids"] for _, x in group], vlm.cfg.image_token_id, vlm.cfg.v2pe_delta)
    step = packed_step(seqlens, device, logits=learn.nonzero()[:, 0], rope=rope)
    jobs_of = batch.pop("job")[learn]  # [N] each learned token's job, on the host
    weights = batch.pop("weight")[learn]  # [N] each learned token's weight in its job's loss
    in_job = upload(F.one_hot(jobs_of, len(running)).T.float() * weights, device)  # [jobs, N]
    image_tokens = batch["input_ids"] == vlm.cfg.image_token_id  # [T], on the host
    batch = {k: upload(v, device) for k, v in batch.items()}
    names = [None if running[i].job.full else running[i].job.name for i, _ in group]  # (full: the base's own)
    tiles = (image_tokens, vlm.cfg.tokens_per_tile) if "pixel_values" in batch else None
    step.lora = route(vlm.model, names, counts=seqlens, keys=keyed, tiles=tiles)  # (on a GPU: one pair of matmuls)
    rows = torch.repeat_interleave(torch.arange(len(group)), torch.tensor(seqlens))[learn]  # [N]
    row_jobs, sides = [i for i, _ in group], [x.get("side") for _, x in group]
    ids, pixels = batch["input_ids"], batch.get("pixel_values")
    return Pass(ids, pixels, step, upload(targets[learn], device), jobs_of, in_job, rows, row_jobs, sides)


def learned(row: dict) -> int:
    """The tokens a row learns (each learns the label of the next one)."""
    return int((row["labels"][1:] != IGNORE).sum())
