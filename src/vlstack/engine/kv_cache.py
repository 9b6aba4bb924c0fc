"""The KV cache: the engine's, preallocated once, written in one way.

Keys and values of every layer for `slots` sequences of up to `max_len` positions: k, v [L, S, Tmax, Hkv, D].
A token's place is the row `slot * max_len + position` of the layer's cache viewed as [S * Tmax, Hkv, D] (its
slot mapping, see metadata.py), and every write is one index_copy_ of a step's keys and values to their rows.
The cache keeps no lengths: what a sequence holds is the engine's to know (a request's tokens so far). One
more slot than asked for is scratch: the padding rows of a decode bucket write there.
"""

from __future__ import annotations

import math

import torch

from ..config import TextConfig


class KVCache:
    def __init__(self, cfg: TextConfig, slots: int, max_len: int, dtype: torch.dtype, device: torch.device):
        shape = self.shape(cfg, slots, max_len)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, S+1, Tmax, Hkv, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slots, self.max_len = slots, max_len
        self.scratch = slots  # the padding rows' slot

    @staticmethod
    def shape(cfg: TextConfig, slots: int, max_len: int) -> tuple[int, ...]:
        """The shape of the keys (and of the values), scratch slot included: [L, S+1, Tmax, Hkv, D]."""
        return cfg.num_hidden_layers, slots + 1, max_len, cfg.num_key_value_heads, cfg.head_dim

    @staticmethod
    def nbytes(cfg: TextConfig, slots: int, max_len: int, dtype: torch.dtype) -> int:
        return 2 * math.prod(KVCache.shape(cfg, slots, max_len)) * dtype.itemsize

    def write(self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [T, Hkv, D] to the rows [T] of the slot mapping."""
        self.k[layer].view(-1, *k.shape[1:]).index_copy_(0, rows, k)
        self.v[layer].view(-1, *v.shape[1:]).index_copy_(0, rows, v)

    def read(self, layer: int, slots: torch.Tensor, keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `keys` positions of these slots [B] -> k, v [B, Hkv, K, D]."""
        return self.k[layer, slots, :keys].transpose(1, 2), self.v[layer, slots, :keys].transpose(1, 2)
