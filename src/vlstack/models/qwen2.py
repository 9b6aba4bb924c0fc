"""The Qwen2 family, the LLM of InternVL2-1B and InternVL2.5/3: the Llama decoder with a bias on q/k/v (none on
o_proj or the MLP)."""

from __future__ import annotations

from ..config import TextConfig
from .llama import LanguageModel, base_config, base_native

MODEL_TYPE = "qwen2"
ARCHITECTURE = "Qwen2ForCausalLM"
__all__ = ["LanguageModel", "native_config", "read_config"]


def read_config(t: dict) -> TextConfig:
    return base_config(t, MODEL_TYPE, attention_bias=True)


def native_config(t: TextConfig) -> dict:
    return {**base_native(t, MODEL_TYPE), "use_sliding_window": False}
