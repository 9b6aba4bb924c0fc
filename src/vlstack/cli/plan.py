"""`vlstack plan`: what a model needs: weights, KV cache, training activations, the TP to serve it."""

from __future__ import annotations

import argparse
from pathlib import Path


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="what a model needs: weights, KV cache, training activations, the TP to serve it")
    p.add_argument("--model", default="tiny", help="checkpoint directory (its config.json is enough)")
    p.add_argument("--gpus", default="1xH100-80GB", help="COUNTxKIND, e.g. 2xA100-80GB, 4xH100, 8x24GB")
    p.add_argument("--quantize", default=None, choices=["int8", "int4"], help="the LLM's layers quantised")
    p.add_argument("--context", type=int, default=8192, help="tokens per request (prompt + answer)")
    p.add_argument("--concurrency", type=int, default=64, help="requests at once")
    p.add_argument("--train-tokens", type=int, default=8192, help="tokens a training step (LoRA, checkpointing)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..models.config_json import read_config
    from ..plan import describe, plan
    from ..tiny import ASSETS

    cfg = read_config(ASSETS if args.model == "tiny" else Path(args.model))  # (the config alone: no weights read)
    p = plan(cfg, args.gpus, args.quantize, args.context, args.concurrency, args.train_tokens)
    print(describe(p, args.context, args.concurrency, args.train_tokens))
