"""`vlstack chat`: answer one question, optionally about images."""

from __future__ import annotations

import argparse
import sys

from . import options


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="answer one question, optionally about images")
    p.add_argument("question")
    options.model(p)
    p.add_argument("--image", action="append", help="image file; repeat for several")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    options.device(p)
    options.v2pe(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..api import load

    vlm = load(args.model, device=args.device, dtype=args.dtype, v2pe_delta=args.v2pe_delta)
    gen = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    for piece in vlm.stream(args.question, images=args.image or None, system=args.system, **gen):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
