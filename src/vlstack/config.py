"""Model configs as data: the shapes and options of the vision tower, the language model and the VLM around them.

Reading them from a checkpoint's config.json (either layout) and writing the native one is models/config_json.py's;
the checks here are of values alone."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import ConfigError


@dataclass
class VisionConfig:
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    norm_type: str = "layer_norm"  # or "rms_norm"
    layer_norm_eps: float = 1e-6
    attention_bias: bool = True
    use_qk_norm: bool = False
    use_mean_pooling: bool = True  # True: no final norm after the encoder
    hidden_act: str = "gelu"

    @property
    def patches(self) -> int:
        """Patches of one tile (the encoder adds a class token): (image_size / patch_size)²."""
        return (self.image_size // self.patch_size) ** 2


@dataclass
class TextConfig:
    """The language model's shape; model_type names its family (models/: one file each)."""

    model_type: str = "qwen2"
    vocab_size: int = 151674
    hidden_size: int = 896
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    intermediate_size: int = 4864
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True
    attention_bias: bool = True  # q/k/v bias (Qwen2 has it)
    hidden_act: str = "silu"
    eos_token_id: int | list[int] | None = None
    o_bias: bool = False  # the attention output's bias (Llama's attention_bias covers it too)
    mlp_bias: bool = False
    qk_norm: bool = False  # RMSNorm over each query and key head before RoPE (Qwen3)
    qkv_layout: str = "separate"  # q/k/v_proj; "stacked": one qkv_proj [Q; K; V] (Phi-3); "grouped": one
    # qkv_proj whose rows go per KV head: its query heads, its key, its value (InternLM2's wqkv)
    fused_gate_up: bool = False  # one gate_up_proj [gate; up] (Phi-3)
    rope_scaling: dict | None = None  # the RoPE scaling and its parameters (layers/rotary.py), None: plain
    bos_token_id: int | None = None  # (kept for the config vlstack writes)
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    def kv_shape(self, slots: int, max_len: int) -> tuple[int, int, int, int, int]:
        """The KV cache's keys (and values) for `slots` sequences of `max_len` positions: [L, S, Tmax, Hkv, D]."""
        return self.num_hidden_layers, slots, max_len, self.num_key_value_heads, self.head_dim


@dataclass
class VLMConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    image_token_id: int = 151667
    downsample_ratio: float = 0.5
    vision_feature_layer: int = -1
    projector_hidden_act: str = "gelu"
    pixel_shuffle_version: str = "v2"
    dtype: str = "bfloat16"
    min_tiles: int = 1
    max_tiles: int = 12
    use_thumbnail: bool = True
    layout: str = "internvl"  # the config.json it came from: "internvl" or "internvl_chat" (original)
    template: str | None = None  # the original layout's chat template, by name (templates.py)
    v2pe_delta: float = 1.0  # V2PE: the position step of an image's tokens (1: every token one position)
    quantization: dict | None = None  # config.json's quantization_config (layers/quant.py), as written

    @property
    def tokens_per_tile(self) -> int:
        """Visual tokens each tile becomes: (image_size / patch)² × downsample_ratio²."""
        return int(self.vision.patches * self.downsample_ratio**2)

    def summary(self) -> dict[str, Any]:
        return asdict(self)


def check_v2pe(delta: float) -> float:
    if not 0 < delta <= 1:
        raise ConfigError(f"the V2PE delta must be in (0, 1] (got {delta})")
    return delta


def check_fields(options: Any, where: str) -> None:
    """Each field of a dataclass of options against its annotation, or ConfigError naming the first that is not:
    int (not a bool, not a float), float (an int or a float, finite), bool, str, a list or tuple of str, each maybe
    None. Other annotations are left to the caller."""
    import dataclasses
    import math
    import typing

    hints = typing.get_type_hints(type(options))
    for f in dataclasses.fields(options):
        value, kind = getattr(options, f.name), hints[f.name]
        args = set(typing.get_args(kind))
        if value is None and type(None) in args:
            continue
        base = (args - {type(None)}).pop() if len(args - {type(None)}) == 1 else kind
        what = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}.get(base)
        if base is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif base is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        elif base in (bool, str):
            ok = isinstance(value, base)
        elif typing.get_origin(base) in (list, tuple) and typing.get_args(base)[0] is str:
            ok, what = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value), "a list of strings"
        else:
            continue
        if not ok:
            raise ConfigError(f"{where} {f.name} must be {what} (got {value!r})")
