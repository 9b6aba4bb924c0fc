"""The server's catalog: the models it serves (the base and each adapter, those a key may see), and adapters
loaded and unloaded while it runs."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request

from ..errors import ConfigError, VLStackError
from ..layers.lora import check_name
from .openai import APIError, read_body
from .state import Server, server_of

router = APIRouter()


def cards(request: Request) -> list[dict]:
    """OpenAI's model objects of the base and each adapter, those this request's key may see."""
    server, created = server_of(request), int(time.time())
    data = [{"id": server.name, "object": "model", "created": created, "owned_by": "vlstack"}]
    for a in sorted(server.vlm.adapters):
        if a not in server.engine.retiring:
            root = server.roots.get(a, a)
            data.append(
                {
                    "id": a,
                    "object": "model",
                    "created": created,
                    "owned_by": "vlstack",
                    "parent": server.name,
                    "root": root,
                }
            )
    return [m for m in data if server.visible(request, m["id"])]


@router.get("/v1/models")
def models(request: Request) -> dict:
    return {"object": "list", "data": cards(request)}


@router.get("/v1/models/{model:path}")
def model(model: str, request: Request) -> dict:
    card = next((m for m in cards(request) if m["id"] == model), None)
    if card is None:  # (another tenant's adapter: the same answer)
        raise APIError(404, f"The model {model!r} does not exist", "model", "model_not_found")
    return card


def require_admin(request: Request) -> None:
    if request.state.tenant is not None and not request.state.tenant.admin:
        raise APIError(403, "this API key may not load or unload adapters", code="permission_denied")


def adapter_path(server: Server, path: str) -> str:
    """Where a hot-loaded adapter may come from: under --adapter-dir; anywhere only for an admin key."""
    root = server.adapter_root
    if root is not None:
        resolved = (root / path).resolve()
        if not resolved.is_relative_to(root):
            raise APIError(400, "the adapter's path must lie under the server's adapter directory", "path")
        return str(resolved)
    if server.tenants is None:
        why = "this server loads adapters only with --adapter-dir (paths under it) or --keys (an admin key)"
        raise APIError(403, why, code="permission_denied")
    return path


@router.post("/v1/adapters")
async def load_adapter(request: Request) -> dict:
    require_admin(request)
    server = server_of(request)
    engine = server.engine
    body = await read_body(request, server.max_body)
    adapter, path = body.get("name"), body.get("path")
    if not isinstance(adapter, str) or not adapter or not isinstance(path, str) or not path:
        raise APIError(400, "give the adapter's 'name' and the 'path' of its PEFT directory")
    try:
        check_name(adapter)
    except ConfigError as e:
        raise APIError(400, str(e), "name") from None
    path = adapter_path(server, path)
    if adapter == server.name or adapter in server.vlm.adapters:
        being = " and is being unloaded; retry when it is gone" if adapter in engine.retiring else ""
        raise APIError(409, f"a model named {adapter!r} is already served{being}", "name")
    try:  # in a worker thread: waiting for the engine's step must not block the event loop
        await asyncio.get_running_loop().run_in_executor(server.encoder, engine.load_adapter, adapter, path)
    except VLStackError as e:
        raise APIError(400, str(e), "path") from None
    server.roots[adapter] = path
    return {"id": adapter, "object": "model", "parent": server.name, "root": path}


@router.delete("/v1/adapters/{adapter}")
def unload_adapter(adapter: str, request: Request) -> dict:
    require_admin(request)
    server = server_of(request)
    if adapter not in server.vlm.adapters or adapter in server.engine.retiring:
        raise APIError(404, f"no adapter named {adapter!r} is loaded", "name", "model_not_found")
    server.engine.retire(adapter)  # new requests for it: 404 from now; it leaves once its running requests end
    server.roots.pop(adapter, None)
    return {"id": adapter, "object": "model", "deleted": True}
