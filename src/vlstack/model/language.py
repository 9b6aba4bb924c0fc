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
from .vision import RMSNorm


class KVCache:
    """Keys and values of every layer for a batch of sequences, preallocated to max_len positions.

    The language model writes the new positions of each layer with `update` and moves `length` on
    once all layers have run.
    """

    def __init__(self, cfg: TextConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, B, Hkv, Tmax, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [B, Hkv, T, D] for the next T positions -> all keys and values so far [B, Hkv, length+T, D]."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        """The last update's positions are now part of every sequence."""
        self.length += n


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
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
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
        else:
            causal = mask is None and t > 1
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


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
