"""Tenants: API keys, the models each may use, and an append-only audit log.

The keys file (YAML or JSON):
    keys:
      - id: finance-team        # what the audit log and metrics name (never the key itself)
        key: sk-fin-...
        models: [finance]       # base model and/or adapter names this key may use; ["*"]: all
      - id: ops
        key: sk-ops-...
        models: ["*"]
        admin: true             # may load and unload adapters
A key used for a model outside its list gets 404, exactly as for a model that does not exist.
"""

from __future__ import annotations

import hmac
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..files import read_yaml


@dataclass(frozen=True)
class Tenant:
    id: str
    key: str
    models: tuple[str, ...]
    admin: bool = False

    def may_use(self, model: str) -> bool:
        return "*" in self.models or model in self.models


def read_keys(path: str | Path) -> list[Tenant]:
    path = Path(path)
    raw = read_yaml(path, "keys file")
    entries = raw.get("keys") if isinstance(raw, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: needs a non-empty 'keys' list")
    tenants = []
    for i, e in enumerate(entries):
        ok = isinstance(e, dict) and isinstance(e.get("id"), str) and isinstance(e.get("key"), str) and e["key"]
        models = e.get("models") if isinstance(e, dict) else None
        if not ok or not isinstance(models, list) or not all(isinstance(m, str) for m in models):
            raise ConfigError(f"{path}: key {i + 1} needs 'id', 'key' and a 'models' list")
        tenants.append(Tenant(e["id"], e["key"], tuple(models), bool(e.get("admin", False))))
    if len({t.key for t in tenants}) != len(tenants):
        raise ConfigError(f"{path}: the same key appears twice")
    return tenants


def find_tenant(tenants: list[Tenant], authorization: str | None) -> Tenant | None:
    """The tenant of an `Authorization: Bearer <key>` header (compared in constant time), or None."""
    if not authorization or not authorization.startswith("Bearer "):
        return None
    given = authorization[len("Bearer ") :].encode()
    found = None
    for t in tenants:
        if hmac.compare_digest(given, t.key.encode()):
            found = t
    return found


class AuditLog:
    """One JSON line per request: time, key id, model, token counts, status; content only if asked."""

    def __init__(self, path: str | Path, content: bool = False):
        self.path, self.content = Path(path), content
        try:  # checked at start-up: a log that cannot be written is the operator's error, not each request's
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.open("a").close()
        except OSError as e:
            raise ConfigError(f"the audit log {self.path} cannot be written: {e.strerror or e}") from None
        self.lock = threading.Lock()

    def write(self, **record) -> None:
        if not self.content:
            record.pop("content", None)
        line = json.dumps({"time": time.time(), **record})
        with self.lock, self.path.open("a") as f:
            f.write(line + "\n")
