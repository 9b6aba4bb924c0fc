"""Which adapter each row of a forward runs: a `Route`, carried by the step (`Step.lora`).

A route is the adapters' segments along the first axis of the activations -- the tokens of a step's sequences
back to back (one segment per run of tokens with one adapter: a training job's rows, the server's prefill of an
adapter's prompts) or the tiles of its images -- and, for a step whose tokens run every adapter at once through
the layers' stacked weights, each token's slot as a one-hot [T, slots * rank]. In training it also holds each
row's key, from which the row's LoRA dropout masks are drawn: a row gets the same mask however a step's rows are
split into passes or processes, alone or fused, resumed or recomputed.

A decoder layer makes its step's route the one its LoRA layers read (`using`, for the layer's own forward: a
layer recomputed in backward by gradient checkpointing is called with the same step, so it reads the same route
and draws the same masks); the model does the same for the vision tower with the route over the tiles.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

Segments = list[tuple[str, int, int]]  # [(adapter, first, end)] along the activations' first axis


@dataclass
class Route:
    segments: Segments = field(default_factory=list)
    keys: list[tuple[int, int]] | None = None  # training: [(key, units)] of each sequence (or tile), in order
    onehot: torch.Tensor | None = None  # [T, slots * rank]: 1 on the ranks of each token's adapter's slot, else 0
    tiles: Route | None = None  # the same over the step's image tiles, worked out on the host before the step
    generators: dict[torch.device, torch.Generator] = field(default_factory=dict, repr=False)

    def over_tiles(self, image_tokens: torch.Tensor, per_tile: int) -> Route:
        """The route over the tiles of the images whose tokens are image_tokens [T] (the prepared one, if any):
        an adapter acts on the tiles of its own sequences' images."""
        if self.tiles is not None:
            return self.tiles
        keys = tile_keys(self.keys, image_tokens, per_tile) if self.keys is not None else None
        return Route(regroup(self.segments, image_tokens, per_tile), keys)

    def dropout_mask(self, xs: torch.Tensor, start: int, end: int, p: float, salt: int) -> torch.Tensor:
        """The dropout mask (0, or 1 / (1 - p)) of units start..end, shaped like their activations xs: each row's
        part drawn from a generator seeded by the row's key and salt alone."""
        if self.keys is None:
            raise ValueError("LoRA dropout in training needs each row's key (route(..., keys=))")
        gen = self.generators.get(xs.device)
        if gen is None:
            gen = self.generators[xs.device] = torch.Generator(device=xs.device)
        shape, parts, at = xs.shape[1:], [], 0
        for key, n in self.keys:
            if start <= at < end:
                gen.manual_seed((key * 0x9E3779B97F4A7C15 ^ salt) % 2**64)
                parts.append(torch.rand((n, *shape), generator=gen, device=xs.device))  # [n, ...]
            at += n
        return ((torch.cat(parts) >= p) / (1 - p)).view(xs.shape).to(xs.dtype)


class _Active(threading.local):  # (each thread's own: a server's engine and a caller's forward run side by side)
    route: Route | None = None  # the route of the forward running now (set by `using` around a layer's forward)


_active = _Active()


def active() -> Route | None:
    """The route of the forward running now (None: the base alone)."""
    return _active.route


@contextmanager
def using(route: Route | None) -> Iterator[None]:
    """`with using(step.lora):` -- the LoRA layers called inside read this route."""
    before, _active.route = _active.route, route
    try:
        yield
    finally:
        _active.route = before


def segments(adapters: list[str | None], counts: list[int] | None = None) -> Segments:
    """Adapter names, one per row (or per counts[i] consecutive units: the tokens of a packed sequence) ->
    [(adapter, first, end)] over runs of equal names (None: base only)."""
    out: Segments = []
    start = 0
    for name, n in zip(adapters, counts or [1] * len(adapters)):
        if name is not None and out and out[-1][0] == name and out[-1][2] == start:
            out[-1] = (name, out[-1][1], start + n)
        elif name is not None:
            out.append((name, start, start + n))
        start += n
    return out


def token_slots(segs: Segments, slots: dict[str, int], rows: int) -> torch.Tensor:
    """[rows]: the slot of each token's adapter, by the segments (-1: the base alone)."""
    out = torch.full((rows,), -1)
    for name, start, end in segs:
        out[start:end] = slots[name]
    return out


def slot_onehot(slots: torch.Tensor, capacity: int, rank: int) -> torch.Tensor:
    """Tokens' adapter slots [T] (-1: none) -> [T, capacity * rank]: 1 on the ranks of the token's slot."""
    columns = torch.arange(capacity * rank, device=slots.device) // rank  # [S*R] each rank's slot
    return (slots[:, None] == columns).float()


def regroup(segs: Segments, image_tokens: torch.Tensor, per_tile: int) -> Segments:
    """Segments over tokens -> segments over image tiles, given which tokens are image tokens [T]."""
    ends = [0, *torch.cumsum(image_tokens, 0).div(per_tile, rounding_mode="floor").tolist()]  # tiles before each token
    return [(name, ends[a], ends[b]) for name, a, b in segs if ends[b] > ends[a]]


def tile_keys(keys: list[tuple[int, int]], image_tokens: torch.Tensor, per_tile: int) -> list[tuple[int, int]]:
    """Row keys [(key, tokens)] of a packed batch and its image tokens (a mask [T]) -> a key per tile [(key, 1)],
    naming the tile's row and the place of its first token there (a tile's dropout masks follow from it)."""
    firsts = image_tokens.nonzero()[::per_tile, 0].tolist()  # the first token of each tile
    out, i, start = [], 0, 0
    for first in firsts:
        while first >= start + keys[i][1]:
            start += keys[i][1]
            i += 1
        out.append(((keys[i][0] << 24) + first - start, 1))
    return out
