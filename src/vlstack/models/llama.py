"""The Llama family (InternVL2-40B/76B: Nous-Hermes-2-Yi-34B, Hermes-2-Theta-Llama-3-70B), and the decoder every
InternVL LLM is a variant of: RMSNorm, RoPE (with its scalings), grouped-query attention, a gated MLP. The other
families (qwen2, qwen3, phi3, internlm2) are this decoder with options from their TextConfig: q/k/v bias, q/k
norms, fused projections, the RoPE scaling. Module names follow transformers' Llama (the layout of checkpoints and
of PEFT adapter keys); a fused projection takes the name transformers gives it (Phi-3's `qkv_proj`).

The forward takes tensors only: a step's tokens back to back [T, C] and its metadata (positions, KV-cache
slot mapping, mask); the KV cache is the engine's, passed in.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import TextConfig
from ..errors import ConfigError
from ..layers.attention import attention
from ..layers.kv_cache import KVCache
from ..layers.lora_routing import using
from ..layers.mlp import GatedMLP
from ..layers.norm import RMSNorm
from ..layers.rotary import KINDS, Rotary, rotate
from ..layers.step import Step

MODEL_TYPE = "llama"
ARCHITECTURE = "LlamaForCausalLM"


def first(d: dict, *names: str, default: Any = None) -> Any:
    """The first of these fields d has (not None): the names a field went by in different releases."""
    for n in names:
        if n in d and d[n] is not None:
            return d[n]
    return default


def rope(t: dict) -> tuple[float, dict | None]:
    """RoPE's base and scaling from a text config (`rope_parameters` in transformers 5, `rope_scaling` and
    `rope_theta` before): (theta, None) for plain RoPE, else the scaling's parameters with `rope_type` set."""
    rp = dict(t.get("rope_parameters") or t.get("rope_scaling") or {})
    theta = float(first(rp, "rope_theta", default=None) or t.get("rope_theta", 10000.0))
    kind = {"su": "longrope"}.get(k := rp.get("rope_type", rp.get("type", "default")) or "default", k)
    if kind not in KINDS:
        raise ConfigError(f"rope type {kind!r} is not supported; supported: {', '.join(KINDS)}")
    if float(first(rp, "partial_rotary_factor", default=t.get("partial_rotary_factor", 1.0))) != 1.0:
        raise ConfigError("partial_rotary_factor other than 1.0 is not supported")
    if kind in ("default", "dynamic"):  # (dynamic changes nothing up to max_position_embeddings)
        return theta, None
    rp = {k: v for k, v in rp.items() if k not in ("rope_theta", "type", "partial_rotary_factor")}
    rp["rope_type"] = kind
    if kind == "longrope":
        rp.setdefault("original_max_position_embeddings", t.get("original_max_position_embeddings"))
        for field_name in ("short_factor", "long_factor", "original_max_position_embeddings"):
            if rp.get(field_name) is None:
                raise ConfigError(f"longrope RoPE needs {field_name!r} in its config")
    need = {
        "linear": ("factor",),
        "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
        "longrope": (),
    }[kind]
    missing = [n for n in need if rp.get(n) is None]
    if missing:
        raise ConfigError(f"{kind} RoPE needs {', '.join(map(repr, missing))} in its config")
    return theta, rp


