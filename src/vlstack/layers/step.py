"""The step's metadata: the tensors a forward needs besides the tokens.

A step is B sequences back to back, T tokens in all: a packed prefill (each prompt, or the part of it
after a cached prefix), a decode step (one token a sequence), a training batch (no cache). Everything the
model reads about the batch is here as tensors, so the forward has no Python branch on a value and no
loop over sequences; the Python ints (B, Q, K) are shapes, fixed for a captured decode bucket.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .lora_routing import Route


@dataclass
class Step:
    positions: torch.Tensor  # [T] each token's position in its sequence
    batch: int  # B sequences
    queries: int  # Q: new tokens of the longest sequence (1: a decode step)
    keys: int  # K: keys a sequence attends over (cached and new), its padded length
    rows: torch.Tensor | None = None  # [T] slot mapping: each new key's row in the cache (None: no cache)
    cached: bool = False  # the keys are read from the cache (else the step's own keys are all there are)
    slots: torch.Tensor | None = None  # [B] each sequence's cache slot, when cached (None: slots 0..B-1)
    pad: torch.Tensor | None = None  # [B*Q] the token at each padded place (T: a zero row); None: no padding
    unpad: torch.Tensor | None = None  # [T] each token's padded place
    mask: torch.Tensor | None = None  # [B, 1, Q, K] True: attend; None: causal from position 0, no padding
    logits: torch.Tensor | None = None  # [N] the tokens whose logits are needed; None: all
    parts: tuple[tuple[int, int, Step], ...] | None = None  # a joined step: its steps over tokens [a, b)
    extent: torch.Tensor | None = None  # [T] its sequence's length after this step (None: position + 1)
    rope: torch.Tensor | None = None  # [T] float: the positions RoPE rotates by, where V2PE makes them differ
    lora: Route | None = None  # which adapter each token runs (None: the base alone)


def decode_step(
    positions: torch.Tensor, slots: torch.Tensor | None, max_len: int, keys: int, offsets: torch.Tensor | None = None
) -> Step:
    """One new token for each of B sequences at these positions [B], in these cache slots [B] (None: slots
    0..B-1) of max_len positions; each attends to the positions of its slot up to its own, of the first `keys`.
    offsets [B] (V2PE): each sequence's RoPE position minus its position. Tensors only (a captured step builds it
    inside the graph)."""
    b = len(positions)
    slot = torch.arange(b, device=positions.device) if slots is None else slots
    mask = torch.arange(keys, device=positions.device) <= positions[:, None]  # [B, K]
    rope = None if offsets is None else positions + offsets
    return Step(positions, b, 1, keys, slot * max_len + positions, True, slots, mask=mask[:, None, None, :], rope=rope)


def v2pe(ids: torch.Tensor, image_token: int, delta: float, offset: float = 0.0) -> tuple[torch.Tensor, float]:
    """V2PE (InternVL3's variable visual position encoding): RoPE positions [T] (float64) of a sequence's tokens
    ids [T] (positions 0..T-1 after `offset`), and the offset of the text that follows.

    A text token's position is one more than the token's before; an image's tokens (each run of image_token) go
    up by delta each, and the text after an image goes on from the next whole position: after <img> at p, its n
    image tokens are at p + delta, ..., p + n delta, and </img> at ceil(p + n delta) + 1. delta = 1: 0..T-1."""
    t = len(ids)
    rope = torch.arange(t, dtype=torch.float64) + offset
    if delta == 1.0 or t == 0:
        return rope, offset
    is_image = (ids.cpu() == image_token).tolist()
    shift, run = offset, 0  # shift: the text's position minus its index; run: image tokens so far in this run
    for i, image in enumerate(is_image):
        if image:
            run += 1
            rope[i] = i + shift + run * (delta - 1)
        else:
            if run:
                shift += math.ceil(run * delta) - run
                run = 0
            rope[i] = i + shift
    if run:
        shift += math.ceil(run * delta) - run
    return rope, shift


def v2pe_rope(sequences: list[torch.Tensor], image_token: int, delta: float) -> torch.Tensor | None:
    """The RoPE positions [T] of whole sequences (from position 0) back to back under V2PE; None when delta is 1
    (RoPE takes the positions themselves)."""
    if delta == 1.0:
        return None
    return torch.cat([v2pe(ids, image_token, delta)[0] for ids in sequences])


def packed_step(
    lengths: list[int],
    device: torch.device,
    starts: list[int] | None = None,
    slots: list[int] | None = None,
    max_len: int = 0,
    logits: str | torch.Tensor | None = None,
    rope: torch.Tensor | None = None,
) -> Step:
    """Sequences of `lengths` new tokens back to back, each after starts[i] tokens already in the cache (0: a
    fresh sequence), written to cache slots[i] (None: no cache) of max_len positions. logits: "last" for each
    sequence's last token, a tensor of token indices, or None for every token. rope [T] (V2PE): the tokens'
    RoPE positions, where they are not their positions."""
    b, q, t = len(lengths), max(lengths), sum(lengths)
    n = torch.tensor(lengths)
    first = torch.tensor(starts or [0] * b)  # [B] each sequence's first new position
    seq = torch.repeat_interleave(torch.arange(b), n, output_size=t)  # [T] each token's sequence
    offset = torch.arange(t) - torch.repeat_interleave(n.cumsum(0) - n, n, output_size=t)  # [T] place in its part
    positions = first[seq] + offset
    step = Step(positions, b, q, q, extent=(first + n)[seq], rope=None if rope is None else rope.float())
    if slots is not None:
        slot = torch.tensor(slots)
        step.rows = slot[seq] * max_len + positions
        if any(starts or []):  # a cached prefix: keys come from the cache
            step.cached, step.slots, step.keys = True, slot, int((first + n).max())
    place = seq * q + offset  # [T] each token's place among the sequences padded to the longest
    if t != b * q:
        step.unpad = place
        step.pad = torch.full((b * q,), t).index_copy_(0, place, torch.arange(t))
    if t != b * q or step.cached:
        q_pos = torch.full((b * q,), 2**62).index_copy_(0, place, positions)  # padding: sees every key
        key = torch.arange(step.keys)[None] + (0 if step.cached else first[:, None])  # [B, K] positions
        step.mask = (key[:, None, :] <= q_pos.view(b, q, 1))[:, None]  # [B, 1, Q, K]
    if isinstance(logits, str):
        step.logits = n.cumsum(0) - 1
    elif logits is not None:
        step.logits = logits
    return to(step, device)


def join(first: Step, second: Step) -> Step:
    """Two steps run as one forward (a prefill's chunks and a decode step): first's tokens, then second's, each
    part attending as its own step; the logits of both parts' logit tokens, in that order."""
    t, u = len(first.positions), len(second.positions)
    logits = [
        torch.arange(n, device=s.positions.device) if s.logits is None else s.logits
        for s, n in ((first, t), (second, u))
    ]
    extent = [s.positions + 1 if s.extent is None else s.extent for s in (first, second)]
    rope = None
    if first.rope is not None or second.rope is not None:
        rope = torch.cat([s.positions.float() if s.rope is None else s.rope for s in (first, second)])
    return Step(
        torch.cat([first.positions, second.positions]),
        first.batch + second.batch,
        max(first.queries, second.queries),
        max(first.keys, second.keys),
        logits=torch.cat([logits[0], logits[1] + t]),
        parts=((0, t, first), (t, t + u, second)),
        extent=torch.cat(extent),
        rope=rope,
    )


def to(step: Step, device: torch.device) -> Step:
    """The step's tensors on device (one copy each, not waited for)."""
    for name, value in vars(step).items():
        if isinstance(value, torch.Tensor):
            setattr(step, name, upload(value, device))
    return step


def upload(values: Any, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Host values (a list, nested lists, or a CPU tensor) -> a tensor on device, the host not waiting for the
    device: to a GPU through pinned memory, asynchronously. (A copy from ordinary, pageable memory first waits
    for all the work queued on the stream: it would undo a decode step launched ahead of the one before.)"""
    t = torch.as_tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda" or t.is_cuda:
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)  # (the pinned block is not reused before its copy ends)
