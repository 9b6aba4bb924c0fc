"""The serving engine: continuous batching over one model and its adapters.

Requests join and leave the running batch at every decode step. Each running request owns a slot of a
KV cache preallocated for `max_batch` sequences of up to `max_len` tokens; a request waits in the queue
(it is never refused for lack of room) until a slot is free and the tokens it may still need fit in
`kv_budget`. A new request is prefilled alone into its slot; then every step decodes one token for all
running requests at once, each row with its own adapter (the base matmul once, each adapter on its
rows), its own sampling parameters and seed. Prompts, images included, are encoded by the caller's
thread before submission, so image decoding and tiling run in parallel with the engine.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from ..api import VLM
from ..errors import PromptError
from ..generate import Detokenizer, SamplingParams, sample
from ..model.lora import route


class SlotCache:
    """Keys and values for `slots` sequences, each with its own length; the model works on `rows`."""

    def __init__(self, vlm: VLM, slots: int, max_len: int):
        t, model = vlm.cfg.text, vlm.model
        shape = (t.num_hidden_layers, slots, t.num_key_value_heads, max_len, t.head_dim)
        self.k = torch.zeros(shape, dtype=model.dtype, device=model.device)  # [L, S, Hkv, Tmax, D]
        self.v = torch.zeros(shape, dtype=model.dtype, device=model.device)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=model.device)  # [S]
        self.rows = torch.zeros(0, dtype=torch.long, device=model.device)  # the slots of the batch rows

    @property
    def length(self) -> int:
        """The longest sequence among the rows (the model builds a causal mask past a cached prefix)."""
        return int(self.lengths[self.rows].max()) if len(self.rows) else 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [B, Hkv, T, D] written after each row's own length -> each row's keys, values so far."""
        pos = self.lengths[self.rows][:, None] + torch.arange(k.shape[2], device=k.device)  # [B, T]
        rows = self.rows[:, None].expand_as(pos)
        self.k[layer].permute(0, 2, 1, 3)[rows, pos] = k.transpose(1, 2)  # [B, T, Hkv, D] into [S, Tmax, Hkv, D]
        self.v[layer].permute(0, 2, 1, 3)[rows, pos] = v.transpose(1, 2)
        end = int(pos.max()) + 1
        return self.k[layer, self.rows, :, :end], self.v[layer, self.rows, :, :end]  # [B, Hkv, K, D]

    def advance(self, n: int) -> None:
        self.lengths[self.rows] += n


@dataclass(eq=False)
class Request:
    prompt: torch.Tensor  # [T] token ids
    pixel_values: torch.Tensor | None
    adapter: str | None
    params: SamplingParams
    detok: Detokenizer
    out: queue.Queue = field(default_factory=queue.Queue)  # text pieces, then None at the end
    slot: int = -1
    generated: int = 0
    finish_reason: str | None = None
    cancelled: bool = False
    generator: torch.Generator | None = None
    next_token: int | None = None
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None

    @property
    def budget(self) -> int:
        """KV positions the request may occupy."""
        return len(self.prompt) + self.params.max_new_tokens


class Engine:
    def __init__(self, vlm: VLM, max_batch: int = 16, kv_budget: int | None = None, max_len: int | None = None):
        self.vlm, self.max_batch = vlm, max_batch
        self.max_len = min(max_len or vlm.context_len, vlm.context_len)
        self.kv_budget = kv_budget or max_batch * self.max_len
        self.cache = SlotCache(vlm, max_batch, self.max_len)
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.running: list[Request] = []
        self.free = list(range(max_batch))
        self.lock = threading.Lock()  # held while the model runs: adapters load and unload between steps
        self.ids = itertools.count()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="vlstack-engine", daemon=True)
        self.thread.start()

    def submit(self, inputs: dict[str, torch.Tensor], adapter: str | None, params: SamplingParams) -> Request:
        """Queue an encoded prompt; its text arrives in request.out as pieces, then None."""
        prompt = inputs["input_ids"][0]
        if len(prompt) >= self.max_len:
            raise PromptError(f"the prompt is {len(prompt)} tokens, over the model's context of {self.max_len} tokens")
        params.max_new_tokens = min(params.max_new_tokens, self.max_len - len(prompt))
        req = Request(prompt, inputs.get("pixel_values"), adapter, params,
                      Detokenizer(self.vlm.processor.decode, params.stop))  # fmt: skip
        if params.seed is not None:
            req.generator = torch.Generator(device=self.vlm.model.device).manual_seed(params.seed)
        self.waiting.put(req)
        return req

    def cancel(self, req: Request) -> None:
        req.cancelled = True

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=10)

    # the engine thread -------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.running and self.waiting.empty():
                self._stop.wait(0.002)
                continue
            with self.lock, torch.inference_mode():
                self._admit()
                if self.running:
                    self._decode()

    def _admit(self) -> None:
        in_use = sum(r.budget for r in self.running)
        while self.free and not self.waiting.empty():
            req = self.waiting.queue[0]
            if req.cancelled:
                self.waiting.get()
                req.out.put(None)
                continue
            if self.running and in_use + req.budget > self.kv_budget:
                return  # wait for room: a request is queued, never refused
            self.waiting.get()
            req.slot = self.free.pop()
            self.cache.lengths[req.slot] = 0
            self.cache.rows = torch.tensor([req.slot], device=self.cache.lengths.device)
            model = self.vlm.model
            pv = req.pixel_values.to(model.device) if req.pixel_values is not None else None
            with route(model, [req.adapter]):
                logits = model(req.prompt[None].to(model.device), pv, cache=self.cache, last_only=True)[:, -1]
            self.running.append(req)
            in_use += req.budget
            self._emit([req], logits)

    def _decode(self) -> None:
        self.running.sort(key=lambda r: r.adapter or "")  # stable: each adapter's rows in one run
        rows = list(self.running)  # _emit removes finished rows from self.running
        model, device = self.vlm.model, self.vlm.model.device
        self.cache.rows = torch.tensor([r.slot for r in rows], device=device)
        lengths = self.cache.lengths[self.cache.rows]  # [B]
        positions = lengths[:, None]  # [B, 1]: the new token's position
        keys = int(lengths.max()) + 1
        mask = (torch.arange(keys, device=device)[None] <= lengths[:, None])[:, None, None, :]  # [B, 1, 1, K]
        tokens = torch.tensor([[r.next_token] for r in rows], device=device)
        with route(model, [r.adapter for r in rows]):
            logits = model(tokens, None, positions, self.cache, mask)[:, -1]  # [B, V]
        self._emit(rows, logits)

    def _emit(self, rows: list[Request], logits: torch.Tensor) -> None:
        """Sample each row's next token, send its text, and retire finished or cancelled rows."""
        for i, req in enumerate(rows):
            token = int(sample(logits[i : i + 1], req.params, req.generator)[0])
            req.generated += 1
            if req.first_token_at is None:
                req.first_token_at = time.perf_counter()
            if token in self.vlm.eos:
                req.finish_reason = "stop"
            else:
                piece = req.detok.push(token)
                if piece:
                    req.out.put(piece)
                if req.detok.stopped:
                    req.finish_reason = "stop"
                elif req.generated >= req.params.max_new_tokens:
                    req.finish_reason = "length"
            req.next_token = token
            if req.finish_reason or req.cancelled:
                tail = req.detok.flush() if req.finish_reason else ""
                if tail:
                    req.out.put(tail)
                req.finished_at = time.perf_counter()
                req.out.put(None)
                self.running.remove(req)
                self.free.append(req.slot)
