"""Model configs, read from a checkpoint's config.json in either layout.

Two layouts exist in the wild:
- transformers-native (`model_type: internvl`): `vision_config` + `text_config`, as the `-hf` releases
  and `save_pretrained` write it;
- original OpenGVLab (`model_type: internvl_chat`): `vision_config` + `llm_config`, `select_layer`,
  `force_image_size`, `ps_version`, `template`, ...
Field names also drift between transformers versions (`rope_theta` vs `rope_parameters`,
`torch_dtype` vs `dtype`): every reader here accepts both.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, VLStackError
from .layers.activations import ACTIVATIONS


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
    quantization: dict | None = None  # config.json's quantization_config (compress/quantize.py), as written

    @property
    def tokens_per_tile(self) -> int:
        """Visual tokens each tile becomes: (image_size / patch)² × downsample_ratio²."""
        return int(self.vision.patches * self.downsample_ratio**2)

    def to_native(self) -> dict[str, Any]:
        """The transformers-native config.json (`model_type: internvl`)."""
        v, t = self.vision, self.text
        from .models import family  # (the families read and write their own part of the config)

        text = family(t.model_type).native_config(t)
        vision = {
            "model_type": "internvl_vision",
            "hidden_size": v.hidden_size,
            "num_hidden_layers": v.num_hidden_layers,
            "num_attention_heads": v.num_attention_heads,
            "intermediate_size": v.intermediate_size,
            "image_size": [v.image_size, v.image_size],
            "patch_size": [v.patch_size, v.patch_size],
            "num_channels": v.num_channels,
            "norm_type": v.norm_type,
            "layer_norm_eps": v.layer_norm_eps,
            "attention_bias": v.attention_bias,
            "use_qk_norm": v.use_qk_norm,
            "use_mean_pooling": v.use_mean_pooling,
            "hidden_act": v.hidden_act,
        }
        return {
            "architectures": ["InternVLForConditionalGeneration"],
            "model_type": "internvl",
            "vision_config": vision,
            "text_config": text,
            "image_token_id": self.image_token_id,
            "image_seq_length": self.tokens_per_tile,
            "downsample_ratio": self.downsample_ratio,
            "vision_feature_layer": self.vision_feature_layer,
            "vision_feature_select_strategy": "default",
            "projector_hidden_act": self.projector_hidden_act,
            "tie_word_embeddings": t.tie_word_embeddings,
            "dtype": self.dtype,
            **({"quantization_config": self.quantization} if self.quantization else {}),
        }

    def summary(self) -> dict[str, Any]:
        return asdict(self)


def first(d: dict, *names: str, default: Any = None) -> Any:
    """The first of these fields d has (not None): the names a field went by in different releases."""
    for n in names:
        if n in d and d[n] is not None:
            return d[n]
    return default


def _side(x: Any) -> int:
    """image_size / patch_size come as an int or as [h, w]; tiles are square."""
    if isinstance(x, (list, tuple)):
        if len(set(x)) != 1:
            raise ConfigError(f"non-square size {list(x)} is not supported (tiles are square)")
        return int(x[0])
    return int(x)


def rope(t: dict) -> tuple[float, dict | None]:
    """RoPE's base and scaling from a text config (`rope_parameters` in transformers 5, `rope_scaling` and
    `rope_theta` before): (theta, None) for plain RoPE, else the scaling's parameters with `rope_type` set."""
    from .layers.rotary import KINDS

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
    need = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
            "original_max_position_embeddings"), "longrope": ()}[kind]  # fmt: skip
    missing = [n for n in need if rp.get(n) is None]
    if missing:
        raise ConfigError(f"{kind} RoPE needs {', '.join(map(repr, missing))} in its config")
    return theta, rp


def _text_config(t: dict) -> TextConfig:
    """The language model's config, read by its family."""
    from .models import family

    return family(t.get("model_type") or "", (t.get("architectures") or [None])[0]).read_config(t)


def _vision_config(v: dict, image_size: Any = None) -> VisionConfig:
    return VisionConfig(
        hidden_size=int(v["hidden_size"]),
        num_hidden_layers=int(v["num_hidden_layers"]),
        num_attention_heads=int(v["num_attention_heads"]),
        intermediate_size=int(v["intermediate_size"]),
        image_size=_side(image_size or v.get("image_size", 448)),
        patch_size=_side(v.get("patch_size", 14)),
        num_channels=int(v.get("num_channels", 3)),
        norm_type=str(v.get("norm_type", "layer_norm")),
        layer_norm_eps=float(v.get("layer_norm_eps", 1e-6)),
        attention_bias=bool(first(v, "attention_bias", "qkv_bias", default=False)),
        use_qk_norm=bool(first(v, "use_qk_norm", "qk_normalization", default=False)),
        use_mean_pooling=bool(v.get("use_mean_pooling", True)),
        hidden_act=str(v.get("hidden_act", "gelu")),
    )


