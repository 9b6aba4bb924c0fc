"""The `vlstack` command: chat, serve, train, merge, compress, plan, eval, synth, info."""

from __future__ import annotations

import argparse
import math
import os
import socket
import sys
from pathlib import Path

from . import __version__
from .errors import ConfigError, VLStackError


def cmd_chat(args: argparse.Namespace) -> None:
    from .api import load

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


def cmd_synth(args: argparse.Namespace) -> None:
    from .synth import synthesize

    def progress(done: int, total: int) -> None:
        if done % 100 == 0 or done == total:
            end = "\n" if done == total else ""
            print(f"\r{args.kind}: {done}/{total} images", end=end, file=sys.stderr, flush=True)

    only = [x.strip() for x in args.only.split(",") if x.strip()] if args.only else None
    record = synthesize(args.kind, args.n, args.out, args.seed, args.size, args.test_fraction, args.questions, only,
                        progress, args.conversations, args.line_width, args.decorate)  # fmt: skip
    counts = {split: sum(c.values()) for split, c in record["examples"].items()}
    print(f"{args.out}: {counts['train']} training and {counts['test']} test questions about {args.n} images "
          f"(test templates held out: {', '.join(record['templates']['test']) or 'none'})")  # fmt: skip


def cmd_eval(args: argparse.Namespace) -> None:
    from .api import load
    from .eval.remote import Endpoint
    from .eval.runner import evaluate, metric_of

    if args.benchmark == "report":
        from .eval.report import report

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
    one = adapters[0]
    out = args.out or f"eval/{args.benchmark}-{name}{'-' + one if one and len(adapters) == 1 else ''}"
    prices = None
    if args.price_in is not None or args.price_out is not None:
        prices = (args.price_in or 0.0, args.price_out or 0.0)
        if min(prices) < 0 or not all(math.isfinite(p) for p in prices):
            raise ConfigError("--price-in / --price-out must be finite numbers >= 0 (USD per million tokens)")
    runs = [out] if len(adapters) == 1 else [f"{out}/{a or 'base'}" for a in adapters]
    for adapter, run in zip(adapters, runs):
        summary = evaluate(model, args.benchmark, args.data, run, adapter, args.metric, args.limit, args.batch,
                           args.max_new_tokens, name=name, prices=prices,
                           skip_bad_images=args.skip_bad_images)  # fmt: skip
        print(f"{summary['benchmark']} {summary['model']}: {summary['score']:.1f} ({summary['metric']}, "
              f"n={summary['n']}, {summary['pages_per_s']:.2f} pages/s); {run}/summary.json")  # fmt: skip
    if len(runs) > 1:
        from .eval.report import report

        print(report(runs, out))


def cmd_info(args: argparse.Namespace) -> None:
    from .api import load
    from .models import family

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


def cmd_train(args: argparse.Namespace) -> None:
    from .api import load
    from .train.jobs import PlanWatcher, read_plan
    from .train.multi import train

    plan = read_plan(args.jobs)
    if args.watch and args.sequential:
        raise ConfigError("--watch adds jobs to a fused run; it does not go with --sequential")
    device, processes = args.device, int(os.environ.get("WORLD_SIZE", "1"))
    if processes > 1:  # launched by torchrun: one process per device
        import torch
        import torch.distributed as dist

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    if plan.sharding and args.sequential:
        raise ConfigError("sharding: fsdp trains the jobs together; it does not go with --sequential")
    if plan.sharding and processes < 2:
        raise ConfigError("sharding: fsdp splits the base over processes: run `torchrun --nproc-per-node N -m "
                          "vlstack.cli train ...`")  # fmt: skip
    where = "cpu" if plan.sharding else device  # (split on the host, each part then moved to its device)
    vlm = load(args.model or plan.model, device=where, dtype=args.dtype, v2pe_delta=args.v2pe_delta)  # (adapters:
    # float32 whatever the base is)
    options = {
        "parallel": plan.parallel,
        "sharding": plan.sharding,
        "device": device,
        "resume": args.resume,
        "gradient_checkpointing": plan.gradient_checkpointing,
        "max_tokens": plan.max_tokens,
        "log_every": plan.log_every,
    }
    done = {}
    if args.sequential:  # the baseline: the same jobs one after another
        for job in plan.jobs:
            done.update(train(vlm, [job], plan.max_rows, **options))
    else:
        more = PlanWatcher(args.jobs, plan) if args.watch else None
        done = train(vlm, plan.jobs, plan.max_rows, more=more, **options)
    for r in done.values():
        print(f"{r.job.name}: {'model' if r.job.full else 'adapter'} written to {r.job.output}")
    if processes > 1:  # (every process done with the others: a clean exit)
        dist.barrier()
        dist.destroy_process_group()


