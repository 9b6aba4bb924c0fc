"""The server's chat completions (`POST /v1/chat/completions`): a request checked (serve/openai.py), its prompt
encoded in a worker thread (images fetched by threads of their own), its n completions queued on the engine, then
answered whole or streamed as server-sent events; its metrics and audit record when it ends."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..api import VLM
from ..chat import text_of
from ..engine.scheduler import Engine
from ..errors import PromptError, UnknownModel, VLStackError
from ..sampling import SamplingParams
from ..train.critic import MAX_BEST_OF
from .openai import (
    APIError,
    fetch_images,
    is_int,
    logprobs_content,
    read_body,
    read_messages,
    read_sampling,
    remote_images,
)
from .state import Server, server_of

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    server = server_of(request)
    vlm, engine, cfg = server.vlm, server.engine, server.cfg
    body = await read_body(request, server.max_body)
    model = body.get("model")
    if not isinstance(model, str):
        raise APIError(400, "'model' must be a string: the name of the base model or of an adapter", "model")
    served = model == server.name or (model in vlm.adapters and model not in engine.retiring)
    if not served or not server.visible(request, model):  # (another tenant's model: the same answer)
        raise APIError(404, f"The model {model!r} does not exist", "model", "model_not_found")
    messages = read_messages(body, cfg.allow_http_images, server.image_root)
    gen, n, top_logprobs = read_sampling(body, vlm.cfg.text.vocab_size)
    best = read_best_of(body, n, lambda name: name in vlm.adapters and server.visible(request, name))
    n = best[0] if best else n
    if engine.waiting.qsize() >= cfg.max_queue:
        why = f"the server is overloaded ({engine.waiting.qsize()} requests waiting); retry later"
        raise APIError(503, why, code="server_overloaded")
    adapter = None if model == server.name else model
    loop = asyncio.get_running_loop()
    if remote_images(messages):  # fetched by threads of their own (see fetcher)
        fetch = (fetch_images, messages, cfg.fetch_timeout, cfg.allow_private_image_hosts)
        messages = await loop.run_in_executor(server.fetcher, _client_errors(*fetch))
    tenant = request.state.tenant
    args = (engine, vlm, messages, adapter, n, gen, top_logprobs, loop, tenant.id if tenant else None)
    reqs = await loop.run_in_executor(server.encoder, _client_errors(_submit, *args))
    include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
    completion = Completion(server, request, model, messages, reqs, top_logprobs, include_usage, best)
    if body.get("stream"):
        return StreamingResponse(completion.events(), media_type="text/event-stream")
    return await completion.answer()


@dataclass
class Completion:
    """A chat request's n completions queued on the engine (reqs), answered whole or as events."""

    server: Server
    request: Request
    model: str
    messages: list[dict]
    reqs: list
    top_logprobs: int | None  # None: no log-probabilities
    include_usage: bool  # (a stream's last event carries the usage)
    best_of: tuple[int, str] | None = None  # (N, critic): the critic's best of the N completions is the answer
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    async def answer(self) -> dict | JSONResponse:
        """The whole answer, once every completion has ended."""
        watcher, texts = asyncio.create_task(self.watch()), []
        try:
            for r in self.reqs:
                texts.append("".join([p async for p in pieces(r)]))
        finally:
            watcher.cancel()
        self.request.state.audit = finished(self.server, self.model, self.reqs, self.messages)
        failed = next((r.error for r in self.reqs if r.finish_reason == "error"), None)
        if failed:
            raise APIError(500, f"the model failed on this request ({failed})")
        if not all(r.finish_reason for r in self.reqs):  # the client went away: nobody reads the answer
            return JSONResponse({}, status_code=499)
        picked = list(enumerate(zip(texts, self.reqs)))
        extra = {}
        if self.best_of is not None:  # one choice: the critic's pick (the usage still counts every sample)
            scores = await asyncio.get_running_loop().run_in_executor(self.server.encoder, self.judge, texts)
            k = max(range(len(texts)), key=lambda i: scores[i])
            picked = [(0, (texts[k], self.reqs[k]))]
            extra = {"best_of": {"n": len(texts), "critic": self.best_of[1], "scores": scores, "chosen": k}}
        choices = []
        for i, (text, r) in picked:
            message = {"role": "assistant", "content": text}
            ending = {"logprobs": self.logprobs(r), "finish_reason": r.finish_reason}
            choices.append({"index": i, "message": message, **ending})
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": _usage(self.reqs),
            **extra,
        }

    def judge(self, texts: list[str]) -> list[float]:
        """The critic's scores of the completions (train/critic.py), between the engine's steps: of the question
        the last user message asks, with its images (<image> where each stands)."""
        from ..train.critic import critic_scores

        question, images = text_of(next(m["content"] for m in reversed(self.messages) if m["role"] == "user"))
        with self.server.engine.lock:  # (the engine's thread runs the model only while holding it)
            return critic_scores(self.server.vlm, self.best_of[1], question, images, texts)

    async def events(self) -> AsyncIterator[str]:
        """Server-sent events: the role, each completion's pieces as they come, its end, the usage, [DONE]."""
        try:
            opening = {"delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            yield self.chunk([{"index": i, **opening} for i in range(len(self.reqs))])
            for i, r in enumerate(self.reqs):
                sent = 0  # r's logprobs sent: a piece carries those of the tokens that made it (and any after)
                async for piece in pieces(r):
                    choice = {"index": i, "delta": {"content": piece}, "finish_reason": None}
                    if self.top_logprobs is not None:
                        end = len(r.logprobs)  # (the engine may be adding more meanwhile)
                        choice["logprobs"], sent = self.logprobs(r, sent, end), end
                    yield self.chunk([choice])
                if r.finish_reason == "error":  # OpenAI's SDKs raise on an event with an error
                    yield f"data: {json.dumps({'error': {'message': r.error, 'type': 'server_error'}})}\n\n"
                    return
                if not r.finish_reason:
                    return  # the client went away
                last = {"index": i, "delta": {}, "finish_reason": r.finish_reason}
                if self.top_logprobs is not None:  # tokens that made no text (e.g. one completing a stop string)
                    last["logprobs"] = self.logprobs(r, sent)
                yield self.chunk([last])
            if self.include_usage:
                yield self.chunk([], usage=_usage(self.reqs))
            yield "data: [DONE]\n\n"
        finally:
            for r in self.reqs:  # a no-op for finished requests; frees the slots of abandoned ones
                self.server.engine.cancel(r)
            self.request.state.audit = finished(self.server, self.model, self.reqs, self.messages)

    def chunk(self, choices: list[dict], **extra) -> str:
        body = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }
        return f"data: {json.dumps(body)}\n\n"

    def logprobs(self, r, start: int = 0, end: int | None = None) -> dict | None:
        """OpenAI's `logprobs` of r's tokens start..end (None when not asked for)."""
        if self.top_logprobs is None:
            return None
        decode = self.server.vlm.processor.decode
        return {"content": logprobs_content(r.logprobs[start:end], decode), "refusal": None}

    async def watch(self) -> None:
        """Cancel the requests if the client hangs up (a stream notices by itself; a plain response not)."""
        while not all(r.finished_at for r in self.reqs):
            if await self.request.is_disconnected():
                for r in self.reqs:
                    self.server.engine.cancel(r)
                return
            await asyncio.sleep(0.5)


