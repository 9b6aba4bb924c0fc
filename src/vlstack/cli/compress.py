"""`vlstack compress`: prune, distil and quantise a model (P-KD-Q) into a new checkpoint."""

from __future__ import annotations

import argparse

from . import options


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compress", help="prune, distil and quantise a model (P-KD-Q) into a new checkpoint")
    options.model(p)
    p.add_argument("--adapter", default=None, help="a PEFT adapter merged into the model first")
    p.add_argument("--config", required=True, help="YAML: stages: [- quantize: {bits: 8}, ...]")
    p.add_argument("--output", required=True, help="a new directory for the compressed checkpoint")
    p.add_argument("--resume", action="store_true", help="continue an interrupted distillation")
    options.device(p, with_dtype=False, default="cpu")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..adapters import merge_adapter
    from ..api import load
    from ..compress import compress, read_report, read_stages

    stages, report = read_stages(args.config), read_report(args.config)  # (checked before anything loads)
    vlm = load(args.model, device=args.device or "cpu", dtype="float32")
    if args.adapter:  # the adapter is merged first
        vlm.load_adapter("merge", args.adapter)
        merge_adapter(vlm.model, "merge")
        vlm.adapters.clear()
    out = compress(vlm, stages, args.output, resume=args.resume, report=report)
    print((out / "compress.md").read_text(), end="")
    print(f"compressed checkpoint written to {out}")
