"""OpenAI's chat-completions API over one base model and its LoRA adapters (FastAPI).

The request's `model` picks the adapter (the base model's own name: no adapter). Errors use OpenAI's
shape `{"error": {"message", "type", "param", "code"}}` with 4xx for the client's mistakes, so SDKs
do not retry them. Request bodies are read and checked by serve/openai.py, encoded (images fetched,
decoded and tiled) in worker threads, then batched continuously by engine/scheduler.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from ..api import VLM
from ..engine.scheduler import Engine
from ..errors import ConfigError, PromptError, UnknownModel, VLStackError
from ..generate import SamplingParams
from ..layers.lora import check_name, routing_of
from .auth import AuditLog, Tenant, find_tenant
from .metrics import Metrics
from .openai import APIError, fetch_images, logprobs_content, read_messages, read_sampling, remote_images


@dataclass
class ServeConfig:
    """What the operator decides: image sources, batch and memory limits, request limits."""

    allow_http_images: bool = False  # fetch http(s) image URLs (otherwise refused)
    allow_private_image_hosts: bool = False  # with allow_http_images: fetch from private/loopback addresses too
    adapter_dir: str | Path | None = None  # hot-loaded adapters come from under this directory only
    image_dir: str | Path | None = None  # local image files are served from under this directory only
    max_batch: int = 16  # requests decoded together
    kv_budget: int | None = None  # KV-cache tokens in use at most (default: max_batch x context)
    max_model_len: int | None = None  # tokens per request, prompt + answer (default: the model's context);
    # the KV cache holds max_batch x max_model_len positions, so this bounds its memory
    prefill_tokens: int | None = None  # prompt tokens prefilled per engine step (None: the device's default)
    vision_tokens: int | None = None  # vision-encoder tokens per pass over new images (bounds its activations)
    max_queue: int = 256  # requests waiting beyond this are refused with 503
    max_body_mb: float = 64  # request bodies beyond this are refused with 413
    image_cache_mb: float = 512  # visual embeddings kept for images seen again
    max_adapters: int | None = None  # with either: slots for this many adapters (8) of rank up to max_lora_rank
    max_lora_rank: int | None = None  # (64), reserved at start; without: the slots grow as adapters come
    fetch_timeout: float = 10.0  # seconds for an http(s) image, in all
    access_log: bool = False  # a line on stderr per request (method, path, status, seconds, key id)

    def __post_init__(self) -> None:
        for name in ("max_body_mb", "image_cache_mb", "fetch_timeout"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name} must be a finite number (got {getattr(self, name)})")
        for name in ("max_batch", "max_queue", "prefill_tokens", "vision_tokens", "max_body_mb", "fetch_timeout"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive (got {getattr(self, name)})")
        for name in ("image_dir", "adapter_dir"):
            if getattr(self, name) is not None and not Path(getattr(self, name)).is_dir():
                raise ConfigError(f"{name} {getattr(self, name)} is not a directory")
        for name in ("max_adapters", "max_lora_rank"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1 (got {getattr(self, name)})")
        for name in ("kv_budget", "max_model_len"):
            if getattr(self, name) is not None and getattr(self, name) < 2:
                raise ConfigError(f"{name} must be at least 2 tokens (got {getattr(self, name)})")
        if self.image_cache_mb < 0:
            raise ConfigError(f"image_cache_mb must be >= 0 (got {self.image_cache_mb})")


def make_engine(vlm: VLM, cfg: ServeConfig, background: bool = True) -> Engine:
    """The server's engine (and, under tensor parallelism, each other rank's: the same KV cache and steps)."""
    if cfg.max_adapters or cfg.max_lora_rank:  # hot loads write into free slots: the stacks never grow
        routing_of(vlm.model).reserve(cfg.max_adapters or 8, cfg.max_lora_rank or 64)
    return vlm.engine(
        cfg.max_batch,
        kv_budget=cfg.kv_budget,
        max_len=cfg.max_model_len,
        prefill_tokens=cfg.prefill_tokens,
        image_cache_mb=cfg.image_cache_mb,
        vision_tokens=cfg.vision_tokens,
        background=background,
    )


def create_app(
    vlm: VLM,
    name: str,
    config: ServeConfig | None = None,
    tenants: list[Tenant] | None = None,
    audit: AuditLog | None = None,
) -> FastAPI:
    """The HTTP app serving vlm as `name` and each of its loaded adapters under its own name.

    With tenants, every endpoint but /health needs `Authorization: Bearer <key>`, and a key sees and
    uses only its own models."""
    cfg = config or ServeConfig()
    engine = make_engine(vlm, cfg)
    # prompts are encoded (images fetched, decoded, tiled, hashed) by a few threads, about one per core:
    # more would only contend with the engine, and each would grow its own malloc arena
    encoder = ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2)), thread_name_prefix="vlstack-encode")
    # http(s) images are fetched by threads of their own: slow hosts wait there, never in the encoders' way
    fetcher = ThreadPoolExecutor(max_workers=32, thread_name_prefix="vlstack-fetch")

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        encoder.shutdown(cancel_futures=True)
        fetcher.shutdown(cancel_futures=True)
        engine.close()

    app = FastAPI(title="vlstack", lifespan=lifespan)
    app.state.engine = engine
    max_body = int(cfg.max_body_mb * 2**20)
    metrics = Metrics()

    def visible(request: Request, model: str) -> bool:
        tenant = request.state.tenant
        return tenant is None or tenant.may_use(model)

    class Guard:
        """API keys and the body-size limit before a request; its metrics and audit record after it (a pure
        ASGI middleware: FastAPI's @app.middleware would hide client disconnects from the endpoints)."""

        def __init__(self, app) -> None:
            self.app = app

        async def __call__(self, scope, receive, send) -> None:
            if scope["type"] != "http":
                return await self.app(scope, receive, send)
            state, path, headers = scope.setdefault("state", {}), scope["path"], Headers(scope=scope)
            state["tenant"], error, status = None, None, 500
            if tenants is not None and path not in ("/health", "/health/ready"):  # (a load balancer's probes)
                state["tenant"] = find_tenant(tenants, headers.get("authorization"))
                if state["tenant"] is None:
                    error = APIError(401, "invalid or missing API key", code="invalid_api_key")
            size = headers.get("content-length")
            if error is None and size and size.isdigit() and int(size) > max_body:  # refused before reading it
                error = APIError(413, f"the request body is over the limit of {max_body} bytes", code="too_large")

            async def send_status(message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            start = time.perf_counter()
            try:
                await (error.response() if error else self.app)(scope, receive, send_status)
            finally:
                record = state.get("audit") or {}  # a chat request's model and token counts (and final status)
                status = record.pop("status", status)
                if cfg.access_log:
                    who = f" key={state['tenant'].id}" if state["tenant"] else ""
                    client = (scope.get("client") or ("-",))[0]
                    print(f"{client} {scope['method']} {path} {status} {time.perf_counter() - start:.3f}s{who}",
                          file=sys.stderr, flush=True)  # fmt: skip
                metrics.count("vlstack_http_requests_total", path=_route(path), status=str(status))
                if audit is not None and path.startswith("/v1/"):
                    tenant = state["tenant"]
                    audit.write(key_id=tenant.id if tenant else None, path=path, status=status, **record)

    app.add_middleware(Guard)

    @app.get("/metrics")
    def prometheus(request: Request) -> PlainTextResponse:
        gauges = {
            "vlstack_queue_depth": engine.waiting.qsize(),
            "vlstack_running_requests": len(engine.running),
            "vlstack_image_cache_bytes": engine.images.bytes,
        }
        totals = {"vlstack_image_cache_hits_total": engine.images.hits,
                  "vlstack_image_cache_misses_total": engine.images.misses}  # fmt: skip
        tenant = request.state.tenant
        shared = tenant is None or tenant.admin  # the whole server's traffic, queue and cache: admin keys only
        text = metrics.render(gauges, totals, lambda model: visible(request, model), shared)  # a tenant: its models
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    def finished(model: str, reqs: list, messages: list) -> dict:
        """Metrics of a chat request that ended (answered, or abandoned by its client: 499); its audit record."""
        failed = any(r.finish_reason == "error" for r in reqs)
        status = 500 if failed else 200 if all(r.finish_reason for r in reqs) else 499
        usage = _usage(reqs)
        metrics.count("vlstack_requests_total", model=model, status=str(status))
        metrics.count("vlstack_prompt_tokens_total", usage["prompt_tokens"], model=model)
        metrics.count("vlstack_completion_tokens_total", usage["completion_tokens"], model=model)
        for r in reqs:
            if r.first_token_at is not None:
                metrics.observe("vlstack_time_to_first_token_seconds", r.first_token_at - r.submitted, model=model)
            if r.finished_at is not None:
                metrics.observe("vlstack_request_seconds", r.finished_at - r.submitted, model=model)
                if r.generated > 1:
                    per_token = (r.finished_at - r.first_token_at) / (r.generated - 1)
                    metrics.observe("vlstack_time_per_output_token_seconds", per_token, model=model)
        return {"model": model, "prompt_tokens": usage["prompt_tokens"],
                "completion_tokens": usage["completion_tokens"], "content": messages, "status": status}  # fmt: skip

    roots: dict[str, str] = {}  # adapter name -> the directory it came from
    image_root = Path(cfg.image_dir) if cfg.image_dir else None
    adapter_root = Path(cfg.adapter_dir).resolve() if cfg.adapter_dir else None

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:  # 404, 405: in OpenAI's shape too
        what = {404: f"no such endpoint: {request.url.path}", 405: f"{request.method} is not allowed on "
                f"{request.url.path}"}.get(e.status_code, str(e.detail))  # fmt: skip
        response = APIError(e.status_code, what, code="not_found" if e.status_code == 404 else None).response()
        response.headers.update(e.headers or {})
        return response

    @app.get("/health")
    def health() -> dict:
        """Liveness: the process answers (a load balancer's restart signal when it does not)."""
        return {"status": "ok"}

    @app.get("/health/ready")
    def ready() -> JSONResponse:
        """Readiness: the model loaded, a first request through it (on a GPU: its first graphs captured), the
        engine running; 503 until then (a load balancer's signal to send traffic here or not)."""
        alive = engine.thread is not None and engine.thread.is_alive()
        if engine.ready.is_set() and alive:
            return JSONResponse({"status": "ready", "model": name, "tp": vlm.model.tp.size if vlm.model.tp else 1})
        reason = engine.unready or ("warming up" if alive else "the engine has stopped")
        return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)

    def cards(request: Request) -> list[dict]:
        """OpenAI's model objects of the base and each adapter, those this request's key may see."""
        created = int(time.time())
        data = [{"id": name, "object": "model", "created": created, "owned_by": "vlstack"}]
        data += [
            {"id": a, "object": "model", "created": created, "owned_by": "vlstack", "parent": name,
             "root": roots.get(a, a)}
            for a in sorted(vlm.adapters) if a not in engine.retiring
        ]  # fmt: skip
        return [m for m in data if visible(request, m["id"])]

    @app.get("/v1/models")
    def models(request: Request) -> dict:
        return {"object": "list", "data": cards(request)}

    @app.get("/v1/models/{model:path}")
    def model(model: str, request: Request) -> dict:
        card = next((m for m in cards(request) if m["id"] == model), None)
        if card is None:  # (another tenant's adapter: the same answer)
            raise APIError(404, f"The model {model!r} does not exist", "model", "model_not_found")
        return card

    def require_admin(request: Request) -> None:
        if request.state.tenant is not None and not request.state.tenant.admin:
            raise APIError(403, "this API key may not load or unload adapters", code="permission_denied")

    def adapter_path(path: str) -> str:
        """Where a hot-loaded adapter may come from: under --adapter-dir; anywhere only for an admin key."""
        if adapter_root is not None:
            resolved = (adapter_root / path).resolve()
            if not resolved.is_relative_to(adapter_root):
                raise APIError(400, "the adapter's path must lie under the server's adapter directory", "path")
            return str(resolved)
        if tenants is None:
            raise APIError(403, "this server loads adapters only with --adapter-dir (paths under it) or --keys "
                                "(an admin key)", code="permission_denied")  # fmt: skip
        return path

    @app.post("/v1/adapters")
    async def load_adapter(request: Request) -> dict:
        require_admin(request)
        body = await _json(request, max_body)
        adapter, path = body.get("name"), body.get("path")
        if not isinstance(adapter, str) or not adapter or not isinstance(path, str) or not path:
            raise APIError(400, "give the adapter's 'name' and the 'path' of its PEFT directory")
        try:
            check_name(adapter)
        except ConfigError as e:
            raise APIError(400, str(e), "name") from None
        path = adapter_path(path)
        if adapter == name or adapter in vlm.adapters:
            being = " and is being unloaded; retry when it is gone" if adapter in engine.retiring else ""
            raise APIError(409, f"a model named {adapter!r} is already served{being}", "name")

        try:  # in a worker thread: waiting for the engine's step must not block the event loop
            await asyncio.get_running_loop().run_in_executor(encoder, engine.load_adapter, adapter, path)
        except VLStackError as e:
            raise APIError(400, str(e), "path") from None
        roots[adapter] = path
        return {"id": adapter, "object": "model", "parent": name, "root": path}

    @app.delete("/v1/adapters/{adapter}")
    def unload_adapter(adapter: str, request: Request) -> dict:
        require_admin(request)
        if adapter not in vlm.adapters or adapter in engine.retiring:
            raise APIError(404, f"no adapter named {adapter!r} is loaded", "name", "model_not_found")
        engine.retire(adapter)  # new requests for it: 404 from now; it leaves once its running requests end
        roots.pop(adapter, None)
        return {"id": adapter, "object": "model", "deleted": True}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _json(request, max_body)
        model = body.get("model")
        if not isinstance(model, str):
            raise APIError(400, "'model' must be a string: the name of the base model or of an adapter", "model")
        served = model == name or (model in vlm.adapters and model not in engine.retiring)
        if not served or not visible(request, model):  # (another tenant's model: the same answer)
            raise APIError(404, f"The model {model!r} does not exist", "model", "model_not_found")
        messages = read_messages(body, cfg.allow_http_images, image_root)
        gen, n, top_logprobs = read_sampling(body, vlm.cfg.text.vocab_size)
        if engine.waiting.qsize() >= cfg.max_queue:
            raise APIError(503, f"the server is overloaded ({engine.waiting.qsize()} requests waiting); retry later",
                           code="server_overloaded")  # fmt: skip
        adapter = None if model == name else model
        stream = bool(body.get("stream"))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        loop = asyncio.get_running_loop()
        if remote_images(messages):  # fetched by threads of their own (see fetcher)
            fetch = (fetch_images, messages, cfg.fetch_timeout, cfg.allow_private_image_hosts)
            messages = await loop.run_in_executor(fetcher, _client_errors(*fetch))
        tenant = request.state.tenant
        args = (engine, vlm, messages, adapter, n, gen, top_logprobs, loop, tenant.id if tenant else None)
        reqs = await loop.run_in_executor(encoder, _client_errors(_submit, *args))

        async def pieces(r) -> AsyncIterator[str]:
            """r's text as it comes, until it ends (finished or cancelled)."""
            while (piece := await r.out.get()) is not None:
                yield piece

        def logprobs(r, start: int = 0, end: int | None = None) -> dict | None:
            """OpenAI's `logprobs` of r's tokens start..end (None when not asked for)."""
            if top_logprobs is None:
                return None
            return {"content": logprobs_content(r.logprobs[start:end], vlm.processor.decode), "refusal": None}

        async def watch() -> None:
            """Cancel the requests if the client hangs up (a stream notices by itself; a plain response not)."""
            while not all(r.finished_at for r in reqs):
                if await request.is_disconnected():
                    for r in reqs:
                        engine.cancel(r)
                    return
                await asyncio.sleep(0.5)

        if not stream:
            watcher, texts = asyncio.create_task(watch()), []
            try:
                for r in reqs:
                    texts.append("".join([p async for p in pieces(r)]))
            finally:
                watcher.cancel()
            request.state.audit = finished(model, reqs, messages)
            failed = next((r.error for r in reqs if r.finish_reason == "error"), None)
            if failed:
                raise APIError(500, f"the model failed on this request ({failed})")
            if not all(r.finish_reason for r in reqs):  # the client went away: nobody reads the answer
                return JSONResponse({}, status_code=499)
            choices = [
                {"index": i, "message": {"role": "assistant", "content": t}, "logprobs": logprobs(r),
                 "finish_reason": r.finish_reason}
                for i, (t, r) in enumerate(zip(texts, reqs))
            ]  # fmt: skip
            return {"id": rid, "object": "chat.completion", "created": created, "model": model,
                    "choices": choices, "usage": _usage(reqs)}  # fmt: skip

        def chunk(choices: list[dict], **extra) -> str:
            body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                    "choices": choices, **extra}  # fmt: skip
            return f"data: {json.dumps(body)}\n\n"

        async def events() -> AsyncIterator[str]:
            try:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                             for i in range(n)])  # fmt: skip
                for i, r in enumerate(reqs):
                    sent = 0  # r's logprobs sent: a piece carries those of the tokens that made it (and any after)
                    async for piece in pieces(r):
                        choice = {"index": i, "delta": {"content": piece}, "finish_reason": None}
                        if top_logprobs is not None:
                            end = len(r.logprobs)  # (the engine may be adding more meanwhile)
                            choice["logprobs"], sent = logprobs(r, sent, end), end
                        yield chunk([choice])
                    if r.finish_reason == "error":  # OpenAI's SDKs raise on an event with an error
                        yield f"data: {json.dumps({'error': {'message': r.error, 'type': 'server_error'}})}\n\n"
                        return
                    if not r.finish_reason:
                        return  # the client went away
                    last = {"index": i, "delta": {}, "finish_reason": r.finish_reason}
                    if top_logprobs is not None:  # tokens that made no text (e.g. one completing a stop string)
                        last["logprobs"] = logprobs(r, sent)
                    yield chunk([last])
                if include_usage:
                    yield chunk([], usage=_usage(reqs))
                yield "data: [DONE]\n\n"
            finally:
                for r in reqs:  # a no-op for finished requests; frees the slots of abandoned ones
                    engine.cancel(r)
                request.state.audit = finished(model, reqs, messages)

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def _usage(reqs: list) -> dict:
    """OpenAI's usage of a request's n completions (one prompt, counted once)."""
    prompt, completion = len(reqs[0].prompt), sum(r.generated for r in reqs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _route(path: str) -> str:
    """A metrics label for a request path: the API's routes, and "other" (labels must stay few)."""
    if path.startswith("/v1/adapters/"):
        return "/v1/adapters/{name}"
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    known = ("/v1/chat/completions", "/v1/models", "/v1/adapters", "/health", "/health/ready", "/metrics")
    return path if path in known else "other"


async def _json(request: Request, max_body: int) -> dict:
    chunks, size = [], 0
    async for chunk in request.stream():  # counted as it arrives: a body without a content-length stops at the limit
        size += len(chunk)
        if size > max_body:
            raise APIError(413, f"the request body is over the limit of {max_body} bytes", code="too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # (a JSON error, or a number of over 4,300 digits, or nesting)
        why = "is nested too deeply" if isinstance(e, RecursionError) else "is not valid JSON"
        why = "holds a number too long to read" if "digits" in str(e) else why
        raise APIError(400, f"the request body {why}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


class AsyncOut:
    """An engine request's output channel read by the event loop: the engine thread puts, a coroutine gets."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()

    def put(self, item: str | None) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def get(self) -> str | None:
        return await self.queue.get()


def _client_errors(fn, *args):
    """fn(*args) for a worker thread, with vlstack's errors about the request turned into OpenAI's 4xx."""

    def run():
        try:
            return fn(*args)
        except PromptError as e:
            code = "context_length_exceeded" if "context" in str(e) else None
            raise APIError(400, str(e), "messages", code) from None
        except UnknownModel:  # unloaded while the prompt was encoded
            raise APIError(404, "The model does not exist (it was unloaded)", "model", "model_not_found") from None
        except VLStackError as e:
            raise APIError(400, str(e), "messages") from None

    return run


def _submit(
    engine: Engine,
    vlm: VLM,
    messages: list[dict],
    adapter: str | None,
    n: int,
    gen: SamplingParams,
    top_logprobs: int | None,
    loop: asyncio.AbstractEventLoop,
    tenant: str | None = None,
) -> list:
    """Encode the request (images decoded and tiled here, in a worker thread) and queue n completions."""
    inputs = vlm.processor(messages)
    seeds = [None if gen.seed is None else (gen.seed + i) % 2**64 for i in range(n)]  # n different samples
    params = [dataclasses.replace(gen, seed=seed) for seed in seeds]
    return [engine.submit(inputs, adapter, p, AsyncOut(loop), top_logprobs, tenant) for p in params]