def cmd_merge(args: argparse.Namespace) -> None:

    from .adapters import merge_adapter
    from .api import load

    vlm = load(args.model, device="cpu", dtype=args.dtype)
    for what, source in (("base model", vlm.directory), ("adapter", Path(args.adapter))):
        if Path(args.output).resolve() == source.resolve():
            raise ConfigError(f"--output {args.output} is the {what}'s own directory; write the merge elsewhere")
    vlm.load_adapter("merge", args.adapter)
    merge_adapter(vlm.model, "merge")
    vlm.adapters.clear()
    print(f"merged checkpoint written to {vlm.save(args.output)}")


def cmd_compress(args: argparse.Namespace) -> None:
    from .adapters import merge_adapter
    from .api import load
    from .compress import compress, read_report, read_stages

    stages, report = read_stages(args.config), read_report(args.config)  # (checked before anything loads)
    vlm = load(args.model, device=args.device or "cpu", dtype="float32")
    if args.adapter:  # the adapter is merged first
        vlm.load_adapter("merge", args.adapter)
        merge_adapter(vlm.model, "merge")
        vlm.adapters.clear()
    out = compress(vlm, stages, args.output, resume=args.resume, report=report)
    print((out / "compress.md").read_text(), end="")
    print(f"compressed checkpoint written to {out}")


def cmd_plan(args: argparse.Namespace) -> None:

    from .models.config_json import read_config
    from .plan import describe, plan
    from .tiny import ASSETS

    cfg = read_config(ASSETS if args.model == "tiny" else Path(args.model))  # (the config alone: no weights read)
    p = plan(cfg, args.gpus, args.quantize, args.context, args.concurrency, args.train_tokens)
    print(describe(p, args.context, args.concurrency, args.train_tokens))


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from .api import load
    from .engine.mirror import replay
    from .heap import keep_freed_memory
    from .parallel.serving import launch
    from .serve.app import create_app
    from .serve.auth import AuditLog, read_keys
    from .serve.state import ServeConfig, make_engine

    if args.tp > 1 and "RANK" not in os.environ:  # one process per device, started and watched from here
        raise SystemExit(launch(sys.argv[1:], args.tp))
    name = args.served_name or ("tiny" if args.model == "tiny" else Path(args.model).name)
    adapters = [(spec, *spec.partition("=")) for spec in args.adapter or []]
    for spec, adapter, sep, path in adapters:  # (everything given checked before the model loads)
        if not sep or not adapter or not path:
            raise ConfigError(f"--adapter takes NAME=DIR (got {spec!r})")
        if adapter == name:
            raise ConfigError(f"--adapter {spec}: the base model is served as {name!r}; give the adapter another name")
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: a port is a number from 1 to 65535")
    tenants = read_keys(args.keys) if args.keys else None
    config = ServeConfig(
        allow_http_images=args.allow_http_images, allow_private_image_hosts=args.allow_private_image_hosts,
        adapter_dir=args.adapter_dir, image_dir=args.image_dir, max_batch=args.max_batch,
        kv_budget=args.kv_budget, max_queue=args.max_queue, max_body_mb=args.max_body_mb,
        image_cache_mb=args.image_cache_mb, max_model_len=args.max_model_len, prefill_tokens=args.prefill_tokens,
        vision_tokens=args.vision_tokens, max_adapters=args.max_adapters, max_lora_rank=args.max_lora_rank,
        access_log=not args.no_access_log,
    )  # fmt: skip
    audit = AuditLog(args.audit, content=args.audit_content) if args.audit else None
    lead = int(os.environ.get("RANK", "0")) == 0  # (under TP, rank 0 serves; the others replay its calls)
    sock = bind(args.host, args.port) if lead else None  # a port in use: one line, before the model loads
    vlm = load(args.model, device=args.device, dtype=args.dtype, v2pe_delta=args.v2pe_delta, tp=args.tp)
    if vlm.model.device.type == "cpu":
        keep_freed_memory()  # each step's temporaries reuse the heap (see heap.py)
    for _, adapter, _, path in adapters:
        vlm.load_adapter(adapter, path)
    if not lead:  # a rank that runs the calls rank 0's engine sends
        return replay(make_engine(vlm, config, background=False))
    app = create_app(vlm, name, config, tenants=tenants, audit=audit)
    engine = app.state.engine
    cache = f"{engine.max_batch} x {engine.max_len} tokens, {engine.cache_bytes / 2**30:.2f} GiB"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    print(f"serving {name!r} and adapters {sorted(vlm.adapters)} on http://{args.host}:{args.port}/v1 "
          f"(KV cache: {cache})", flush=True)  # fmt: skip
    server.run(sockets=[sock])


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (not yet listening: a connection before the server starts is refused, not
    left hanging), or a one-line error (a port in use, an address not of this machine)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise ConfigError(f"--host {host}: {e.strerror}") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot serve on {host}:{port}: {e.strerror}") from None
    return sock


