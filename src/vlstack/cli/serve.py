"""`vlstack serve`: serve the model and its LoRA adapters behind OpenAI's chat API."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

from ..errors import ConfigError
from . import options


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the model and its LoRA adapters behind OpenAI's chat API")
    options.model(p)
    p.add_argument("--adapter", action="append", help="NAME=DIR of a PEFT adapter; repeat for several")
    p.add_argument("--served-name", default=None, help="the base model's name in the API")
    p.add_argument(
        "--tp",
        type=int,
        default=1,
        help="tensor parallelism: split the model over this many processes, one per GPU (under "
        "torchrun: its processes)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--allow-http-images", action="store_true", help="accept http(s) image URLs")
    p.add_argument(
        "--allow-private-image-hosts",
        action="store_true",
        help="with --allow-http-images: fetch from private, loopback and link-local addresses too",
    )
    p.add_argument("--image-dir", default=None, help="serve local image files from under this directory")
    p.add_argument(
        "--adapter-dir",
        default=None,
        help="POST /v1/adapters loads adapters from under this directory (without it: admin keys only)",
    )
    p.add_argument("--keys", default=None, help="YAML/JSON file of API keys and the models each may use")
    p.add_argument("--audit", default=None, help="append a JSON line per request to this file")
    p.add_argument("--audit-content", action="store_true", help="include the messages in the audit log")
    p.add_argument("--no-access-log", action="store_true", help="no line on stderr per request")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together at most")
    p.add_argument("--kv-budget", type=int, default=None, help="KV-cache tokens in use at most (queue beyond)")
    p.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="tokens per request, prompt + answer (bounds the KV cache's memory)",
    )
    p.add_argument(
        "--prefill-tokens",
        type=int,
        default=None,
        help="prompt tokens prefilled per step (default: 8192 on a CPU, 16384 on a GPU)",
    )
    p.add_argument(
        "--vision-tokens",
        type=int,
        default=None,
        help="vision-encoder tokens per pass over images (default: 8192 on a CPU, 32768 on a GPU)",
    )
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests at most (503 beyond)")
    p.add_argument("--max-body-mb", type=float, default=64, help="request body size limit (413 beyond)")
    p.add_argument("--image-cache-mb", type=float, default=512, help="memory for cached visual embeddings")
    p.add_argument(
        "--max-adapters",
        type=int,
        default=None,
        help="reserve slots for this many adapters at once (default 8 with --max-lora-rank; "
        "without either, the slots grow as adapters are loaded)",
    )
    p.add_argument("--max-lora-rank", type=int, default=None, help="the largest rank of a loaded adapter (64)")
    options.device(p)
    options.v2pe(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    import uvicorn

    from ..api import load
    from ..engine.mirror import replay
    from ..heap import keep_freed_memory
    from ..parallel.serving import launch
    from ..serve.app import create_app
    from ..serve.auth import AuditLog, read_keys
    from ..serve.state import ServeConfig, make_engine

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
        allow_http_images=args.allow_http_images,
        allow_private_image_hosts=args.allow_private_image_hosts,
        adapter_dir=args.adapter_dir,
        image_dir=args.image_dir,
        max_batch=args.max_batch,
        kv_budget=args.kv_budget,
        max_queue=args.max_queue,
        max_body_mb=args.max_body_mb,
        image_cache_mb=args.image_cache_mb,
        max_model_len=args.max_model_len,
        prefill_tokens=args.prefill_tokens,
        vision_tokens=args.vision_tokens,
        max_adapters=args.max_adapters,
        max_lora_rank=args.max_lora_rank,
        access_log=not args.no_access_log,
    )
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
    sock.listen(2048)  # from here a connection queues until the server takes it: "serving" is then true
    print(
        f"serving {name!r} and adapters {sorted(vlm.adapters)} on http://{args.host}:{args.port}/v1 "
        f"(KV cache: {cache})",
        flush=True,
    )
    server.run(sockets=[sock])


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (not yet listening: a connection while the model loads is refused, not
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
