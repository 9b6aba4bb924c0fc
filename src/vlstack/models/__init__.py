"""The model families. An LLM family is one module here that owns its part of a checkpoint: MODEL_TYPE (its
config's model_type), read_config (its config.json part -> TextConfig, refusing what it does not support),
native_config (the reverse, for the transformers layout vlstack writes) and LanguageModel (its decoder, built
on layers/). InternViT and the InternVL wrapper (projector, merging the visual embeddings) are shared by all."""

from __future__ import annotations

from types import ModuleType

from ..errors import ConfigError
from . import qwen2

FAMILIES: dict[str, ModuleType] = {qwen2.MODEL_TYPE: qwen2}


def family(model_type: str, architecture: str | None = None) -> ModuleType:
    """The module of the LLM family of this model_type; a clear error naming the supported ones otherwise."""
    if model_type not in FAMILIES:
        what = model_type or architecture or "unknown"
        raise ConfigError(
            f"language model {what!r} is not supported; vlstack supports InternVL checkpoints whose LLM is one of: "
            f"{', '.join(FAMILIES)} (InternVL2.5/3 1B-78B with Qwen2/Qwen2.5)"
        )
    return FAMILIES[model_type]
