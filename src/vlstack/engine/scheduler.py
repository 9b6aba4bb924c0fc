"""The engine (its scheduler): continuous batching over one model and its adapters.

Requests join and leave the running batch at every decode step. Each running request owns a slot of a KV cache
preallocated for `max_batch` sequences of up to `max_len` tokens; a request waits in the queue (it is never refused
for lack of room) until a slot is free and the tokens it may still need fit in `kv_budget`. The requests admitted at
one step (up to `prefill_tokens` prompt tokens) are prefilled together: their new images through the vision encoder
in passes of up to `vision_tokens` encoder tokens (images seen before come from the cache of visual embeddings;
passes bound the encoder's temporaries: BENCHMARKS.md, "Measurements behind the code"), their prompts packed back to
back in one forward. Then every step decodes one token for all running requests at once, each row with its own
adapter (the base matmul once, each adapter on its rows), its own sampling parameters and seed, the running requests
kept in cache slots 0..B-1 so that the step (engine/runner.py: static, a CUDA graph per batch bucket on a GPU) reads
the cache in place. Prompts, images included, are decoded, tiled, hashed and checked by the caller's thread before
submission, so that work runs in parallel with the engine.

A request's problem is that request's alone: a step that raises is run again over each half of its requests,
down to the one that makes it fail, which alone ends with the error. An adapter being unloaded takes no new
requests (retire) and leaves the model once the requests it has accepted have finished.
"""

from __future__ import annotations

import queue
import threading
import time
import traceback
from typing import Any

import torch

from ..adapters import Loaded
from ..chat import Processor, question_messages
from ..errors import ConfigError, UnknownModel
from ..layers.kv_cache import KVCache
from ..layers.lora import adapter_names
from ..layers.step import upload
from ..models.internvl import InternVL
from ..parallel.tp import cache_config
from ..sampling import SamplingParams
from .ahead import Ahead
from .feature_cache import FeatureCache
from .mirror import OPS, Mirror
from .request import Request
from .runner import Decoder
from .sampler import adjust, logprobs, sample_rows
from .vision import chunk_features, encode, vision_adapters

STEP_TOKENS = {"cpu": (8192, 8192), "cuda": (16384, 32768)}  # device -> default (prefill, vision) tokens a step


