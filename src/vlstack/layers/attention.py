"""Attention over a step's tokens and the KV cache: one function for prefill, decode and training.

A step holds B sequences back to back, T tokens in all (step.py). The new keys and values go to the
cache by their slot mapping; each sequence then attends over its keys -- the cache's (a decode step, a prompt
after a cached prefix) or the step's own (training, a fresh prompt) -- in one SDPA call over the sequences
padded to the longest, with the step's mask. A step of one token per sequence (decode) needs no padding:
the query heads of each KV head attend as the rows of one group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kv_cache import KVCache
from .step import Step


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, step: Step, cache: KVCache | None, layer: int
) -> torch.Tensor:
    """q [T, H, D], k, v [T, Hkv, D] -> [T, H, D]."""
    if step.parts is not None:  # a joined step: each part on its own
        return torch.cat([attention(q[a:b], k[a:b], v[a:b], part, cache, layer) for a, b, part in step.parts])
    t, h, d = q.shape
    b, kv_heads = step.batch, k.shape[1]
    if step.rows is not None and cache is not None:
        cache.write(layer, step.rows, k, v)
    if step.cached and cache is not None:
        k, v = cache.read(layer, step.slots, b, step.keys)  # [B, Hkv, K, D]
    else:
        k, v = _padded(k, step).transpose(1, 2), _padded(v, step).transpose(1, 2)  # [B, Hkv, Q, D]
    if step.queries == 1:  # one token a sequence (T == B)
        g = q.view(b, kv_heads, h // kv_heads, d)  # [B, Hkv, H/Hkv, D]
        return F.scaled_dot_product_attention(g, k, v, attn_mask=step.mask).reshape(t, h, d)
    qp = _padded(q, step).transpose(1, 2)  # [B, H, Q, D]
    y = F.scaled_dot_product_attention(qp, k, v, attn_mask=step.mask, is_causal=step.mask is None, enable_gqa=True)
    y = y.transpose(1, 2).reshape(b * step.queries, h, d)  # [B*Q, H, D]
    return y if step.pad is None else y[step.unpad]


def _padded(x: torch.Tensor, step: Step) -> torch.Tensor:
    """x [T, ...] -> [B, Q, ...]: each sequence's tokens, padded to the longest with zeros."""
    if step.pad is None:
        return x.view(step.batch, step.queries, *x.shape[1:])
    x = torch.cat([x, x.new_zeros(1, *x.shape[1:])])  # [T+1, ...]: the last row is the padding
    return x[step.pad].view(step.batch, step.queries, *x.shape[1:])
