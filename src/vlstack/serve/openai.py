"""OpenAI chat-completions request bodies -> vlstack's inputs, checked: messages with text and image_url
parts (data URLs; http(s) only when the operator allows it, fetched with a timeout and a size limit;
local files only under the operator's image directory) and the sampling fields. A bad field is an
APIError carrying OpenAI's error shape and a 4xx status.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi.responses import JSONResponse

from ..errors import ImageError


class APIError(Exception):
    """An error for the client: an HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        headers = {"Retry-After": "1"} if self.status == 503 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


def image_source(url: Any, allow_http: bool, image_dir: Path | None) -> str:
    """An image_url's url, checked: data URLs always; http(s) only if allowed; files only under image_dir."""
    if not isinstance(url, str) or not url:
        raise APIError(400, "image_url.url must be a non-empty string", "messages")
    if url.startswith("data:"):
        return url
    if url.startswith(("http://", "https://")):
        if not allow_http:
            raise APIError(400, "image URLs over http(s) are refused by this server; send a data: URL", "messages")
        return url  # fetched later by fetch_images, in a worker thread (off the event loop)
    path = Path(url[len("file://") :] if url.startswith("file://") else url)
    if image_dir is None:
        raise APIError(400, "local image files are refused by this server; send a data: URL", "messages")
    resolved = path.resolve() if path.is_absolute() else (image_dir / path).resolve()
    if not resolved.is_relative_to(image_dir.resolve()):
        raise APIError(400, "local image files must lie under the server's image directory", "messages")
    return str(resolved)


def read_messages(body: dict, allow_http: bool, image_dir: Path | None) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", "messages")
    out = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise APIError(400, "each message needs a role of system (or developer), user or assistant", "messages")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict):
                    raise APIError(400, "message content parts must be objects", "messages")
                if part.get("type") == "image_url":
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    parts.append({"type": "image_url", "image_url": {"url": image_source(url, allow_http, image_dir)}})
                elif part.get("type") == "text":
                    parts.append({"type": "text", "text": str(part.get("text", ""))})
                else:
                    raise APIError(400, f"unsupported content part type {part.get('type')!r}", "messages")
            content = parts
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise APIError(400, "message content must be a string or a list of parts", "messages")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


PENALTIES = ("presence_penalty", "frequency_penalty")
UNSUPPORTED = {  # fields this server does not implement, and the values that ask for nothing from them
    "tools": lambda v: not v,
    "functions": lambda v: not v,
    "tool_choice": lambda v: v in (None, "none"),
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
    "audio": lambda v: v is None,
    "modalities": lambda v: v in (None, ["text"]),
}


def read_sampling(body: dict, vocab: int) -> tuple[dict, int, int | None]:
    """OpenAI's sampling fields -> vlstack's generation options, n, and the top_logprobs to report (None: no
    logprobs); vocab: the model's number of tokens (for logit_bias). A field the server does not implement
    is refused rather than ignored, unless it asks for nothing (e.g. a `response_format` of text)."""
    for name, harmless in UNSUPPORTED.items():
        if not harmless(body.get(name)):
            raise APIError(400, f"'{name}' is not supported by this server", name)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    stop = body.get("stop")
    gen: dict[str, Any] = {
        "max_new_tokens": 256 if max_tokens is None else max_tokens,
        "temperature": 1.0 if body.get("temperature") is None else body["temperature"],
        "top_p": 1.0 if body.get("top_p") is None else body["top_p"],
        "top_k": body.get("top_k") or 0,  # vLLM's extension (-1 or 0: off)
        "seed": body.get("seed"),
        "stop": [stop] if isinstance(stop, str) else list(stop or []),
        "presence_penalty": body.get("presence_penalty") or 0.0,
        "frequency_penalty": body.get("frequency_penalty") or 0.0,
    }
    n = body.get("n") or 1
    bias = body.get("logit_bias") or {}
    top = body.get("top_logprobs")
    checks = [
        (isinstance(gen["max_new_tokens"], int) and gen["max_new_tokens"] >= 1, "max_tokens", "an integer >= 1"),
        (isinstance(gen["temperature"], (int, float)) and 0 <= gen["temperature"] <= 2, "temperature", "in [0, 2]"),
        (isinstance(gen["top_p"], (int, float)) and 0 < gen["top_p"] <= 1, "top_p", "in (0, 1]"),
        (isinstance(gen["top_k"], int) and gen["top_k"] >= -1, "top_k", "an integer >= -1"),
        (gen["seed"] is None or isinstance(gen["seed"], int), "seed", "an integer"),
        (all(isinstance(s, str) and s for s in gen["stop"]) and len(gen["stop"]) <= 4, "stop", "up to 4 strings"),
        (isinstance(n, int) and 1 <= n <= 16, "n", "an integer in [1, 16]"),
        (_bias_ok(bias, vocab), "logit_bias", f"an object mapping token ids below {vocab} to numbers in [-100, 100]"),
        *((isinstance(gen[p], (int, float)) and -2 <= gen[p] <= 2, p, "in [-2, 2]") for p in PENALTIES),
        (body.get("logprobs") in (None, True, False), "logprobs", "true or false"),
        (top is None or (isinstance(top, int) and 0 <= top <= 20), "top_logprobs", "an integer in [0, 20]"),
        (top is None or body.get("logprobs") is True, "top_logprobs", "given with 'logprobs': true"),
    ]
    for ok, name, what in checks:
        if not ok:
            raise APIError(400, f"'{name}' must be {what}", name)
    gen["top_k"] = max(0, gen["top_k"])
    gen["logit_bias"] = {int(t): b for t, b in bias.items()}
    return gen, n, (top or 0) if body.get("logprobs") else None


def _bias_ok(bias: Any, vocab: int) -> bool:
    return isinstance(bias, dict) and all(
        isinstance(t, str) and t.isdigit() and int(t) < vocab and isinstance(b, (int, float)) and -100 <= b <= 100
        for t, b in bias.items()
    )


def logprobs_content(entries: list[tuple], decode: Callable[[list[int]], str]) -> list[dict]:
    """The engine's (token, logprob, [(id, logprob)]) entries -> OpenAI's `logprobs.content` items (each
    token's text alone; a token holding part of a character shows U+FFFD, as in vLLM)."""

    def item(token: int, logprob: float) -> dict:
        text = decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", errors="replace"))}

    return [{**item(t, lp), "top_logprobs": [item(i, v) for i, v in top]} for t, lp, top in entries]


def fetch_image(url: str, timeout: float, max_bytes: int = 64 * 2**20) -> bytes:
    """The bytes of an http(s) image, with a timeout and a size limit."""
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "vlstack"})
        with urllib.request.urlopen(request, timeout=timeout) as r:
            data = r.read(max_bytes + 1)
    except urllib.error.HTTPError as e:
        raise ImageError(f"fetching {url} failed: HTTP {e.code}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise ImageError(f"fetching {url} failed: {getattr(e, 'reason', e)}") from None
    if len(data) > max_bytes:
        raise ImageError(f"the image at {url} is over the limit of {max_bytes} bytes")
    return data


def fetch_images(messages: list[dict], timeout: float) -> list[dict]:
    """messages with their http(s) image URLs replaced by the images' bytes."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [
                {"type": "image_url", "image_url": {"url": fetch_image(p["image_url"]["url"], timeout)}}
                if p["type"] == "image_url" and p["image_url"]["url"].startswith(("http://", "https://"))
                else p
                for p in content
            ]
        out.append({**m, "content": content})
    return out