class Engine:
    def __init__(
        self,
        model: InternVL,
        processor: Processor,
        eos: set[int],
        adapters: Loaded | None = None,
        max_batch: int = 16,
        kv_budget: int | None = None,
        max_len: int | None = None,
        prefill_tokens: int | None = None,
        image_cache_mb: float = 512,
        vision_tokens: int | None = None,
        background: bool = True,
        static: bool | None = None,
        overlap: bool | None = None,
    ):
        """With background, a thread of the engine's own runs its steps as requests come (the server); without,
        the caller runs them with step() (VLM.chat and the other generators). static: the static decode step
        (runner.Decoder; default: on a GPU); overlap: the decode step launched before the step before's tokens
        are read back (default: on a GPU)."""
        prefill, vision = STEP_TOKENS[model.device.type]  # a GPU takes much larger steps than a CPU
        self.model, self.processor, self.eos, self.cfg = model, processor, eos, model.cfg
        self.adapters = Loaded(model) if adapters is None else adapters
        self.max_batch, self.prefill_tokens = max_batch, prefill_tokens or prefill
        self.vision_tokens = vision_tokens or vision  # vision-encoder tokens per pass (bounds its activations)
        context = model.cfg.text.max_position_embeddings
        self.max_len = min(max_len or context, context)
        self.kv_budget = kv_budget or max_batch * self.max_len
        shape = cache_config(model.cfg.text, model.tp).kv_shape(max_batch, self.max_len)  # (TP: this rank's heads)
        self.cache_bytes = KVCache.nbytes(shape, model.dtype)
        try:
            self.cache = KVCache(shape, model.dtype, model.device)
        except (RuntimeError, MemoryError):  # torch.OutOfMemoryError is a RuntimeError
            raise ConfigError(
                f"the KV cache for {max_batch} requests of {self.max_len} tokens needs "
                f"{self.cache_bytes / 2**30:.1f} GiB, more than is free; lower --max-batch or --max-model-len"
            ) from None
        self.decoder = Decoder(model, self.cache, static)
        tp = model.tp  # under tensor parallelism, rank 0's serving engine broadcasts each model call
        self.mirror = Mirror() if tp is not None and tp.rank == 0 and background else None  # (mirror.py)
        self.images = FeatureCache(int(image_cache_mb * 2**20))
        self.vision_adapters: set[str] = set()  # (as of the last admission: adapters come and go between steps)
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.running: list[Request] = []
        self.prefilling: list[Request] = []  # holding a slot, their prompts going into the cache chunk by chunk
        # the decode step runs one step ahead of reading its tokens back (default: on a GPU, whose step then
        # runs while the host sends the step before's text): the rows whose last token is still on the device
        self.overlap = model.device.type == "cuda" if overlap is None else overlap
        self.ahead: Ahead | None = None
        self.free = list(range(max_batch))
        self.retiring: set[str] = set()  # adapters being unloaded: no new requests, gone once theirs finish
        self.lock = threading.Lock()  # held while the model runs: adapters load and unload between steps
        self._stop = threading.Event()
        self._wake = threading.Event()  # set when a request arrives
        # readiness (a background engine): set once a first short request has gone through (on a GPU: the first
        # decode graphs captured); `unready` says why it is not, when the warm-up failed
        self.ready, self.unready = threading.Event(), None
        self.thread = threading.Thread(target=self._loop, name="vlstack-engine", daemon=True) if background else None
        if self.thread is not None:
            self.thread.start()

    def submit(
        self,
        inputs: dict[str, torch.Tensor],
        adapter: str | None,
        params: SamplingParams,
        out: Any = None,
        top_logprobs: int | None = None,
        tenant: str | None = None,
    ) -> Request:
        """Queue an encoded prompt; its text arrives in request.out (a queue.Queue unless another object with
        put() is given) as pieces, then None. With top_logprobs (0-20), each token's log-probability under the
        model (its raw distribution, before logit_bias, penalties, temperature or top_p) and those of the
        top_logprobs likeliest tokens are added to request.logprobs before the text they make is put. tenant:
        the key's id that sent it (its images' cached features are its own)."""
        req = Request.of(inputs, adapter, params, self.cfg, self.processor.decode, self.max_len, top_logprobs, tenant)
        if adapter is not None and (adapter not in adapter_names(self.model) or adapter in self.retiring):
            raise UnknownModel(f"no adapter named {adapter!r} is loaded")
        if out is not None:
            req.out = out
        self.waiting.put(req)
        self._wake.set()
        return req

    def cancel(self, req: Request) -> None:
        req.cancelled = True

    def retire(self, name: str) -> None:
        """Unload adapter `name` once the requests it has accepted have finished; from now on submit refuses it."""
        if name not in self.adapters:
            raise UnknownModel(f"no adapter named {name!r} is loaded")
        self.retiring.add(name)
        self._wake.set()

    def adapter_changed(self, name: str) -> None:
        """Call (holding self.lock) after loading or unloading an adapter: drops what it encoded."""
        self.images.drop_adapter(name)

    def load_adapter(self, name: str, path: str) -> None:
        """Hot-load an adapter between steps (on every rank under tensor parallelism)."""
        with self.lock:
            self._run("load", name, path)
            self.adapter_changed(name)

    def _run(self, op: str, *args):
        """One of the model calls of mirror.py's OPS, on this process (and broadcast to the other ranks
        first, under tensor parallelism)."""
        if self.mirror is not None:
            self.mirror.send(op, args)
        return OPS[op](self, *args)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self.thread is not None:
            self.thread.join(timeout=10)

    def step(self) -> None:
        """One step: adapters whose requests have all finished unloaded, queued requests admitted (their images
        encoded), then one forward over the next chunks of the prompts being prefilled (up to prefill_tokens)
        and one new token of every running request."""
        with self.lock:
            if self.retiring:
                self._unload_retired()
            with torch.inference_mode():
                try:
                    batch = self._admit()
                    if batch:
                        self._isolate(self._encode, batch)
                    chunks = self._chunks()
                    if not chunks and self.running:
                        self._compact()
                    if not chunks and self.running and self._may_look_ahead():
                        self._look_ahead()
                    elif chunks or self.running:
                        self._settle()
                        self._isolate(self._forward, chunks + [r for r in self.running if r.finished_at is None])
                except Exception as e:  # a fault of the engine itself: fail what it holds and go on serving
                    traceback.print_exc()
                    self._fail(self.running + self.prefilling, e)

    # the engine thread -------------------------------------------------------------------------------

    def _warm_up(self) -> None:
        """Before serving: one short request through a prefill and decode steps; then ready."""
        try:
            req = self.submit(self.processor(question_messages("hi", 0)), None, SamplingParams(max_new_tokens=2))
            while req.finished_at is None:
                self.step()
            if req.exception is not None:
                raise req.exception
        except Exception as e:  # noqa: BLE001 (reported by /health/ready; requests still get their own errors)
            traceback.print_exc()
            self.unready = f"the warm-up request failed: {type(e).__name__}: {e}"
            return
        self.ready.set()

    def _loop(self) -> None:
        self._warm_up()
        while not self._stop.is_set():
            self._wake.clear()
            if not self.running and not self.prefilling and self.waiting.empty() and not self.retiring:
                self._wake.wait(1.0)  # idle until a request arrives
                if self.mirror is not None and time.monotonic() - self.mirror.last > 1.0:
                    with self.lock:
                        self._run("ping")  # (the other ranks know rank 0 lives; it learns if one died)
                continue
            self.step()

    def _isolate(self, step, reqs: list[Request]) -> None:
        """step(reqs); if it raises, step over each half again (a failed step changes no request: the cache
        positions it wrote are written again), so only the request that makes it fail ends with the error and
        every other one goes on."""
        try:
            step(reqs)
        except Exception as e:
            if len(reqs) == 1:
                if self.thread is not None:  # (a caller running the steps gets the exception itself)
                    print(f"vlstack: one request failed and was ended: {type(e).__name__}: {e}", flush=True)
                self._fail(reqs, e)
                return
            half = len(reqs) // 2
            for part in (reqs[:half], reqs[half:]):
                self._isolate(step, [r for r in part if r.finished_at is None])

    def _fail(self, reqs: list[Request], error: Exception) -> None:
        """End these requests with finish_reason "error" and free their slots."""
        for req in reqs:
            if req.finished_at is None:
                req.finish_reason, req.error = "error", f"{type(error).__name__}: {error}"
                req.exception = error
                self._end(req)
        self.running = [r for r in self.running if r not in reqs]
        self.prefilling = [r for r in self.prefilling if r not in reqs]
        if self.ahead is not None:
            self.ahead = self.ahead.keep([r for r in self.ahead.rows if r not in reqs])

    def _unload_retired(self) -> None:
        """Unload the retiring adapters that no accepted request uses any more."""
        with self.waiting.mutex:
            busy = {r.adapter for r in (*self.waiting.queue, *self.prefilling, *self.running) if r.finished_at is None}
        for name in self.retiring - busy:
            self.retiring.discard(name)
            try:
                self._run("unload", name)
                self.adapter_changed(name)
            except Exception:  # never die: the adapter stays loaded (and turned away), the engine serves on
                traceback.print_exc()

    def _admit(self) -> list[Request]:
        """Move queued requests into free slots while their KV budget fits and this step's prompt tokens are not
        all spoken for; returns them (their images to encode)."""
        in_use = sum(r.budget for r in self.running + self.prefilling)
        pending = sum(len(r.prompt) - r.prefilled for r in self.prefilling)
        batch: list[Request] = []
        while self.free and not self.waiting.empty() and pending < self.prefill_tokens:
            req = self.waiting.queue[0]
            if req.cancelled:
                self.waiting.get()
                req.finished_at = time.perf_counter()
                req.out.put(None)
                continue
            if (self.running or self.prefilling or batch) and in_use + req.budget > self.kv_budget:
                break  # wait for room: a request is queued, never refused
            self.waiting.get()
            self.free.sort()
            req.slot = self.free.pop(0)  # the lowest: the running requests stay in slots 0..B-1
            batch.append(req)
            in_use, pending = in_use + req.budget, pending + len(req.prompt)
        self.prefilling += batch
        return batch

    def _encode(self, batch: list[Request]) -> None:
        """The new requests' visual embeddings: every new image in passes through the vision encoder."""
        self.vision_adapters = vision_adapters(self.model)
        encode(self.model, self.images, batch, self.vision_tokens, self.vision_adapters)

    def _chunks(self) -> list[Request]:
        """The prefilling requests this step serves, each with its next chunk, up to prefill_tokens in all (a
        longer prompt goes on in the next steps, the running requests decoding in between)."""
        budget, served = self.prefill_tokens, []
        for r in list(self.prefilling):
            if r.cancelled:
                self._end(r)
                self.prefilling.remove(r)
            elif budget > 0:
                n = min(len(r.prompt) - r.prefilled, budget)
                r.chunk, budget = (r.prefilled, r.prefilled + n), budget - n
                served.append(r)
        return served

    def _forward(self, reqs: list[Request]) -> None:
        """One forward over the chunks of the prefilling requests among reqs and one new token of each running
        one; the first token of every prompt it completes, and the next of every running request."""
        chunks = [r for r in reqs if r.chunk is not None]
        rows = [r for r in reqs if r.chunk is None]
        row_inputs = [r.next_token for r in rows], [r.position for r in rows], [r.slot for r in rows]
        adapters, offsets = [r.adapter for r in rows], self._offsets(rows)
        if not chunks:  # the static decode step (a CUDA graph on a GPU)
            logits = self._run("decode", *row_inputs, adapters, None, offsets)
        else:
            decoding = (*row_inputs, adapters, offsets) if rows else None
            features = chunk_features(chunks, self.cfg.image_token_id)
            logits = self._run("forward", [r.next_chunk() for r in chunks], decoding, features)
        done = [r for r in chunks if r.chunk[1] == len(r.prompt)]
        sampled = self._sample(done + rows, logits)  # [len(done) + len(rows), V]: (what can raise comes first:
        for r in chunks:  # a step retried after an error repeats nothing)
            r.prefilled, r.chunk = r.chunk[1], None
        for r in done:
            r.features = None
        self.prefilling = [r for r in self.prefilling if r not in done]
        self.running += done
        self._emit(done + rows, *sampled)
        self.running = [r for r in self.running if r.finished_at is None]

    def _may_look_ahead(self) -> bool:
        """Whether this decode step may run ahead: asked for, and no row needs its last token on the host first
        (penalties and logit_bias read the tokens so far; log-probabilities are worked out with the step)."""
        if not self.overlap:
            return False
        return not any(
            r.params.presence_penalty or r.params.frequency_penalty or r.params.logit_bias or r.top_logprobs is not None
            for r in self.running
        )

    def _look_ahead(self) -> None:
        """One decode step launched before the step before's tokens are read: rows whose last token is still on
        the device (self.ahead) are fed it there; then those tokens are read back (copied while the step ran)
        and sent, and this step's tokens are left on the device for the next. A row finished by the tokens read
        has had one token too many computed, which is dropped. If the launch fails, the tokens are read and the
        step runs again the plain way (whose failure is one request's)."""
        rows, ahead = list(self.running), self.ahead
        waiting = {id(r): i for i, r in enumerate(ahead.rows)} if ahead is not None else {}
        late = [id(r) in waiting for r in rows]  # [B] the row's input token is pending
        tokens = [0 if is_late else r.next_token for r, is_late in zip(rows, late)]
        positions = [r.position + is_late for r, is_late in zip(rows, late)]
        pending = None
        if ahead is not None:
            into = [i for i, is_late in enumerate(late) if is_late]  # rows of this step fed a pending token
            where = upload([into, [waiting[id(rows[i])] for i in into]], self.model.device)  # [2, P]
            pending = where[0], ahead.tokens[where[1]]
        try:
            slots, adapters = [r.slot for r in rows], [r.adapter for r in rows]
            logits = self._run("decode", tokens, positions, slots, adapters, pending, self._offsets(rows))
            steps = [r.generated + is_late for r, is_late in zip(rows, late)]
            sampled = sample_rows(logits, [r.params for r in rows], [r.seed for r in rows], steps)  # [B]
        except Exception:
            traceback.print_exc()
            self._settle()
            self._isolate(self._forward, [r for r in self.running if r.finished_at is None])
            return
        following = Ahead(rows, sampled)  # (its copy to the host starts now, behind this step)
        self._settle()
        self.ahead = following.keep([r for r in rows if r.finished_at is None])
        self.running = [r for r in self.running if r.finished_at is None]

    def _settle(self) -> None:
        """Read back the tokens still on the device and send them."""
        if self.ahead is not None:
            ahead, self.ahead = self.ahead, None
            self._emit(ahead.rows, ahead.read(), {})
            self.running = [r for r in self.running if r.finished_at is None]

    def _offsets(self, rows: list[Request]) -> list[float] | None:
        """Under V2PE, each decoding row's RoPE offset (None without V2PE)."""
        return [r.offset for r in rows] if self.cfg.v2pe_delta != 1.0 else None

    def _compact(self) -> None:
        """Move the running requests into cache slots 0..B-1 (those in a higher slot into the holes left by
        finished ones), in slot order: the decode step reads the cache in place."""
        n = len(self.running)
        movers = [r for r in self.running if r.slot >= n]
        if movers and self.ahead is not None:  # (their pending tokens read first: the host knows every position)
            self._settle()
            return self._compact()
        if movers:
            holes = sorted(s for s in self.free if s < n)
            self._run("move", [r.slot for r in movers], holes, max(r.position + 1 for r in movers))
            self.free = [s for s in self.free if s >= n] + [r.slot for r in movers]
            for r, slot in zip(movers, holes):
                r.slot = slot
        self.running = sorted(self.running, key=lambda r: r.slot)  # a new list: sort() empties it meanwhile

    def _sample(self, rows: list[Request], logits: torch.Tensor) -> tuple[list[int], dict]:
        """Each row's next token (one copy to the host: the step's one wait on the device), and the
        log-probabilities the rows asked for."""
        scores = adjust(logits, [r.detok.ids for r in rows], [r.params for r in rows])  # [B, V]
        tokens = sample_rows(scores, [r.params for r in rows], [r.seed for r in rows], [r.generated for r in rows])
        want = {i: r.top_logprobs for i, r in enumerate(rows) if r.top_logprobs is not None}
        return tokens.tolist(), logprobs(logits, tokens, want) if want else {}

    def _emit(self, rows: list[Request], tokens: list[int], logprobs: dict) -> None:
        """Each row's new token taken (its text sent); the rows it finishes, or that were cancelled, ended."""
        for i, (req, token) in enumerate(zip(rows, tokens)):
            if req.take(token, logprobs.get(i), self.eos):
                self._end(req)

    def _end(self, req: Request) -> None:
        """The request is over: its output closed, its slot free."""
        req.finished_at = time.perf_counter()
        req.out.put(None)
        self.free.append(req.slot)
