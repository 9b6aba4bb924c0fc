"""A request in the engine: its prompt and images, its adapter and sampling, where it stands (its cache slot,
what is prefilled, what it generated) and its output channel."""

from __future__ import annotations

import queue
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import VLMConfig
from ..errors import PromptError
from ..layers.step import v2pe
from ..sampling import Detokenizer, SamplingParams
from .feature_cache import image_hash, tiles_per_image
from .runner import Chunk
from .sampler import seed_words


@dataclass(eq=False)
class Request:
    prompt: torch.Tensor  # [T] token ids
    pixel_values: torch.Tensor | None  # [N, 3, S, S]: the tiles of all its images
    images: list[tuple[str, int]]  # each image's hash and number of tiles
    adapter: str | None
    params: SamplingParams
    detok: Detokenizer
    tenant: str | None = None  # who sent it: its images are cached apart from other tenants'
    out: Any = field(default_factory=queue.Queue)  # text pieces, then None at the end
    slot: int = -1
    prefilled: int = 0  # prompt tokens in the cache
    chunk: tuple[int, int] | None = None  # the prompt tokens a..b the current step prefills
    features: torch.Tensor | None = None  # [image tokens, C]: its images' visual embeddings, until prefilled
    generated: int = 0
    finish_reason: str | None = None
    cancelled: bool = False
    seed: tuple[int, int] = (0, 0)  # its sampling seed, two 32-bit words (a random one unless it asked)
    next_token: int | None = None
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    error: str | None = None  # why the engine failed it (finish_reason "error")
    exception: Exception | None = None  # the same, as raised
    top_logprobs: int | None = None  # None: no log-probabilities; else how many alternatives a token
    logprobs: list = field(default_factory=list)  # a generated token's (id, logprob, [(id, logprob) top]), in order
    rope: torch.Tensor | None = None  # [T] V2PE's RoPE positions of the prompt (None: its positions)
    offset: float = 0.0  # V2PE: the RoPE position of each generated token minus its position

    @classmethod
    def of(
        cls,
        inputs: dict[str, torch.Tensor],
        adapter: str | None,
        params: SamplingParams,
        cfg: VLMConfig,
        decode: Callable[[list[int]], str],
        max_len: int,
        top_logprobs: int | None = None,
        tenant: str | None = None,
    ) -> Request:
        """A request for an encoded prompt, checked (its length under max_len, its sampling against the
        vocabulary, its image tokens filled by its images); max_new_tokens capped by what the context leaves."""
        prompt, pixels = inputs["input_ids"][0], inputs.get("pixel_values")
        if len(prompt) >= max_len:
            raise PromptError(f"the prompt is {len(prompt)} tokens, over the model's context of {max_len} tokens")
        params.max_new_tokens = min(params.max_new_tokens, max_len - len(prompt))
        params.check_vocab(cfg.text.vocab_size)
        if top_logprobs is not None and not 0 <= top_logprobs <= 20:
            raise PromptError(f"top_logprobs must be in [0, 20] (got {top_logprobs})")
        image_tokens = int((prompt == cfg.image_token_id).sum())
        if image_tokens != (0 if pixels is None else len(pixels)) * cfg.tokens_per_tile:
            raise PromptError(f"the prompt has {image_tokens} image tokens, which its images do not fill")
        counts = tiles_per_image(prompt, cfg.image_token_id, cfg.tokens_per_tile) if pixels is not None else []
        images = [(image_hash(t), len(t)) for t in pixels.split(counts)] if counts else []
        req = cls(prompt, pixels, images, adapter, params, Detokenizer(decode, params.stop), tenant=tenant)
        req.top_logprobs = top_logprobs
        if cfg.v2pe_delta != 1.0:
            req.rope, req.offset = v2pe(prompt, cfg.image_token_id, cfg.v2pe_delta)
        req.seed = seed_words(random.getrandbits(64) if params.seed is None else params.seed)
        return req

    @property
    def position(self) -> int:
        """The position of next_token, the one the next decode step feeds (what the cache holds before it)."""
        return len(self.prompt) + self.generated - 1

    @property
    def budget(self) -> int:
        """KV positions the request may occupy."""
        return len(self.prompt) + self.params.max_new_tokens

    def next_chunk(self) -> Chunk:
        """The prompt tokens this step prefills (self.chunk), as the model runner takes them."""
        a, b = self.chunk
        rope = None if self.rope is None else self.rope[a:b]
        return Chunk(self.prompt[a:b], a, self.slot, self.adapter, b == len(self.prompt), rope)

    def take(self, token: int, logprob: tuple | None, eos: set[int]) -> bool:
        """A new token: its text sent, its log-probabilities (logprob: the token's and its alternatives') kept;
        whether the request is over: EOS, a stop string, its length, or cancelled. The one place that decides
        a request is finished."""
        self.generated += 1
        if logprob is not None and token not in eos:
            self.logprobs.append((token, *logprob))
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if token in eos:
            self.finish_reason = "stop"
        else:
            piece = self.detok.push(token)
            if piece:
                self.out.put(piece)
            if self.detok.stopped:
                self.finish_reason = "stop"
            elif self.generated >= self.params.max_new_tokens:
                self.finish_reason = "length"
        self.next_token = token
        if self.finish_reason or self.cancelled:
            tail = self.detok.flush() if self.finish_reason else ""
            if tail:
                self.out.put(tail)
            return True
        return False
