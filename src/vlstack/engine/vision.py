"""The engine's images: the visual embeddings of newly admitted requests, from the feature cache or through the
vision encoder in passes of at most `vision_tokens` encoder tokens (each tile with its request's vision adapter),
and the embeddings each prefill chunk's image tokens take."""

from __future__ import annotations

import torch

from ..layers.lora import lora_layers, route
from ..models.internvl import InternVL
from .feature_cache import FeatureCache
from .request import Request


def vision_adapters(model: InternVL) -> set[str]:
    """Adapters that change the visual embeddings (LoRA on the vision tower or the projector)."""
    layers = lora_layers(model).items()
    return {a for name, layer in layers if not name.startswith("language_model.") for a in layer.lora_A}


def image_key(req: Request, digest: str, adapters: set[str]) -> tuple[str, str | None, str | None]:
    """An image's key in the feature cache: its hash, the request's adapter where it is a vision adapter, the
    request's tenant."""
    return digest, req.adapter if req.adapter in adapters else None, req.tenant


def encode(model: InternVL, cache: FeatureCache, batch: list[Request], vision_tokens: int, adapters: set[str]) -> None:
    """Each request's visual embeddings r.features [image tokens, C], in prompt order: the images cached
    (under image_key) reused, the others through the vision encoder, then cached."""
    found: dict = {}  # for this batch (the cache may evict before the batch is done)
    new_keys, new_tiles, new_adapters = [], [], []
    for r in batch:
        if not r.images:
            continue
        for (digest, n), tiles in zip(r.images, r.pixel_values.split([n for _, n in r.images])):
            key = image_key(r, digest, adapters)
            if key in found:
                continue
            found[key] = cache.get(key)
            if found[key] is None:
                new_keys.append(key)
                new_tiles.append(tiles)
                new_adapters += [key[1]] * n
    if new_tiles:
        tiles = torch.cat(new_tiles)  # [new tiles, 3, S, S]
        step = max(1, vision_tokens // model.cfg.vision.patches)  # tiles per pass
        parts = []
        for a in range(0, len(tiles), step):  # passes of at most vision_tokens encoder tokens
            lora = route(model, new_adapters[a : a + step], device=model.device)  # (a tile: a row)
            parts.append(model.image_features(tiles[a : a + step].to(model.device), lora))  # [tiles, P, C]
        feats = torch.cat(parts)  # [new tiles, P, C]
        for key, f in zip(new_keys, feats.split([len(t) for t in new_tiles])):
            found[key] = f
            cache.put(key, f)
    for r in batch:
        if r.images:
            parts = [found[image_key(r, digest, adapters)] for digest, _ in r.images]  # prompt order
            r.features = torch.cat(parts).flatten(0, 1)  # [image tokens, C]


def chunk_features(chunks: list[Request], image_token: int) -> torch.Tensor | None:
    """The visual embeddings of the chunks' image tokens, in order: [1, image tokens, C] (None: none)."""
    parts = []
    for r in chunks:
        if r.features is not None:
            a, b = r.chunk
            before = int((r.prompt[:a] == image_token).sum())
            parts.append(r.features[before : before + int((r.prompt[a:b] == image_token).sum())])
    return torch.cat(parts)[None] if parts else None