async def pieces(r) -> AsyncIterator[str]:
    """r's text as it comes, until it ends (finished or cancelled)."""
    while (piece := await r.out.get()) is not None:
        yield piece


def finished(server: Server, model: str, reqs: list, messages: list) -> dict:
    """Metrics of a chat request that ended (answered, or abandoned by its client: 499); its audit record."""
    failed = any(r.finish_reason == "error" for r in reqs)
    status = 500 if failed else 200 if all(r.finish_reason for r in reqs) else 499
    usage = _usage(reqs)
    server.metrics.count("vlstack_requests_total", model=model, status=str(status))
    server.metrics.count("vlstack_prompt_tokens_total", usage["prompt_tokens"], model=model)
    server.metrics.count("vlstack_completion_tokens_total", usage["completion_tokens"], model=model)
    for r in reqs:
        if r.first_token_at is not None:
            server.metrics.observe("vlstack_time_to_first_token_seconds", r.first_token_at - r.submitted, model=model)
        if r.finished_at is not None:
            server.metrics.observe("vlstack_request_seconds", r.finished_at - r.submitted, model=model)
            if r.generated > 1:
                per_token = (r.finished_at - r.first_token_at) / (r.generated - 1)
                server.metrics.observe("vlstack_time_per_output_token_seconds", per_token, model=model)
    tokens = {k: usage[k] for k in ("prompt_tokens", "completion_tokens")}
    return {"model": model, **tokens, "content": messages, "status": status}


def _usage(reqs: list) -> dict:
    """OpenAI's usage of a request's n completions (one prompt, counted once)."""
    prompt, completion = len(reqs[0].prompt), sum(r.generated for r in reqs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


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


def read_best_of(body: dict, n: int, known: Callable[[str], bool]) -> tuple[int, str] | None:
    """The extension fields `best_of` (N samples) and `critic` (a loaded critic adapter's name; known(name)
    says whether this client may use it): (N, critic), or None when not asked for."""
    best, critic = body.get("best_of"), body.get("critic")
    if best is None and critic is None:
        return None
    if not is_int(best) or not 2 <= best <= MAX_BEST_OF:
        raise APIError(400, f"'best_of' must be an integer in [2, {MAX_BEST_OF}], given with 'critic'", "best_of")
    if not isinstance(critic, str) or not known(critic):
        raise APIError(
            400, "'critic' must name a loaded critic adapter (objective: prm), given with 'best_of'", "critic"
        )
    if n != 1 or body.get("stream"):
        raise APIError(400, "'best_of' answers with one choice, whole: not with 'n' > 1 or 'stream'", "best_of")
    return best, critic
