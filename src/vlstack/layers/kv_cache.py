"""The KV cache: the engine's, preallocated once, written in one way.

Keys and values of every layer for `slots` sequences of up to `max_len` positions: k, v [L, S, Tmax, Hkv, D].
A token's place is the row `slot * max_len + position` of the layer's cache viewed as [S * Tmax, Hkv, D] (its
slot mapping, see step.py), and every write is one index_copy_ of a step's keys and values to their rows.
The cache keeps no lengths: what a sequence holds is the engine's to know (a request's tokens so far).
"""

from __future__ import annotations

import math

import torch


class KVCache:
    def __init__(self, shape: tuple[int, int, int, int, int], dtype: torch.dtype, device: torch.device):
        """shape: the keys' (and the values'), [L, S, Tmax, Hkv, D] (TextConfig.kv_shape)."""
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, S, Tmax, Hkv, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slots, self.max_len = shape[1], shape[2]

    @staticmethod
    def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
        return 2 * math.prod(shape) * dtype.itemsize

    def write(self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [T, Hkv, D] to the rows [T] of the slot mapping."""
        self.k[layer].view(-1, *k.shape[1:]).index_copy_(0, rows, k)
        self.v[layer].view(-1, *v.shape[1:]).index_copy_(0, rows, v)

    def read(self, layer: int, slots: torch.Tensor | None, batch: int, keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `keys` positions of these slots [B] (None: slots 0..batch-1, read in place)
        -> k, v [B, Hkv, K, D]."""
        rows = slice(0, batch) if slots is None else slots
        return self.k[layer, rows, :keys].transpose(1, 2), self.v[layer, rows, :keys].transpose(1, 2)

    def move(self, src: list[int], dst: list[int], length: int) -> None:
        """Copy the first `length` positions of slots src to slots dst (the sources are read first)."""
        s, d = torch.tensor(src, device=self.k.device), torch.tensor(dst, device=self.k.device)
        self.k[:, d, :length] = self.k[:, s, :length]
        self.v[:, d, :length] = self.v[:, s, :length]
