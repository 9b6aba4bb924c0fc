"""`vlstack eval`: score a model (or an adapter) on a benchmark by its official rules."""

from __future__ import annotations

import argparse
import math
import os

from ..errors import ConfigError
from . import options


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="score a model (or an adapter) on a benchmark by its official rules")
    p.add_argument(
        "benchmark",
        choices=["mmmu", "docvqa", "chartqa", "vqa", "report"],
        help="a benchmark; or report DIR...: earlier runs (their --out) side by side",
    )
    p.add_argument("runs", nargs="*", help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help="the benchmark: a VLMEvalKit .tsv or a vlstack .jsonl")
    p.add_argument("--gpu-price", type=float, default=None, help="report: USD per GPU hour, for local runs' cost")
    options.model(p)
    p.add_argument(
        "--adapter",
        action="append",
        default=None,
        help="NAME=DIR: score the model with this PEFT adapter; repeat for several (each a run of its "
        "own, under --out/NAME, with a report of them all); NAME base: the model without one",
    )
    p.add_argument(
        "--metric",
        default=None,
        choices=["exact", "anls", "relaxed", "choice", "mmmu"],
        help="default: the benchmark's (mmmu, anls, relaxed; vqa: exact)",
    )
    p.add_argument("--limit", type=int, default=None, help="the first N items only")
    p.add_argument("--batch", type=int, default=16, help="items generated together")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="an item whose image does not decode is scored as failed (its error in predictions.jsonl) "
        "instead of stopping the run",
    )
    p.add_argument("--best-of", type=int, default=None, help="N: sample N answers per item, keep the critic's best")
    p.add_argument("--critic", default=None, help="with --best-of: a critic adapter of this base (objective: prm)")
    p.add_argument("--temperature", type=float, default=1.0, help="with --best-of: the samples' temperature")
    p.add_argument("--out", default=None, help="directory for summary.json and predictions.jsonl (a rerun resumes)")
    p.add_argument("--api-base", default=None, help="a remote OpenAI-compatible endpoint instead of a local model")
    p.add_argument("--api-model", default=None, help="the endpoint's model name")
    p.add_argument("--api-key-env", default=None, help="the environment variable holding the endpoint's key")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight to the endpoint")
    p.add_argument("--price-in", type=float, default=None, help="USD per million prompt tokens: cost_usd")
    p.add_argument("--price-out", type=float, default=None, help="USD per million completion tokens")
    options.device(p)
    options.v2pe(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from ..api import load
    from ..eval.remote import Endpoint
    from ..eval.runner import evaluate, metric_of

    if args.benchmark == "report":
        from ..eval.report import report

        if args.gpu_price is not None and not (math.isfinite(args.gpu_price) and args.gpu_price >= 0):
            raise ConfigError("--gpu-price must be a finite number >= 0 (USD per hour)")
        out = args.out or "eval/report"
        print(report(args.runs, out, args.gpu_price) + f"\n(written to {out}/report.md and report.png)")
        return
    if args.runs:
        raise ConfigError(f"unexpected argument(s) {' '.join(args.runs)} (only `vlstack eval report` takes runs)")
    if not args.data:
        raise ConfigError(f"vlstack eval {args.benchmark} needs --data (a VLMEvalKit .tsv or a vlstack .jsonl)")
    metric_of(args.benchmark, args.metric)  # (checked before the model loads)
    for name in ("limit", "batch", "max_new_tokens", "concurrency"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    adapters: list[str | None] = [None]
    if args.api_base:  # a remote OpenAI-compatible endpoint
        if not args.api_model:
            raise ConfigError("--api-base needs --api-model (the endpoint's model name)")
        key = None
        if args.api_key_env:
            key = os.environ.get(args.api_key_env)
            if not key:
                raise ConfigError(f"--api-key-env {args.api_key_env}: that environment variable is not set")
        model = Endpoint(args.api_base, args.api_model, key, args.concurrency)
        name = args.api_model
    else:
        model = load(args.model, device=args.device, dtype=args.dtype, v2pe_delta=args.v2pe_delta)
        specs = [(spec, *spec.partition("=")) for spec in args.adapter or []]
        for spec, adapter, sep, path in specs:
            if spec != "base" and (not sep or not adapter or not path):
                raise ConfigError(f"--adapter takes NAME=DIR, or base (got {spec!r})")
        for spec, adapter, _, path in specs:
            if spec != "base":
                model.load_adapter(adapter, path)
        adapters = [None if spec == "base" else adapter for spec, adapter, _, _ in specs] or [None]
        name = "tiny" if args.model == "tiny" else model.name
    best_of = _best_of(args, model)
    one = adapters[0]
    out = args.out or f"eval/{args.benchmark}-{name}{'-' + one if one and len(adapters) == 1 else ''}"
    prices = None
    if args.price_in is not None or args.price_out is not None:
        prices = (args.price_in or 0.0, args.price_out or 0.0)
        if min(prices) < 0 or not all(math.isfinite(p) for p in prices):
            raise ConfigError("--price-in / --price-out must be finite numbers >= 0 (USD per million tokens)")
    runs = [out] if len(adapters) == 1 else [f"{out}/{a or 'base'}" for a in adapters]
    for adapter, run in zip(adapters, runs):
        summary = evaluate(
            model,
            args.benchmark,
            args.data,
            run,
            adapter,
            args.metric,
            args.limit,
            args.batch,
            args.max_new_tokens,
            name=name,
            prices=prices,
            skip_bad_images=args.skip_bad_images,
            best_of=best_of,
        )
        print(
            f"{summary['benchmark']} {summary['model']}: {summary['score']:.1f} ({summary['metric']}, "
            f"n={summary['n']}, {summary['pages_per_s']:.2f} pages/s); {run}/summary.json"
        )
    if len(runs) > 1:
        from ..eval.report import report

        print(report(runs, out))


def _best_of(args: argparse.Namespace, model) -> object:
    """--best-of N --critic DIR: the critic loaded as the adapter "critic" of this base, and how it picks."""
    from ..eval.benchmarks import prompt_text
    from ..eval.runner import BestOf
    from ..train.critic import MAX_BEST_OF, critic_scores

    if args.best_of is None:
        if args.critic:
            raise ConfigError("--critic goes with --best-of N (the answers it chooses between)")
        return None
    if not 2 <= args.best_of <= MAX_BEST_OF or not args.critic or args.api_base:
        raise ConfigError(f"--best-of takes N in [2, {MAX_BEST_OF}] with --critic DIR, on a local model")
    if not 0 < args.temperature <= 2:
        raise ConfigError("--temperature must be in (0, 2] (the samples differ only when it is above 0)")
    model.load_adapter("critic", args.critic)

    def score(item, answers: list[str]) -> list[float]:
        return critic_scores(model, "critic", prompt_text(item), item.images, answers)

    return BestOf(args.best_of, score, args.critic, args.temperature)
