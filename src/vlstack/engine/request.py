"""A request in the engine: its prompt and images, its adapter and sampling, where it stands (its cache slot,
what is prefilled, what it generated) and its output channel."""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..sampling import Detokenizer, SamplingParams


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

    @property
    def position(self) -> int:
        """The position of next_token, the one the next decode step feeds (what the cache holds before it)."""
        return len(self.prompt) + self.generated - 1

    @property
    def budget(self) -> int:
        """KV positions the request may occupy."""
        return len(self.prompt) + self.params.max_new_tokens
