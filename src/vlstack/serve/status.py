"""The server's status routes: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from .state import server_of

router = APIRouter()


@router.get("/health")
def health() -> dict:
    """Liveness: the process answers (a load balancer's restart signal when it does not)."""
    return {"status": "ok"}


@router.get("/health/ready")
def ready(request: Request) -> JSONResponse:
    """Readiness: the model loaded, a first request through it (on a GPU: its first graphs captured), the
    engine running; 503 until then (a load balancer's signal to send traffic here or not)."""
    server = server_of(request)
    engine, tp = server.engine, server.vlm.model.tp
    alive = engine.thread is not None and engine.thread.is_alive()
    if engine.ready.is_set() and alive:
        return JSONResponse({"status": "ready", "model": server.name, "tp": tp.size if tp else 1})
    reason = engine.unready or ("warming up" if alive else "the engine has stopped")
    return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)


@router.get("/metrics")
def prometheus(request: Request) -> PlainTextResponse:
    server = server_of(request)
    engine = server.engine
    gauges = {
        "vlstack_queue_depth": engine.waiting.qsize(),
        "vlstack_running_requests": len(engine.running),
        "vlstack_image_cache_bytes": engine.images.bytes,
    }
    totals = {
        "vlstack_image_cache_hits_total": engine.images.hits,
        "vlstack_image_cache_misses_total": engine.images.misses,
    }
    tenant = request.state.tenant
    shared = tenant is None or tenant.admin  # the whole server's traffic, queue and cache: admin keys only
    text = server.metrics.render(gauges, totals, lambda model: server.visible(request, model), shared)
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")
