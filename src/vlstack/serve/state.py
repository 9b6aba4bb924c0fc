"""What the server's routes share: the operator's config (ServeConfig) and the state of one served model (Server)."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request

from ..api import VLM
from ..engine.scheduler import Engine
from ..errors import ConfigError
from ..layers.lora import slots_of
from .auth import AuditLog, Tenant
from .metrics import Metrics


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
        slots_of(vlm.model).reserve(cfg.max_adapters or 8, cfg.max_lora_rank or 64)
    return vlm.engine(
        cfg.max_batch,
        kv_budget=cfg.kv_budget,
        max_len=cfg.max_model_len,
        prefill_tokens=cfg.prefill_tokens,
        image_cache_mb=cfg.image_cache_mb,
        vision_tokens=cfg.vision_tokens,
        background=background,
    )


@dataclass
class Server:
    """One base model served as `name` with its adapters: the engine, the threads that encode prompts and fetch
    images, the metrics, the tenants (None: no keys) and the audit log."""

    vlm: VLM
    name: str
    cfg: ServeConfig
    engine: Engine
    encoder: ThreadPoolExecutor
    fetcher: ThreadPoolExecutor
    tenants: list[Tenant] | None = None
    audit: AuditLog | None = None
    metrics: Metrics = field(default_factory=Metrics)
    roots: dict[str, str] = field(default_factory=dict)  # adapter name -> the directory it came from

    @property
    def max_body(self) -> int:
        return int(self.cfg.max_body_mb * 2**20)

    @property
    def image_root(self) -> Path | None:
        return Path(self.cfg.image_dir) if self.cfg.image_dir else None

    @property
    def adapter_root(self) -> Path | None:
        return Path(self.cfg.adapter_dir).resolve() if self.cfg.adapter_dir else None

    def visible(self, request: Request, model: str) -> bool:
        """Whether the request's key may see and use this model (no keys: every model)."""
        tenant = request.state.tenant
        return tenant is None or tenant.may_use(model)


def server_of(request: Request) -> Server:
    return request.app.state.server
