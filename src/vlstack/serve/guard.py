"""The server's guard: API keys and the body-size limit before a request; its metrics, access-log line and audit
record after it."""

from __future__ import annotations

import sys
import time

from starlette.datastructures import Headers

from .auth import find_tenant
from .openai import APIError
from .state import Server


class Guard:
    """A pure ASGI middleware (FastAPI's @app.middleware would hide client disconnects from the endpoints)."""

    def __init__(self, app, server: Server) -> None:
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        server, max_body = self.server, self.server.max_body
        state, path, headers = scope.setdefault("state", {}), scope["path"], Headers(scope=scope)
        state["tenant"], error, status = None, None, 500
        if server.tenants is not None and path not in ("/health", "/health/ready"):  # (a load balancer's probes)
            state["tenant"] = find_tenant(server.tenants, headers.get("authorization"))
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
            if server.cfg.access_log:
                who = f" key={state['tenant'].id}" if state["tenant"] else ""
                client = (scope.get("client") or ("-",))[0]
                took = time.perf_counter() - start
                print(f"{client} {scope['method']} {path} {status} {took:.3f}s{who}", file=sys.stderr, flush=True)
            server.metrics.count("vlstack_http_requests_total", path=_route(path), status=str(status))
            if server.audit is not None and path.startswith("/v1/"):
                tenant = state["tenant"]
                server.audit.write(key_id=tenant.id if tenant else None, path=path, status=status, **record)


def _route(path: str) -> str:
    """A metrics label for a request path: the API's routes, and "other" (labels must stay few)."""
    if path.startswith("/v1/adapters/"):
        return "/v1/adapters/{name}"
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    known = ("/v1/chat/completions", "/v1/models", "/v1/adapters", "/health", "/health/ready", "/metrics")
    return path if path in known else "other"