def base_config(t: dict, model_type: str, **options) -> TextConfig:
    """The fields every family reads alike from its part of config.json (`text_config`, or `llm_config` in the
    original layout); options: the family's own."""
    if t.get("use_sliding_window"):
        raise ConfigError("sliding-window attention (use_sliding_window: true) is not supported")
    hidden, heads = int(t["hidden_size"]), int(t["num_attention_heads"])
    theta, scaling = rope(t)
    return TextConfig(
        model_type=model_type,
        vocab_size=int(t["vocab_size"]),
        hidden_size=hidden,
        num_hidden_layers=int(t["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=int(first(t, "num_key_value_heads", default=heads)),
        intermediate_size=int(t["intermediate_size"]),
        head_dim=int(first(t, "head_dim", default=hidden // heads)),
        rms_norm_eps=float(first(t, "rms_norm_eps", default=1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(first(t, "max_position_embeddings", default=32768)),
        tie_word_embeddings=bool(t.get("tie_word_embeddings", False)),
        hidden_act=str(first(t, "hidden_act", default="silu")),
        eos_token_id=t.get("eos_token_id"),
        bos_token_id=t.get("bos_token_id"),
        pad_token_id=t.get("pad_token_id"),
        **options,
    )


def read_config(t: dict) -> TextConfig:
    bias = bool(t.get("attention_bias", False))
    return base_config(t, MODEL_TYPE, attention_bias=bias, o_bias=bias, mlp_bias=bool(t.get("mlp_bias", False)))


def base_native(t: TextConfig, model_type: str) -> dict:
    """The fields of a transformers `text_config` every family writes alike."""
    scaling = {"rope_theta": t.rope_theta, "rope_type": "default", **(t.rope_scaling or {})}
    return {
        "model_type": model_type,
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "intermediate_size": t.intermediate_size,
        "head_dim": t.head_dim,
        "rms_norm_eps": t.rms_norm_eps,
        "rope_parameters": scaling,
        "rope_theta": t.rope_theta,
        "max_position_embeddings": t.max_position_embeddings,
        "tie_word_embeddings": t.tie_word_embeddings,
        "hidden_act": t.hidden_act,
        "eos_token_id": t.eos_token_id,
        "bos_token_id": t.bos_token_id,
        "pad_token_id": t.pad_token_id,
    }


def native_config(t: TextConfig) -> dict:
    """TextConfig -> the `text_config` of the transformers layout."""
    return {**base_native(t, MODEL_TYPE), "attention_bias": t.attention_bias, "mlp_bias": t.mlp_bias}


class SelfAttention(nn.Module):
    def __init__(self, cfg: TextConfig, index: int):
        super().__init__()
        self.index, self.layout = index, cfg.qkv_layout
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        c, q, kv = cfg.hidden_size, self.n_heads * self.head_dim, self.n_kv * self.head_dim
        if self.layout == "separate":
            self.q_proj = nn.Linear(c, q, bias=cfg.attention_bias)
            self.k_proj = nn.Linear(c, kv, bias=cfg.attention_bias)
            self.v_proj = nn.Linear(c, kv, bias=cfg.attention_bias)
        else:
            self.qkv_proj = nn.Linear(c, q + 2 * kv, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(q, c, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.tp = None  # tensor parallelism (parallel/tp.py): this rank's heads only, o_proj's sums reduced

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [T, C] -> q [T, H, D], k, v [T, Hkv, D]."""
        t, h, kv, d = x.shape[0], self.n_heads, self.n_kv, self.head_dim
        if self.layout == "separate":
            return self.q_proj(x).view(t, h, d), self.k_proj(x).view(t, kv, d), self.v_proj(x).view(t, kv, d)
        y = self.qkv_proj(x)
        if self.layout == "stacked":  # [Q; K; V]
            q, k, v = y.split([h * d, kv * d, kv * d], dim=-1)
            return q.view(t, h, d), k.view(t, kv, d), v.view(t, kv, d)
        y = y.view(t, kv, h // kv + 2, d)  # grouped: per KV head, its query heads, then its key, then its value
        return y[:, :, :-2].reshape(t, h, d), y[:, :, -2], y[:, :, -1]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step: Step, cache: KVCache | None):
        t = x.shape[0]
        q, k, v = self.qkv(x)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        y = attention(rotate(q, cos, sin), rotate(k, cos, sin), v, step, cache, self.index)  # [T, H, D]
        y = self.o_proj(y.reshape(t, -1))  # [T, C] (reshape: a GPU kernel may hand back other strides)
        return y if self.tp is None else self.tp.reduce(y)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, index: int):
        super().__init__()
        self.self_attn = SelfAttention(cfg, index)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, cfg.fused_gate_up, cfg.mlp_bias)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, step: Step, cache: KVCache | None) -> torch.Tensor:
        with using(step.lora):  # (a layer recomputed in backward is called with its step: the same route)
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, step, cache)
            return x + self.mlp(self.post_attention_layernorm(x))


def rotary(cfg: TextConfig) -> Rotary:
    return Rotary(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)


class LanguageModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = rotary(cfg)
        self.checkpointing = False  # training keeps only each layer's input and recomputes the layer in backward

    def forward(
        self, embeds: torch.Tensor, step: Step, cache: KVCache | None = None, span: range | None = None
    ) -> torch.Tensor:
        """embeds [T, C] of the step's sequences back to back -> final hidden states [T, C]. span: these layers only
        (a pipeline stage's), the final norm only if they end the stack."""
        cos, sin = self.rotary(step, embeds.dtype)  # [T, 1, D]
        x = embeds
        span = span or range(len(self.layers))
        for layer in (self.layers[i] for i in span):
            if self.checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, step, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, step, cache)
        return self.norm(x) if span.stop == len(self.layers) else x