def _v2pe(raw: dict) -> float:
    """V2PE's delta from InternVL's training config: `rope_pos_id_version: v2pe_fix` with `rope_pos_id_stride`,
    the positions an image tile's tokens span (its code divides by 256 tokens a tile)."""
    if raw.get("rope_pos_id_version", "default") in ("default", None):
        return 1.0
    if raw["rope_pos_id_version"] != "v2pe_fix" or not raw.get("rope_pos_id_stride"):
        raise ConfigError(f"rope_pos_id_version {raw['rope_pos_id_version']!r} is not supported for inference "
                          "(default, or v2pe_fix with rope_pos_id_stride)")  # fmt: skip
    return check_v2pe(float(raw["rope_pos_id_stride"]) / 256)


def check_v2pe(delta: float) -> float:
    if not 0 < delta <= 1:
        raise ConfigError(f"the V2PE delta must be in (0, 1] (got {delta})")
    return delta


def parse_config(raw: dict) -> VLMConfig:
    """Build a VLMConfig from a config.json dict of either layout; ConfigError names what is wrong."""
    try:
        kind = raw.get("model_type")
        dtype = str(first(raw, "dtype", "torch_dtype", default="bfloat16"))
        if kind == "internvl":
            cfg = VLMConfig(
                vision=_vision_config(raw["vision_config"]),
                text=_text_config(raw["text_config"]),
                image_token_id=int(raw.get("image_token_id", 151667)),
                downsample_ratio=float(raw.get("downsample_ratio", 0.5)),
                vision_feature_layer=int(raw.get("vision_feature_layer", -1)),
                projector_hidden_act=str(raw.get("projector_hidden_act", "gelu")),
                dtype=dtype,
            )
            if raw.get("vision_feature_select_strategy", "default") != "default":
                raise ConfigError("only vision_feature_select_strategy 'default' (drop the class token) is supported")
        elif kind == "internvl_chat":
            vision = _vision_config(raw["vision_config"], raw.get("force_image_size"))
            cfg = VLMConfig(
                vision=vision,
                text=_text_config(raw["llm_config"]),
                image_token_id=int(raw.get("img_context_token_id") or 151667),
                downsample_ratio=float(raw.get("downsample_ratio", 0.5)),
                vision_feature_layer=int(raw.get("select_layer", -1)),
                pixel_shuffle_version=str(raw.get("ps_version", "v2")),
                dtype=dtype,
                min_tiles=int(raw.get("min_dynamic_patch", 1)),
                max_tiles=int(raw.get("max_dynamic_patch", 12)) if raw.get("dynamic_image_size", True) else 1,
                use_thumbnail=bool(raw.get("use_thumbnail", True)),
                layout="internvl_chat",
                template=raw.get("template"),
                v2pe_delta=_v2pe(raw),
            )
        else:
            raise ConfigError(
                f"model_type {kind!r} is not an InternVL checkpoint; expected 'internvl' (transformers layout) "
                "or 'internvl_chat' (original OpenGVLab layout)"
            )
    except KeyError as e:
        raise ConfigError(f"config.json is missing the field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.json has a malformed field: {e}") from None
    cfg.quantization = raw.get("quantization_config")
    if cfg.pixel_shuffle_version not in ("v1", "v2"):
        raise ConfigError(f"ps_version {cfg.pixel_shuffle_version!r} is not supported (v1 or v2)")
    if cfg.vision.norm_type not in ("layer_norm", "rms_norm"):
        raise ConfigError(f"vision norm_type {cfg.vision.norm_type!r} is not supported (layer_norm or rms_norm)")
    acts = {"text_config.hidden_act": cfg.text.hidden_act, "vision_config.hidden_act": cfg.vision.hidden_act,
            "projector_hidden_act": cfg.projector_hidden_act}  # fmt: skip
    for where, act in acts.items():
        if act not in ACTIVATIONS:
            raise ConfigError(f"{where} {act!r} is not supported; choose one of {sorted(ACTIVATIONS)}")
    return cfg


def read_yaml(path: str | Path, what: str, error: type[VLStackError] = ConfigError) -> Any:
    """The contents of an operator's YAML (or JSON) file, or `error` naming what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start + 1})") from None
    except (yaml.YAMLError, RecursionError) as e:
        why = " ".join(str(e).split()) or "nested too deeply"  # (on one line)
        raise error(f"{path}: not valid YAML or JSON: {why}") from None
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e})") from None


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


def read_config(directory: str | Path) -> VLMConfig:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{directory} has no config.json; is it an InternVL checkpoint directory?")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} does not hold a JSON object")
    return parse_config(raw)
