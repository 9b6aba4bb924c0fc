"""The Phi-3 family, the LLM of InternVL2-4B (Phi-3-mini-128k): the Llama decoder with q/k/v as one `qkv_proj`
[Q; K; V] and gate/up as one `gate_up_proj` [gate; up] (transformers' and PEFT's names), and LongRoPE, which
rescales every frequency even for short sequences (layers/rotary.py)."""

from __future__ import annotations

from ..config import TextConfig
from ..errors import ConfigError
from .llama import LanguageModel, base_config, base_native

MODEL_TYPE = "phi3"
ARCHITECTURE = "Phi3ForCausalLM"
LORA_ALIASES = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
}  # fmt: skip  (the generic names -> the fused layers holding them)
__all__ = ["LanguageModel", "native_config", "read_config"]


def read_config(t: dict) -> TextConfig:
    cfg = base_config(t, MODEL_TYPE, attention_bias=False, qkv_layout="stacked", fused_gate_up=True)
    window = t.get("sliding_window")
    if window is not None and int(window) < cfg.max_position_embeddings:
        raise ConfigError(f"sliding-window attention ({window} of {cfg.max_position_embeddings}) is not supported")
    for name in ("short_factor", "long_factor"):
        factors = (cfg.rope_scaling or {}).get(name)
        if factors is not None and len(factors) != cfg.head_dim // 2:
            need = cfg.head_dim // 2
            raise ConfigError(f"rope {name} has {len(factors)} values; head_dim {cfg.head_dim} needs {need}")
    return cfg


def native_config(t: TextConfig) -> dict:
    out = base_native(t, MODEL_TYPE)
    if t.rope_scaling and "original_max_position_embeddings" in t.rope_scaling:
        out["original_max_position_embeddings"] = t.rope_scaling["original_max_position_embeddings"]
    return {**out, "sliding_window": None}
