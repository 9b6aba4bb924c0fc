"""OpenAI's chat-completions API over one base model and its LoRA adapters (FastAPI).

The request's `model` picks the adapter (the base model's own name: no adapter). Errors use OpenAI's
shape `{"error": {"message", "type", "param", "code"}}` with 4xx for the client's mistakes, so SDKs
do not retry them. Request bodies are read and checked by openai.py, encoded (images fetched, decoded and
tiled) in worker threads, then batched continuously by engine/scheduler.py. The routes, by concern: chat.py,
catalog.py (models and adapters), status.py (health and metrics), over the state they share (state.py); guard.py
checks keys and sizes before a request and records it after.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..api import VLM
from . import catalog, chat, status
from .auth import AuditLog, Tenant
from .guard import Guard
from .openai import APIError
from .state import ServeConfig, Server, make_engine


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
    server = Server(vlm, name, cfg, engine, encoder, fetcher, tenants, audit)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        encoder.shutdown(cancel_futures=True)
        fetcher.shutdown(cancel_futures=True)
        engine.close()

    app = FastAPI(title="vlstack", lifespan=lifespan)
    app.state.server, app.state.engine = server, engine
    app.add_middleware(Guard, server=server)
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    for routes in (chat, catalog, status):
        app.include_router(routes.router)
    return app


async def api_error(_: Request, e: APIError) -> JSONResponse:
    return e.response()


async def http_error(request: Request, e: HTTPException) -> JSONResponse:  # 404, 405: in OpenAI's shape too
    what = {
        404: f"no such endpoint: {request.url.path}",
        405: f"{request.method} is not allowed on {request.url.path}",
    }.get(e.status_code, str(e.detail))
    response = APIError(e.status_code, what, code="not_found" if e.status_code == 404 else None).response()
    response.headers.update(e.headers or {})
    return response
