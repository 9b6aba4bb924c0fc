"""The Qwen2 family, the LLM of InternVL2.5/3: its config, and its decoder (RMSNorm, RoPE, grouped-query
attention with q/k/v bias, SwiGLU MLP). Module names follow transformers' Qwen2 (the layout of checkpoints and
of PEFT adapter keys).

The forward takes tensors only: a step's tokens back to back [T, C] and its metadata (positions, KV-cache
slot mapping, mask); the KV cache is the engine's, passed in.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import TextConfig, first, rope_theta
from ..engine.kv_cache import KVCache
from ..engine.metadata import Step
from ..errors import ConfigError
from ..layers.attention import attention
from ..layers.mlp import GatedMLP
from ..layers.norm import RMSNorm
from ..layers.rotary import Rotary, rotate

MODEL_TYPE = "qwen2"


def read_config(t: dict) -> TextConfig:
    """Its part of config.json (`text_config`, or `llm_config` in the original layout) -> TextConfig."""
    if t.get("use_sliding_window"):
        raise ConfigError("sliding-window attention (use_sliding_window: true) is not supported")
    hidden, heads = int(t["hidden_size"]), int(t["num_attention_heads"])
    return TextConfig(
        model_type=MODEL_TYPE,
        vocab_size=int(t["vocab_size"]),
        hidden_size=hidden,
        num_hidden_layers=int(t["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(first(t, "num_key_value_heads", default=heads)),
        intermediate_size=int(t["intermediate_size"]),
        head_dim=int(first(t, "head_dim", default=hidden // heads)),
        rms_norm_eps=float(first(t, "rms_norm_eps", default=1e-6)),
        rope_theta=rope_theta(t),
        max_position_embeddings=int(first(t, "max_position_embeddings", default=32768)),
        tie_word_embeddings=bool(t.get("tie_word_embeddings", False)),
        attention_bias=bool(t.get("attention_bias", True)),
        hidden_act=str(first(t, "hidden_act", default="silu")),
        eos_token_id=t.get("eos_token_id"),
    )


def native_config(t: TextConfig) -> dict:
    """TextConfig -> the `text_config` of the transformers layout."""
    return {
        "model_type": MODEL_TYPE,
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "intermediate_size": t.intermediate_size,
        "head_dim": t.head_dim,
        "rms_norm_eps": t.rms_norm_eps,
        "rope_parameters": {"rope_theta": t.rope_theta, "rope_type": "default"},
        "rope_theta": t.rope_theta,
        "max_position_embeddings": t.max_position_embeddings,
        "tie_word_embeddings": t.tie_word_embeddings,
        "attention_bias": t.attention_bias,
        "hidden_act": t.hidden_act,
        "eos_token_id": t.eos_token_id,
        "use_sliding_window": False,
    }


class SelfAttention(nn.Module):
    def __init__(self, cfg: TextConfig, index: int):
        super().__init__()
        self.index = index
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step: Step, cache: KVCache | None):
        t = x.shape[0]
        q = rotate(self.q_proj(x).view(t, self.n_heads, self.head_dim), cos, sin)  # [T, H, D]
        k = rotate(self.k_proj(x).view(t, self.n_kv, self.head_dim), cos, sin)  # [T, Hkv, D]
        v = self.v_proj(x).view(t, self.n_kv, self.head_dim)
        y = attention(q, k, v, step, cache, self.index)  # [T, H, D] (a GPU kernel may hand back other strides)
        return self.o_proj(y.reshape(t, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, index: int):
        super().__init__()
        self.self_attn = SelfAttention(cfg, index)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, step: Step, cache: KVCache | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, step, cache)
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

    def forward(self, embeds: torch.Tensor, step: Step, cache: KVCache | None = None) -> torch.Tensor:
        """embeds [T, C] of the step's sequences back to back -> final hidden states [T, C]."""
        cos, sin = self.rotary(step.positions, embeds.dtype)  # [T, 1, D]
        x = embeds
        for layer in self.layers:
            if self.recompute is not None and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, step, cache, use_reentrant=False, context_fn=self.recompute)
            else:
                x = layer(x, cos, sin, step, cache)
        return self.norm(x)
