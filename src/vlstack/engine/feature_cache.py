"""The cache of visual embeddings: the same page asked about twice goes through the vision encoder once.

An image is known by a hash of its tiles' pixel values (so the tiling settings are part of its identity),
by the adapter it was encoded with, when that adapter changes the vision tower or the projector, and by the
tenant that sent it: one tenant's images never answer another's lookups (no hit to count or to time).
Least recently used entries leave first once the cache is over its byte budget.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch

Key = tuple[str, str | None, str | None]  # (hash of the image's tiles, adapter of the vision tower, tenant)


def image_hash(tiles: torch.Tensor) -> str:
    """A digest of one image's tiles [n, 3, S, S]."""
    raw = tiles.detach().contiguous().flatten().view(torch.uint8).cpu()  # any dtype (numpy has no bfloat16), any device
    return hashlib.sha256(raw.numpy()).hexdigest()  # (SHA-256 has CPU instructions: fastest here)


def tiles_per_image(input_ids: torch.Tensor, image_token_id: int, tokens_per_tile: int) -> list[int]:
    """input_ids [T] -> the number of tiles of each image, in order (each image is one run of image tokens)."""
    ctx = (input_ids == image_token_id).to(torch.int8)
    edges = torch.diff(ctx, prepend=ctx.new_zeros(1), append=ctx.new_zeros(1))  # +1 where a run starts, -1 after it
    runs = (edges == -1).nonzero().flatten() - (edges == 1).nonzero().flatten()
    return (runs // tokens_per_tile).tolist()


class FeatureCache:
    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.entries: OrderedDict[Key, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: Key) -> torch.Tensor | None:
        feats = self.entries.get(key)
        if feats is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(key)
        return feats

    def put(self, key: Key, feats: torch.Tensor) -> None:
        """Keep feats [n tiles, P, C], evicting the least recently used entries beyond the budget."""
        if feats.nbytes > self.max_bytes or key in self.entries:
            return
        self.entries[key] = feats
        self.bytes += feats.nbytes
        while self.bytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.nbytes

    def drop_adapter(self, adapter: str) -> None:
        """Forget what an adapter encoded (it was unloaded, or replaced by new weights)."""
        for key in [k for k in self.entries if k[1] == adapter]:
            self.bytes -= self.entries.pop(key).nbytes
