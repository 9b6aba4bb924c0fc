"""The Qwen2-family decoder of InternVL2.5/3: RMSNorm, RoPE, grouped-query attention with q/k/v bias,
SwiGLU MLP, and a KV cache. Module names follow transformers' Qwen2 (the layout of checkpoints and of
PEFT adapter keys).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import TextConfig
from .activations import ACTIVATIONS
from .vision import RMSNorm


class KVCache:
    """Keys and values of every layer for `slots` sequences, each with its own length, preallocated to
    max_len positions. The model works on the slots `use` names (all of them at first): it writes each
    row's new positions after that row's length with `update`, and `advance` moves the lengths on once
    all layers have run. Lengths live on the model's device (positions, masks) and on the host (slicing),
    so that no step waits for the device to report one."""

    def __init__(self, cfg: TextConfig, slots: int, max_len: int, dtype: torch.dtype, device: torch.device):
        shape = self.shape(cfg, slots, max_len)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, S, Hkv, Tmax, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)  # [S]
        self.host = [0] * slots  # the same lengths
        self.packed: tuple[torch.Tensor, torch.Tensor, list[int]] | None = None  # see pack()
        self.use(list(range(slots)))

    @staticmethod
    def shape(cfg: TextConfig, slots: int, max_len: int) -> tuple[int, ...]:
        """The shape of the keys (and of the values): [L, S, Hkv, Tmax, D]."""
        return cfg.num_hidden_layers, slots, cfg.num_key_value_heads, max_len, cfg.head_dim

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def use(self, slots: list[int], lengths: list[int] | None = None) -> None:
        """Make these slots the batch's rows, and set their lengths when given."""
        self.slots = slots  # the slot of each batch row
        self.prefix = slots == list(range(len(slots)))  # rows are slots 0..B-1: read as a view, not gathered
        self.rows = torch.tensor(slots, dtype=torch.long, device=self.k.device)  # [B]: the same, on the device
        if lengths is not None:
            for slot, n in zip(slots, lengths):
                self.host[slot] = n
            self.lengths[self.rows] = torch.tensor(lengths, dtype=torch.long, device=self.k.device)
        self._settle()

    def _settle(self) -> None:
        """After the rows or their lengths change: the longest row, and whether the rows are slots 0..B-1 all of
        one length (then writes are slices, and no mask is needed)."""
        lengths = {self.host[s] for s in self.slots}
        self.length = max(lengths, default=0)  # the model builds a causal mask past a cached prefix
        self.even = self.length if self.prefix and len(lengths) == 1 else None

    def pack(self, slots: list[int], seqlens: list[int]) -> None:
        """The next forward is a packed prefill: these slots' prompts back to back in one row, each from
        position 0. Its keys and values go to (slot, position) token by token."""
        self.use(slots, [0] * len(slots))
        lengths = torch.tensor(seqlens, device=self.k.device)
        rows = torch.repeat_interleave(self.rows, lengths, output_size=sum(seqlens))  # [T]: each token's slot
        self.packed = rows, packed_positions(seqlens, self.k.device), seqlens  # ..., each token's position

    def next_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """For one new token per row: its position [B, 1] and the attention mask [B, 1, 1, K] over each row's
        own keys (rows of other lengths hold stale or unused positions past theirs)."""
        lengths = self.lengths[self.rows]  # [B]
        if self.even is not None:  # every row attends to all its keys
            return lengths[:, None], None
        keys = torch.arange(self.length + 1, device=self.k.device)
        return lengths[:, None], (keys[None] <= lengths[:, None])[:, None, None, :]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [B, Hkv, T, D] written after each row's own length -> each row's keys, values so far.

        In a packed prefill, k, v [1, Hkv, T, D] go token by token to their slots and come back as they are."""
        if self.packed is not None:
            rows, pos, _ = self.packed
            self.k[layer].permute(0, 2, 1, 3)[rows, pos] = k[0].transpose(0, 1)  # [T, Hkv, D] into [S, Tmax, Hkv, D]
            self.v[layer].permute(0, 2, 1, 3)[rows, pos] = v[0].transpose(0, 1)
            return k, v
        if self.even is not None:  # one slice for all rows
            end = self.even + k.shape[2]
            self.k[layer, : len(self.slots), :, self.even : end] = k
            self.v[layer, : len(self.slots), :, self.even : end] = v
            return self.k[layer, : len(self.slots), :, :end], self.v[layer, : len(self.slots), :, :end]
        pos = self.lengths[self.rows][:, None] + torch.arange(k.shape[2], device=k.device)  # [B, T]
        rows = self.rows[:, None].expand_as(pos)
        self.k[layer].permute(0, 2, 1, 3)[rows, pos] = k.transpose(1, 2)  # [B, T, Hkv, D] into [S, Tmax, Hkv, D]
        self.v[layer].permute(0, 2, 1, 3)[rows, pos] = v.transpose(1, 2)
        end = self.length + k.shape[2]
        rows = slice(0, len(self.slots)) if self.prefix else self.rows
        return self.k[layer, rows, :, :end], self.v[layer, rows, :, :end]  # [B, Hkv, K, D]

    def move(self, old: list[int], new: list[int]) -> None:
        """Copy the sequences in slots `old` to slots `new` (any overlap: the sources are read first)."""
        src, dst = torch.tensor(old, device=self.k.device), torch.tensor(new, device=self.k.device)
        lengths = [self.host[s] for s in old]
        end = max(lengths)
        self.k[:, dst, :, :end] = self.k[:, src, :, :end]
        self.v[:, dst, :, :end] = self.v[:, src, :, :end]
        self.lengths[dst] = self.lengths[src]
        for slot, n in zip(new, lengths):
            self.host[slot] = n
        self._settle()

    def advance(self, n: int) -> None:
        """The last update's positions are now part of every row's sequence (of each packed prompt: all of it)."""
        if self.packed is not None:
            self.use(self.slots, self.packed[2])
            self.packed = None
            return
        self.lengths[self.rows] += n
        for slot in self.slots:
            self.host[slot] += n
        self._settle()


def packed_positions(seqlens: list[int], device: torch.device) -> torch.Tensor:
    """[T]: each token's position within its own sequence, for sequences of these lengths back to back."""
    lengths, total = torch.tensor(seqlens, device=device), sum(seqlens)  # (output_size: no device sync)
    starts = torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths, output_size=total)
    return torch.arange(total, device=device) - starts


