"""A checkpoint's config.json, read in either layout, and the transformers-native one vlstack writes.

Two layouts exist in the wild:
- transformers-native (`model_type: internvl`): `vision_config` + `text_config`, as the `-hf` releases
  and `save_pretrained` write it;
- original OpenGVLab (`model_type: internvl_chat`): `vision_config` + `llm_config`, `select_layer`,
  `force_image_size`, `ps_version`, `template`, ...
Field names also drift between transformers versions (`rope_theta` vs `rope_parameters`,
`torch_dtype` vs `dtype`): every reader here accepts both. The LLM's part is its family's to read and write.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..config import TextConfig, VisionConfig, VLMConfig, check_v2pe
from ..errors import ConfigError
from ..layers.activations import ACTIVATIONS
from . import family
from .llama import first


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
    acts = {
        "text_config.hidden_act": cfg.text.hidden_act,
        "vision_config.hidden_act": cfg.vision.hidden_act,
        "projector_hidden_act": cfg.projector_hidden_act,
    }
    for where, act in acts.items():
        if act not in ACTIVATIONS:
            raise ConfigError(f"{where} {act!r} is not supported; choose one of {sorted(ACTIVATIONS)}")
    return cfg


def to_native(cfg: VLMConfig) -> dict[str, Any]:
    """The transformers-native config.json (`model_type: internvl`)."""
    v, t = cfg.vision, cfg.text
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
        "image_token_id": cfg.image_token_id,
        "image_seq_length": cfg.tokens_per_tile,
        "downsample_ratio": cfg.downsample_ratio,
        "vision_feature_layer": cfg.vision_feature_layer,
        "vision_feature_select_strategy": "default",
        "projector_hidden_act": cfg.projector_hidden_act,
        "tie_word_embeddings": t.tie_word_embeddings,
        "dtype": cfg.dtype,
        **({"quantization_config": cfg.quantization} if cfg.quantization else {}),
    }


def _side(x: Any) -> int:
    """image_size / patch_size come as an int or as [h, w]; tiles are square."""
    if isinstance(x, (list, tuple)):
        if len(set(x)) != 1:
            raise ConfigError(f"non-square size {list(x)} is not supported (tiles are square)")
        return int(x[0])
    return int(x)


def _text_config(t: dict) -> TextConfig:
    """The language model's config, read by its family."""
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
        raise ConfigError(
            f"rope_pos_id_version {raw['rope_pos_id_version']!r} is not supported for inference "
            "(default, or v2pe_fix with rope_pos_id_stride)"
        )
    return check_v2pe(float(raw["rope_pos_id_stride"]) / 256)
