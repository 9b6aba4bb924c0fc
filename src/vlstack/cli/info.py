"""`vlstack info`: describe a checkpoint: architecture, parameters, image tokens."""

from __future__ import annotations

import argparse


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe a checkpoint: architecture, parameters, image tokens")
    p.add_argument("model", nargs="?", default="tiny")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..api import load
    from ..models import family

    vlm = load(args.model, device="cpu", dtype="float32")
    cfg, model = vlm.cfg, vlm.model
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    v, t = cfg.vision, cfg.text
    rows = [
        ("checkpoint", str(vlm.directory)),
        ("architecture", f"InternVL: InternViT -> pixel shuffle + MLP -> {family(t.model_type).ARCHITECTURE}"),
        ("chat template", cfg.template or "the checkpoint's own (jinja)"),
        ("V2PE delta", f"{cfg.v2pe_delta:g}"),
        (
            "vision",
            f"{v.num_hidden_layers} layers, width {v.hidden_size}, {v.num_attention_heads} heads, "
            f"MLP {v.intermediate_size}, {v.norm_type}, tile {v.image_size}, patch {v.patch_size}",
        ),
        (
            "language",
            f"{t.num_hidden_layers} layers, width {t.hidden_size}, {t.num_attention_heads} heads / "
            f"{t.num_key_value_heads} KV heads, MLP {t.intermediate_size}, vocab {t.vocab_size}, "
            f"{'tied' if t.tie_word_embeddings else 'untied'} embeddings, context {t.max_position_embeddings}",
        ),
        ("image tokens per tile", str(cfg.tokens_per_tile)),
        (
            "tiles per image",
            f"{cfg.min_tiles}..{cfg.max_tiles}" + (" + thumbnail" if cfg.use_thumbnail else ""),
        ),
        ("parameters: vision", f"{count(model.vision_tower):,}"),
        ("parameters: projector", f"{count(model.multi_modal_projector):,}"),
        (
            "parameters: language",
            f"{count(model.language_model) + (0 if t.tie_word_embeddings else count(model.lm_head)):,}",
        ),
        ("parameters: total", f"{count(model):,}"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, val in rows:
        print(f"{k:<{width}}  {val}")