def attention_mask(valid: torch.Tensor, q_len: int) -> torch.Tensor:
    """Boolean mask [B, 1, q_len, K] from valid [B, K] (False at padding): causal over the last q_len keys."""
    k_len = valid.shape[1]
    q_pos = torch.arange(k_len - q_len, k_len, device=valid.device)[:, None]  # [q_len, 1]
    causal = torch.arange(k_len, device=valid.device)[None, :] <= q_pos  # [q_len, K]
    return causal[None, None] & valid[:, None, None, :]


class Rotary(nn.Module):
    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [D/2]

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq  # [B, T, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, T, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class SelfAttention(nn.Module):
    def __init__(self, cfg: TextConfig, index: int):
        super().__init__()
        self.index = index
        self.n_heads, self.n_kv, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(
        self, x, cos, sin, cache: KVCache | None, mask: torch.Tensor | None, seqlens: list[int] | None = None
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.index, k, v)  # [B, Hkv, K, D]
        if seqlens is not None:  # packed sequences: each attends causally to itself only
            parts = zip(q.split(seqlens, 2), k.split(seqlens, 2), v.split(seqlens, 2))
            y = torch.cat([F.scaled_dot_product_attention(*p, is_causal=True, enable_gqa=True) for p in parts], 2)
        elif t == 1:  # one new token a row: the query heads of each KV head attend as the rows of one group
            g = q.reshape(b, self.n_kv, self.n_heads // self.n_kv, self.head_dim)  # [B, Hkv, H/Hkv, D]
            y = F.scaled_dot_product_attention(g, k, v, attn_mask=mask).reshape(b, self.n_heads, 1, self.head_dim)
        else:
            causal = mask is None
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, index: int):
        super().__init__()
        self.self_attn = SelfAttention(cfg, index)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, cache, mask, seqlens) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, mask, seqlens)
        return x + self.mlp(self.post_attention_layernorm(x))


class LanguageModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)
        # gradient checkpointing: a context_fn (lora.replay) makes training keep only each layer's input and
        # recompute the layer in backward; None keeps every activation
        self.recompute: Callable | None = None

    def forward(
        self,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
        seqlens: list[int] | None = None,
    ) -> torch.Tensor:
        """embeds [B, T, C], positions [B, T] -> final hidden states [B, T, C].

        mask [B, 1, T, K] (True = attend) is needed only with padding; without it attention is causal.
        seqlens: embeds [1, T] holds sequences of these lengths back to back, each causal on its own, from
        position 0 (training; the server's prefill, whose cache stores each token at its sequence's slot).
        """
        b, t, _ = embeds.shape
        if mask is None and t > 1 and cache is not None and cache.length > 0:  # causal past a cached prefix
            mask = attention_mask(torch.ones(b, cache.length + t, dtype=torch.bool, device=embeds.device), t)
        cos, sin = self.rotary(positions, embeds.dtype)
        x = embeds
        for layer in self.layers:
            if self.recompute is not None and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, cache, mask, seqlens, use_reentrant=False, context_fn=self.recompute)
            else:
                x = layer(x, cos, sin, cache, mask, seqlens)
        if cache is not None:
            cache.advance(t)
        return self.norm(x)
