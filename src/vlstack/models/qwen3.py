"""The Qwen3 family, the LLM of InternVL3.5 (dense): the Llama decoder with an RMSNorm over each query and key
head before RoPE (`q_norm`, `k_norm`), no q/k/v bias unless the config says so, and its own head_dim."""

from __future__ import annotations

from ..config import TextConfig
from .llama import LanguageModel, base_config, base_native

MODEL_TYPE = "qwen3"
ARCHITECTURE = "Qwen3ForCausalLM"
__all__ = ["LanguageModel", "native_config", "read_config"]


def read_config(t: dict) -> TextConfig:
    bias = bool(t.get("attention_bias", False))
    return base_config(t, MODEL_TYPE, attention_bias=bias, o_bias=bias, qk_norm=True)


def native_config(t: TextConfig) -> dict:
    return {**base_native(t, MODEL_TYPE), "attention_bias": t.attention_bias, "use_sliding_window": False}
