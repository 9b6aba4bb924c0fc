"""OpenAI chat-completions request bodies -> vlstack's inputs, checked: messages with text and image_url
parts (data URLs; http(s) only when the operator allows it, fetched with a timeout and a size limit;
local files only under the operator's image directory) and the sampling fields. A bad field is an
APIError carrying OpenAI's error shape and a 4xx status.
"""

from __future__ import annotations

import functools
import http.client
import ipaddress
import json
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from ..errors import ImageError
from ..sampling import SamplingError, SamplingParams, is_int, is_unicode


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
                    parts.append({"type": "text", "text": _text(part.get("text", ""), "messages")})
                else:
                    raise APIError(400, f"unsupported content part type {part.get('type')!r}", "messages")
            content = parts
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise APIError(400, "message content must be a string or a list of parts", "messages")
        else:  # plain text, as in a text part: OpenAI's strings carry no image placeholders
            content = [{"type": "text", "text": _text(content, "messages")}]
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


def _text(value: Any, param: str) -> str:
    """A string field that reaches the tokenizer, checked (JSON can carry lone surrogates UTF-8 cannot)."""
    if not isinstance(value, str):
        raise APIError(400, f"'{param}' text must be a string", param)
    if not is_unicode(value):
        raise APIError(400, f"'{param}' holds text that is not valid Unicode (a lone surrogate)", param)
    return value


UNSUPPORTED = {  # fields this server does not implement, and the values that ask for nothing from them
    "tools": lambda v: not v,
    "functions": lambda v: not v,
    "tool_choice": lambda v: v in (None, "none"),
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
    "audio": lambda v: v is None,
    "modalities": lambda v: v in (None, ["text"]),
}


def read_sampling(body: dict, vocab: int) -> tuple[SamplingParams, int, int | None]:
    """OpenAI's sampling fields -> vlstack's generation options (checked by SamplingParams, an error naming the
    OpenAI field), n, and the top_logprobs to report (None: no logprobs); vocab: the model's number of tokens
    (for logit_bias). A field the server does not implement is refused rather than ignored, unless it asks for
    nothing (e.g. a `response_format` of text)."""
    for name, harmless in UNSUPPORTED.items():
        if not harmless(body.get(name)):
            raise APIError(400, f"'{name}' is not supported by this server", name)
    n, top = 1 if body.get("n") is None else body["n"], body.get("top_logprobs")
    checks = [
        (is_int(n) and 1 <= n <= 16, "n", "an integer in [1, 16]"),
        (body.get("logprobs") in (None, True, False), "logprobs", "true or false"),
        (body.get("stream") in (None, True, False), "stream", "true or false"),
        (body.get("stream_options") is None or isinstance(body["stream_options"], dict), "stream_options", "an object"),
        (top is None or (is_int(top) and 0 <= top <= 20), "top_logprobs", "an integer in [0, 20]"),
        (top is None or body.get("logprobs") is True, "top_logprobs", "given with 'logprobs': true"),
    ]
    for ok, name, what in checks:
        if not ok:
            raise APIError(400, f"'{name}' must be {what}", name)
    given = {
        "max_new_tokens": next(
            (body[f] for f in ("max_completion_tokens", "max_tokens") if body.get(f) is not None), None
        ),  # (a null one is not given)
        "temperature": 1.0 if body.get("temperature") is None else body["temperature"],  # OpenAI's default
        **{f: body.get(f) for f in ("top_p", "top_k", "seed", "stop", "presence_penalty", "frequency_penalty")},
        "logit_bias": body.get("logit_bias"),
    }
    try:
        params = SamplingParams(**{k: v for k, v in given.items() if v is not None})
        params.check_vocab(vocab)
    except SamplingError as e:
        name = "max_tokens" if e.field == "max_new_tokens" else e.field
        raise APIError(400, f"'{name}' must be {e.what}", name) from None
    return params, n, (top or 0) if body.get("logprobs") else None


def logprobs_content(entries: list[tuple], decode: Callable[[list[int]], str]) -> list[dict]:
    """The engine's (token, logprob, [(id, logprob)]) entries -> OpenAI's `logprobs.content` items (each
    token's text alone; a token holding part of a character shows U+FFFD, as in vLLM)."""

    def item(token: int, logprob: float) -> dict:
        text = decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", errors="replace"))}

    return [{**item(t, lp), "top_logprobs": [item(i, v) for i, v in top]} for t, lp, top in entries]


def public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether an address is on the public internet (not private, loopback, link-local, reserved, multicast)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class _Checked:
    """An http.client connection that connects only to public addresses (unless allowed): the address checked
    is the one connected to, after DNS resolution, on every connection (every redirect opens its own)."""

    allow_private = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = self._connect

    def _connect(self, address: tuple, timeout: float | None = None, source_address=None) -> socket.socket:
        host, port = address
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        for *_, sockaddr in infos:
            if not self.allow_private and not public(ipaddress.ip_address(sockaddr[0].split("%")[0])):
                raise ImageError(
                    f"the image host {host} is a private, loopback or link-local address; refused "
                    f"(the operator may allow it with --allow-private-image-hosts)"
                )
        family, kind, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.settimeout(timeout)
        _FETCH.sockets.append(sock)  # (shut at the fetch's deadline, whatever it is waiting for)
        try:
            sock.connect(sockaddr)
        except BaseException:
            sock.close()
            raise
        return sock