def parser() -> argparse.ArgumentParser:
    verbs = "chat, serve, train, merge, compress, plan, eval, synth, info"
    p = argparse.ArgumentParser(prog="vlstack", description=f"Self-hosted InternVL: {verbs}.")
    p.add_argument("--version", action="version", version=f"vlstack {__version__}")  # (also from a source tree)
    sub = p.add_subparsers(dest="verb", required=True)

    chat = sub.add_parser("chat", help="answer one question, optionally about images")
    chat.add_argument("question")
    chat.add_argument("--model", default="tiny", help="checkpoint directory (default: the built-in tiny model)")
    chat.add_argument("--image", action="append", help="image file; repeat for several")
    chat.add_argument("--system", default=None, help="system message")
    chat.add_argument("--max-new-tokens", type=int, default=64)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.add_argument("--top-p", type=float, default=1.0)
    chat.add_argument("--top-k", type=int, default=0)
    chat.add_argument("--seed", type=int, default=None)
    chat.add_argument("--device", default=None)
    chat.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    chat.set_defaults(func=cmd_chat)

    serve = sub.add_parser("serve", help="serve the model and its LoRA adapters behind OpenAI's chat API")
    serve.add_argument("--model", default="tiny", help="checkpoint directory (default: the built-in tiny model)")
    serve.add_argument("--adapter", action="append", help="NAME=DIR of a PEFT adapter; repeat for several")
    serve.add_argument("--served-name", default=None, help="the base model's name in the API")
    serve.add_argument("--tp", type=int, default=1,
                       help="tensor parallelism: split the model over this many processes, one per GPU (under "
                            "torchrun: its processes)")  # fmt: skip
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--allow-http-images", action="store_true", help="accept http(s) image URLs")
    serve.add_argument(
        "--allow-private-image-hosts",
        action="store_true",
        help="with --allow-http-images: fetch from private, loopback and link-local addresses too",
    )
    serve.add_argument("--image-dir", default=None, help="serve local image files from under this directory")
    serve.add_argument(
        "--adapter-dir",
        default=None,
        help="POST /v1/adapters loads adapters from under this directory (without it: admin keys only)",
    )
    serve.add_argument("--keys", default=None, help="YAML/JSON file of API keys and the models each may use")
    serve.add_argument("--audit", default=None, help="append a JSON line per request to this file")
    serve.add_argument("--audit-content", action="store_true", help="include the messages in the audit log")
    serve.add_argument("--no-access-log", action="store_true", help="no line on stderr per request")
    serve.add_argument("--max-batch", type=int, default=16, help="requests decoded together at most")
    serve.add_argument("--kv-budget", type=int, default=None, help="KV-cache tokens in use at most (queue beyond)")
    serve.add_argument("--max-model-len", type=int, default=None,
                       help="tokens per request, prompt + answer (bounds the KV cache's memory)")  # fmt: skip
    serve.add_argument("--prefill-tokens", type=int, default=None,
                       help="prompt tokens prefilled per step (default: 8192 on a CPU, 16384 on a GPU)")  # fmt: skip
    serve.add_argument(
        "--vision-tokens",
        type=int,
        default=None,
        help="vision-encoder tokens per pass over images (default: 8192 on a CPU, 32768 on a GPU)",
    )
    serve.add_argument("--max-queue", type=int, default=256, help="waiting requests at most (503 beyond)")
    serve.add_argument("--max-body-mb", type=float, default=64, help="request body size limit (413 beyond)")
    serve.add_argument("--image-cache-mb", type=float, default=512, help="memory for cached visual embeddings")
    serve.add_argument("--max-adapters", type=int, default=None,
                       help="reserve slots for this many adapters at once (default 8 with --max-lora-rank; "
                            "without either, the slots grow as adapters are loaded)")  # fmt: skip
    serve.add_argument("--max-lora-rank", type=int, default=None, help="the largest rank of a loaded adapter (64)")
    serve.add_argument("--device", default=None)
    serve.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    serve.set_defaults(func=cmd_serve)

    train = sub.add_parser("train", help="train the LoRA adapters of a jobs file, fused over one base")
    train.add_argument("jobs", help="YAML jobs file")
    train.add_argument("--model", default=None, help="checkpoint directory (default: the jobs file's model)")
    train.add_argument("--sequential", action="store_true", help="train the jobs one by one (the baseline)")
    train.add_argument("--resume", action="store_true", help="continue each job from its last checkpoint")
    train.add_argument("--watch", action="store_true", help="jobs added to the file while training runs join the run")
    train.add_argument("--device", default=None)
    train.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="the frozen base's (default: float32 on a CPU, the checkpoint's on a GPU)",
    )
    train.set_defaults(func=cmd_train)

    merge = sub.add_parser("merge", help="fold a PEFT adapter into the base and write a checkpoint")
    merge.add_argument("--model", default="tiny")
    merge.add_argument("--adapter", required=True, help="PEFT adapter directory")
    merge.add_argument("--output", required=True, help="directory for the merged checkpoint")
    merge.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    merge.set_defaults(func=cmd_merge)

    comp = sub.add_parser("compress", help="prune, distil and quantise a model (P-KD-Q) into a new checkpoint")
    comp.add_argument("--model", default="tiny")
    comp.add_argument("--adapter", default=None, help="a PEFT adapter merged into the model first")
    comp.add_argument("--config", required=True, help="YAML: stages: [- quantize: {bits: 8}, ...]")
    comp.add_argument("--output", required=True, help="a new directory for the compressed checkpoint")
    comp.add_argument("--resume", action="store_true", help="continue an interrupted distillation")
    comp.add_argument("--device", default=None)
    comp.set_defaults(func=cmd_compress)

    pl = sub.add_parser("plan", help="what a model needs: weights, KV cache, training activations, the TP to serve it")
    pl.add_argument("--model", default="tiny", help="checkpoint directory (its config.json is enough)")
    pl.add_argument("--gpus", default="1xH100-80GB", help="COUNTxKIND, e.g. 2xA100-80GB, 4xH100, 8x24GB")
    pl.add_argument("--quantize", default=None, choices=["int8", "int4"], help="the LLM's layers quantised")
    pl.add_argument("--context", type=int, default=8192, help="tokens per request (prompt + answer)")
    pl.add_argument("--concurrency", type=int, default=64, help="requests at once")
    pl.add_argument("--train-tokens", type=int, default=8192, help="tokens a training step (LoRA, checkpointing)")
    pl.set_defaults(func=cmd_plan)

    ev = sub.add_parser("eval", help="score a model (or an adapter) on a benchmark by its official rules")
    ev.add_argument("benchmark", choices=["mmmu", "docvqa", "chartqa", "vqa", "report"],
                    help="a benchmark; or report DIR...: earlier runs (their --out) side by side")  # fmt: skip
    ev.add_argument("runs", nargs="*", help=argparse.SUPPRESS)
    ev.add_argument("--data", default=None, help="the benchmark: a VLMEvalKit .tsv or a vlstack .jsonl")
    ev.add_argument("--gpu-price", type=float, default=None, help="report: USD per GPU hour, for local runs' cost")
    ev.add_argument("--model", default="tiny")
    ev.add_argument("--adapter", action="append", default=None,
                    help="NAME=DIR: score the model with this PEFT adapter; repeat for several (each a run of its "
                    "own, under --out/NAME, with a report of them all); NAME base: the model without one")  # fmt: skip
    ev.add_argument("--metric", default=None, choices=["exact", "anls", "relaxed", "choice", "mmmu"],
                    help="default: the benchmark's (mmmu, anls, relaxed; vqa: exact)")  # fmt: skip
    ev.add_argument("--limit", type=int, default=None, help="the first N items only")
    ev.add_argument("--batch", type=int, default=16, help="items generated together")
    ev.add_argument("--max-new-tokens", type=int, default=64)
    ev.add_argument("--skip-bad-images", action="store_true",
                    help="an item whose image does not decode is scored as failed (its error in predictions.jsonl) "
                    "instead of stopping the run")  # fmt: skip
    ev.add_argument("--out", default=None, help="directory for summary.json and predictions.jsonl (a rerun resumes)")
    ev.add_argument("--api-base", default=None, help="a remote OpenAI-compatible endpoint instead of a local model")
    ev.add_argument("--api-model", default=None, help="the endpoint's model name")
    ev.add_argument("--api-key-env", default=None, help="the environment variable holding the endpoint's key")
    ev.add_argument("--concurrency", type=int, default=8, help="requests in flight to the endpoint")
    ev.add_argument("--price-in", type=float, default=None, help="USD per million prompt tokens: cost_usd")
    ev.add_argument("--price-out", type=float, default=None, help="USD per million completion tokens")
    ev.add_argument("--device", default=None)
    ev.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    ev.set_defaults(func=cmd_eval)

    syn = sub.add_parser("synth", help="draw a synthetic dataset of charts or documents with computed answers")
    syn.add_argument("kind", choices=["charts", "documents"])
    syn.add_argument("--n", type=int, default=1000, help="images (each with several questions)")
    syn.add_argument("--out", required=True, help="a new directory")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--size", type=int, default=448, help="the images' side in pixels")
    syn.add_argument("--test-fraction", type=float, default=0.2, help="images for the test split (held-out templates)")
    syn.add_argument("--questions", choices=["all", "visual"], default="all",
                     help="visual: only what is answered by looking (counts, colours, positions, ...)")  # fmt: skip
    syn.add_argument("--only", default=None, help="comma-separated chart or document types (bar,line,pie / "
                     "invoice,receipt,form,table)")  # fmt: skip
    syn.add_argument("--conversations", action="store_true",
                     help="train.jsonl: one conversation per image, its questions as turns")  # fmt: skip
    syn.add_argument("--line-width", type=float, default=2.0,
                     help="charts: the line in pixels at 224 px (wider: a warm-up set for its shape)")  # fmt: skip
    syn.add_argument("--decorate", action="store_true",
                     help="charts: strokes with no data (page border, reference lines) on training charts")  # fmt: skip
    syn.set_defaults(func=cmd_synth)

    for command in (chat, serve, train, ev):
        command.add_argument("--v2pe-delta", type=float, default=None,
                             help="V2PE: the position step of image tokens, e.g. 0.25 (InternVL3; default: the "
                             "checkpoint's, else 1)")  # fmt: skip

    info = sub.add_parser("info", help="describe a checkpoint: architecture, parameters, image tokens")
    info.add_argument("model", nargs="?", default="tiny")
    info.set_defaults(func=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except VLStackError as e:
        print(f"vlstack: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # (`vlstack info | head`: the reader left; nothing more to say, and no traceback)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (the interpreter's flush at exit, too)
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
