"""`vlstack synth`: draw a synthetic dataset of charts or documents with computed answers."""

from __future__ import annotations

import argparse
import sys


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="draw a synthetic dataset of charts or documents with computed answers")
    p.add_argument("kind", choices=["charts", "documents"])
    p.add_argument("--n", type=int, default=1000, help="images (each with several questions)")
    p.add_argument("--out", required=True, help="a new directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=448, help="the images' side in pixels")
    p.add_argument("--test-fraction", type=float, default=0.2, help="images for the test split (held-out templates)")
    p.add_argument(
        "--questions",
        choices=["all", "visual"],
        default="all",
        help="visual: only what is answered by looking (counts, colours, positions, ...)",
    )
    p.add_argument(
        "--only",
        default=None,
        help="comma-separated chart or document types (bar,line,pie / invoice,receipt,form,table)",
    )
    p.add_argument(
        "--conversations", action="store_true", help="train.jsonl: one conversation per image, its questions as turns"
    )
    p.add_argument(
        "--line-width",
        type=float,
        default=2.0,
        help="charts: the line in pixels at 224 px (wider: a warm-up set for its shape)",
    )
    p.add_argument(
        "--decorate",
        action="store_true",
        help="charts: strokes with no data (page border, reference lines) on training charts",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..synth import synthesize

    def progress(done: int, total: int) -> None:
        if done % 100 == 0 or done == total:
            end = "\n" if done == total else ""
            print(f"\r{args.kind}: {done}/{total} images", end=end, file=sys.stderr, flush=True)

    only = [x.strip() for x in args.only.split(",") if x.strip()] if args.only else None
    record = synthesize(
        args.kind,
        args.n,
        args.out,
        args.seed,
        args.size,
        args.test_fraction,
        args.questions,
        only,
        progress,
        args.conversations,
        args.line_width,
        args.decorate,
    )
    counts = {split: sum(c.values()) for split, c in record["examples"].items()}
    print(
        f"{args.out}: {counts['train']} training and {counts['test']} test questions about {args.n} images "
        f"(test templates held out: {', '.join(record['templates']['test']) or 'none'})"
    )