_FETCH = threading.local()  # this thread's fetch: its sockets
PER_HOST = 8  # fetches in flight from one host at most (of the server's 32 fetching threads)
_in_flight: Counter = Counter()
_in_flight_lock = threading.Lock()


@functools.cache
def _opener(allow_private: bool) -> urllib.request.OpenerDirector:
    """The opener of checked connections (one of each kind, made once: its handlers keep no state)."""
    http_conn = type("CheckedHTTP", (_Checked, http.client.HTTPConnection), {"allow_private": allow_private})
    https_conn = type("CheckedHTTPS", (_Checked, http.client.HTTPSConnection), {"allow_private": allow_private})

    class HTTP(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(http_conn, req)

    class HTTPS(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(https_conn, req, context=self._context)

    return urllib.request.build_opener(HTTP, HTTPS)


def fetch_image(url: str, timeout: float, max_bytes: int = 64 * 2**20, allow_private: bool = False) -> bytes:
    """The bytes of an http(s) image, within `timeout` seconds in all (connection, headers and body: a timer
    shuts the connection at the deadline) and a size limit, from public hosts only unless allow_private; at most
    PER_HOST fetches from one host at once (a slow host cannot take every fetching thread)."""
    host = urllib.parse.urlsplit(url).hostname or ""
    with _in_flight_lock:
        if _in_flight[host] >= PER_HOST:
            raise ImageError(f"{PER_HOST} images are being fetched from {host} already; retry later")
        _in_flight[host] += 1
    _FETCH.sockets = []
    expired = threading.Event()  # set by the timer, before it shuts the connection

    def deadline(sockets: list[socket.socket]) -> None:
        expired.set()
        for s in list(sockets):
            _shut(s)

    timer = threading.Timer(timeout, deadline, (_FETCH.sockets,))
    timer.daemon = True
    timer.start()
    try:
        data = _fetch(url, timeout, max_bytes, allow_private)
    except ImageError:
        if not expired.is_set():
            raise
        data = None  # (what the connection shut at the deadline raised: the deadline is the reason)
    finally:
        timer.cancel()
        with _in_flight_lock:
            _in_flight[host] -= 1
            if not _in_flight[host]:
                del _in_flight[host]
    # a connection shut at the deadline can also end as a "complete" reply (headers cut off, an empty body): the
    # timer's flag, not the clock read here, says whether the deadline came first
    if data is None or expired.is_set():
        raise ImageError(f"fetching {url} took over {timeout:g} s; refused")
    return data


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # (closed already)
        pass


def _fetch(url: str, timeout: float, max_bytes: int, allow_private: bool) -> bytes:
    deadline = time.monotonic() + timeout
    chunks, size = [], 0
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "vlstack"})
        with _opener(allow_private).open(request, timeout=timeout) as r:
            while chunk := r.read1(1 << 16):  # one receive at a time: a host trickling bytes meets the deadline
                chunks.append(chunk)
                size += len(chunk)
                if size > max_bytes:
                    raise ImageError(f"the image at {url} is over the limit of {max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise ImageError(f"fetching {url} took over {timeout:g} s; refused")
    except urllib.error.HTTPError as e:
        raise ImageError(f"fetching {url} failed: HTTP {e.code}") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, ImageError):
            raise e.reason from None
        raise ImageError(f"fetching {url} failed: {e.reason}") from None
    except (TimeoutError, OSError, http.client.HTTPException, ValueError) as e:
        raise ImageError(f"fetching {url} failed: {e}") from None
    return b"".join(chunks)


def _remote(part: dict) -> bool:
    return part["type"] == "image_url" and part["image_url"]["url"].startswith(("http://", "https://"))


def remote_images(messages: list[dict]) -> bool:
    """Whether checked messages (read_messages) hold http(s) image URLs."""
    return any(isinstance(m["content"], list) and any(_remote(p) for p in m["content"]) for m in messages)


def fetch_images(messages: list[dict], timeout: float, allow_private: bool = False) -> list[dict]:
    """messages with their http(s) image URLs replaced by the images' bytes."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [
                {
                    "type": "image_url",
                    "image_url": {"url": fetch_image(p["image_url"]["url"], timeout, allow_private=allow_private)},
                }
                if _remote(p)
                else p
                for p in content
            ]
        out.append({**m, "content": content})
    return out


async def read_body(request: Request, max_body: int) -> dict:
    """The request's JSON object, read as it arrives up to max_body bytes; OpenAI's 4xx for anything else."""
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
