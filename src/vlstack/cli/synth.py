"""`vlstack synth`: draw a synthetic dataset of charts or documents with computed answers."""

from __future__ import annotations

import argparse
import sys

from ..errors import ConfigError
from . import options


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="draw a synthetic dataset of charts or documents with computed answers, or make preference pairs "
        "from a model's own answers (preferences)",
    )
    p.add_argument("kind", choices=["charts", "documents", "preferences"])
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
    preferences = p.add_argument_group("preferences (pairs from the model's own answers: synth/preferences.py)")
    options.model(preferences)
    preferences.add_argument("--adapter", default=None, help="NAME=DIR: sample with this PEFT adapter")
    preferences.add_argument("--data", default=None, help="questions with answers: a VLMEvalKit .tsv or vlstack .jsonl")
    preferences.add_argument("--bench", default="vqa", choices=["mmmu", "docvqa", "chartqa", "vqa"])
    preferences.add_argument("--metric", default=None, choices=["exact", "anls", "relaxed", "choice", "mmmu"])
    preferences.add_argument("--samples", type=int, default=8, help="answers sampled per question")
    preferences.add_argument("--temperature", type=float, default=1.0)
    preferences.add_argument("--max-new-tokens", type=int, default=64)
    preferences.add_argument("--batch", type=int, default=16, help="questions sampled together")
    options.device(preferences)
    p.set_defaults(func=run)


def run_preferences(args: argparse.Namespace) -> None:
    from ..api import load
    from ..synth.preferences import make_preferences

    if not args.data:
        raise ConfigError("vlstack synth preferences needs --data (questions with their answers)")
    adapter = None
    if args.adapter:
        adapter, sep, path = args.adapter.partition("=")
        if not sep or not adapter or not path:
            raise ConfigError(f"--adapter takes NAME=DIR (got {args.adapter!r})")
    vlm = load(args.model, device=args.device, dtype=args.dtype)
    if adapter:
        vlm.load_adapter(adapter, path)

    def progress(done: int, total: int) -> None:
        print(
            f"\rpreferences: {done}/{total} questions", end="\n" if done == total else "", file=sys.stderr, flush=True
        )

    summary = make_preferences(
        vlm,
        args.data,
        args.out,
        args.bench,
        args.metric,
        adapter,
        args.samples,
        args.temperature,
        args.max_new_tokens,
        args.seed,
        args.batch,
        progress,
    )
    kept = {c: v["pairs"] for c, v in summary["categories"].items()}
    print(f"{args.out}: {summary['pairs']} pairs ({', '.join(f'{c} {n}' for c, n in kept.items())})")


def run(args: argparse.Namespace) -> None:
    from ..synth import synthesize

    if args.kind == "preferences":
        return run_preferences(args)

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
