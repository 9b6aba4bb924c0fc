"""The model families. An LLM family is one module here that owns its part of a checkpoint: MODEL_TYPE (its
config's model_type) and ARCHITECTURE, read_config (its config.json part -> TextConfig, refusing what it does not
support), native_config (the reverse, for the transformers layout vlstack writes), LanguageModel (its decoder: the
Llama decoder of llama.py with the family's options), and where the family needs them: RENAMES (its original
layout's module names -> ours), LORA_ALIASES (PEFT's target names for it -> ours), native_state (our weights ->
the transformers layout's). InternViT and the InternVL wrapper (projector, visual embeddings) are shared by all."""

from __future__ import annotations

from types import ModuleType

import torch

from ..config import TextConfig
from ..errors import ConfigError
from . import internlm2, llama, phi3, qwen2, qwen3

FAMILIES: dict[str, ModuleType] = {m.MODEL_TYPE: m for m in (qwen2, qwen3, llama, phi3, internlm2)}
ARCHITECTURES = {m.ARCHITECTURE: m for m in FAMILIES.values()}


def family(model_type: str, architecture: str | None = None) -> ModuleType:
    """The module of the LLM family of this model_type (or architecture); a clear error naming the supported ones
    otherwise."""
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if architecture in ARCHITECTURES:
        return ARCHITECTURES[architecture]
    what = model_type or architecture or "unknown"
    raise ConfigError(
        f"language model {what!r} is not supported; vlstack supports InternVL checkpoints whose LLM is one of: "
        f"{', '.join(FAMILIES)} (InternVL2, 2.5, 3 and dense 3.5 releases)"
    )


def _rename(name: str, pairs: tuple[tuple[str, str], ...], forward: bool) -> str:
    """Replace whole dotted segments: each pair's first by its second (forward) or back."""
    dotted = f".{name}."
    for a, b in pairs:
        src, dst = (a, b) if forward else (b, a)
        dotted = dotted.replace(f".{src}.", f".{dst}.")
    return dotted[1:-1]


def our_name(fam: ModuleType, name: str) -> str:
    """A name in the family's original layout (after the generic prefix mapping) -> ours."""
    return _rename(name, getattr(fam, "RENAMES", ()), True)


def original_name(fam: ModuleType, name: str) -> str:
    """Our name -> the family's original layout's."""
    return _rename(name, getattr(fam, "RENAMES", ()), False)


def native_state(t: TextConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> the transformers layout's (the same, except where a family packs differently)."""
    convert = getattr(family(t.model_type), "native_state", None)
    return state if convert is None else convert(state, t)
