"""A remote OpenAI-compatible endpoint as a model to evaluate: the same prompts (images as data URLs), greedy,
`concurrency` requests in flight, retries with backoff on 429, 5xx and dropped connections (Retry-After
honoured), and a clear error on 401/403 (the key) and 404 (the model or the URL). Standard library only."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..errors import EndpointError


class Endpoint:
    """`generate` like VLM.generate, over an endpoint's /chat/completions."""

    def __init__(
        self,
        base: str,
        model: str,
        key: str | None = None,
        concurrency: int = 8,
        retries: int = 5,
        timeout: float = 120.0,
        backoff: float = 1.0,
    ):
        parts = urllib.parse.urlsplit(base)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise EndpointError(f"--api-base {base!r} is not an http(s) URL (e.g. https://api.openai.com/v1)")
        self.url = base.rstrip("/") + "/chat/completions"
        self.name, self.key, self.concurrency = model, key, concurrency
        self.retries, self.timeout, self.backoff = retries, timeout, backoff

    def generate(
        self,
        conversations: list[list[dict]],
        adapters: list[str | None] | None = None,
        max_new_tokens: int = 64,
        usage: list[dict] | None = None,
    ) -> list[str]:
        """The answer to each conversation (adapters: not used: the endpoint's model is the model); a list
        given as usage receives each answer's prompt and completion tokens."""
        with ThreadPoolExecutor(self.concurrency) as pool:
            replies = list(pool.map(lambda m: self._ask(m, max_new_tokens), conversations))
        if usage is not None:
            usage[:] = [
                {
                    "prompt_tokens": u.get("prompt_tokens", 0),
                    "completion_tokens": u.get("completion_tokens", 0),
                    "finish_reason": r,
                }
                for _, u, r in replies
            ]
        return [text for text, _, _ in replies]

    def _ask(self, messages: list[dict], max_tokens: int) -> tuple[str, dict, str]:
        body = json.dumps({"model": self.name, "messages": messages, "max_tokens": max_tokens, "temperature": 0})
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.url, body.encode(), headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    reply = json.loads(response.read())
                choice = reply["choices"][0]
                return choice["message"]["content"] or "", reply.get("usage") or {}, choice.get("finish_reason", "")
            except urllib.error.HTTPError as e:
                detail = _detail(e)
                if e.code in (401, 403):
                    raise EndpointError(f"{self.url} refused the API key ({e.code}): {detail}") from None
                if e.code == 404:
                    raise EndpointError(
                        f"{self.url}: no model {self.name!r} there, or no such URL (404): {detail}"
                    ) from None
                if e.code != 429 and e.code < 500:
                    raise EndpointError(f"{self.url} answered {e.code}: {detail}") from None
                wait = _retry_after(e) or self.backoff * 2**attempt
                failure = f"{e.code}: {detail}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                wait, failure = self.backoff * 2**attempt, str(getattr(e, "reason", e))
            except (KeyError, IndexError, TypeError, json.JSONDecodeError) as e:
                raise EndpointError(f"{self.url} gave an answer that is not OpenAI's chat completion: {e}") from None
            if attempt < self.retries:
                time.sleep(min(wait, 60.0))
        raise EndpointError(f"{self.url} failed {self.retries + 1} times; the last: {failure}")


def _detail(error: urllib.error.HTTPError) -> str:
    """The error message an OpenAI-style endpoint puts in its body, or the start of the body."""
    try:
        raw = error.read().decode("utf-8", "replace")
    except OSError:
        return error.reason or ""
    try:
        return str(json.loads(raw)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return raw[:200]


def _retry_after(error: urllib.error.HTTPError) -> float | None:
    value: Any = error.headers.get("Retry-After") if error.headers else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
