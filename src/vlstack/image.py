"""Images: decoding with limits, InternVL's dynamic tiling, normalisation.

Tiling is the reference rule (InternVL's `dynamic_preprocess`, transformers' GotOcr2 image
processor): pick the tile grid whose aspect ratio is closest to the image's, resize (bicubic) to the
grid, cut into square tiles row by row, append a thumbnail when there is more than one tile. The pixel
values are bit-identical to transformers' PIL processor; for images of a megapixel and more, speed comes
from cutting each pass of Pillow's resize into strips resized in parallel (the grid's and the
thumbnail's together), and normalising with a lookup table instead of float64 arithmetic.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import ImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ImageInput = Image.Image | str | Path | bytes

_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="vlstack-image")  # PIL resizes release the GIL
_STRIPS = max(2, min(4, os.cpu_count() or 1))  # strips per resize pass
# Below this many pixels an image is resized and normalised on the caller's thread: the hand-offs cost
# more than the strips save, and a server encodes several requests at once anyway.
PARALLEL_PIXELS = 1_000_000


def _map(fn: Callable[[Any], Any], items: list, pixels: int) -> list:
    """[fn(x) for x in items], across the pool when the work is big enough to gain from it."""
    return list(_pool.map(fn, items)) if pixels >= PARALLEL_PIXELS else [fn(x) for x in items]


@dataclass
class ImageLimits:
    max_pixels: int = 64_000_000  # width × height; a 4K page is 8.3 M
    max_bytes: int = 64 * 2**20  # encoded size


def _open(data: bytes, limits: ImageLimits) -> Image.Image:
    if len(data) > limits.max_bytes:
        raise ImageError(f"image is {len(data)} bytes, over the limit of {limits.max_bytes} bytes")
    try:
        img = Image.open(io.BytesIO(data))  # reads the header only
        w, h = img.size
        if w * h > limits.max_pixels:
            raise ImageError(
                f"image is {w}x{h} = {w * h} pixels, over the limit of {limits.max_pixels} "
                "(possibly a decompression bomb); raise max_pixels to allow it"
            )
        img.load()  # decode now, inside the limits, so a corrupt file fails here and not later
    except Image.DecompressionBombError:  # (PIL's own bound, met before ours could be checked)
        bomb = f"image is over the limit of {limits.max_pixels} pixels (possibly a decompression bomb)"
        raise ImageError(bomb) from None
    except UnidentifiedImageError:
        raise ImageError("could not decode image: not in an image format vlstack reads (PNG, JPEG, WebP...)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"could not decode image: {e}") from None
    return img


def decode_data_url(url: str) -> bytes:
    """`data:image/png;base64,....` -> bytes."""
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:") or ";base64" not in header:
        raise ImageError("image data URL must look like 'data:image/<type>;base64,<data>'")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"image data URL holds invalid base64: {e}") from None


def load_image(source: ImageInput, limits: ImageLimits | None = None) -> Image.Image:
    """A PIL image, a file path, raw bytes or a base64 data URL -> RGB PIL image (transparency on white)."""
    limits = limits or ImageLimits()
    if isinstance(source, Image.Image):
        img = source
        if img.width * img.height > limits.max_pixels:
            raise ImageError(f"image is {img.width}x{img.height}, over the limit of {limits.max_pixels} pixels")
    elif isinstance(source, (bytes, bytearray)):
        img = _open(bytes(source), limits)
    elif isinstance(source, str) and source.startswith("data:"):
        img = _open(decode_data_url(source), limits)
    elif isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"image file not found: {path}")
        if path.stat().st_size > limits.max_bytes:
            raise ImageError(f"image file {path} is over the limit of {limits.max_bytes} bytes")
        img = _open(path.read_bytes(), limits)
    else:
        raise ImageError(f"unsupported image input of type {type(source).__name__}")
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


@lru_cache(maxsize=64)
def candidate_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """(columns, rows) with min ≤ columns·rows ≤ max, sorted by tile count (stable: columns, then rows)."""
    grids = [
        (w, h) for w in range(1, max_tiles + 1) for h in range(1, max_tiles + 1) if min_tiles <= w * h <= max_tiles
    ]
    return sorted(grids, key=lambda g: g[0] * g[1])


def best_grid(width: int, height: int, tile: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """The grid whose aspect ratio is closest to the image's; on a tie the later grid (more tiles)
    wins only if the image has more than half the pixels of that grid."""
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for grid in candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - grid[0] / grid[1])
        if diff < best_diff:
            best, best_diff = grid, diff
        elif diff == best_diff and area > 0.5 * tile * tile * grid[0] * grid[1]:
            best = grid
    return best


def num_tiles(width: int, height: int, tile: int, min_tiles: int = 1, max_tiles: int = 12) -> int:
    """Tiles an image of this size becomes, thumbnail included."""
    if max_tiles <= 1:
        return 1
    cols, rows = best_grid(width, height, tile, min_tiles, max_tiles)
    return cols * rows + (1 if cols * rows > 1 else 0)


@lru_cache(maxsize=8)
def _normalise_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """[3, 256] float32: the normalised value of every channel byte, computed exactly as transformers
    does per pixel (x·(1/255) in float64, cast to float32, then (x - mean) / std in float32)."""
    values = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    m, s = np.array(mean, dtype=np.float32), np.array(std, dtype=np.float32)
    return (values[None, :] - m[:, None]) / s[:, None]


def normalise(tiles: list[np.ndarray] | np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 tiles [S, S, 3] (a list, or an array [N, S, S, 3]; views are fine) -> float32 [N, 3, S, S], by
    table lookup, one (tile, channel) plane per job."""
    table = _normalise_table(tuple(mean), tuple(std))
    n, s = len(tiles), tiles[0].shape[0]
    out = np.empty((n, 3, s, s), dtype=np.float32)

    def plane(nc: tuple[int, int]) -> None:
        i, c = nc
        np.take(table[c], tiles[i][:, :, c], out=out[i, c])

    _map(plane, [(i, c) for i in range(n) for c in range(3)], n * s * s)
    return torch.from_numpy(out)


@lru_cache(maxsize=1)
def _pass_order() -> str | None:
    """How this Pillow orders the two passes of a bicubic resize: "rule" (vertical first when the height
    shrinks by more than twice what the width does, as Pillow 13 does), "horizontal" (always horizontal
    first, as older Pillows do), or None (neither: resize whole images only). Found on a 12x60 probe."""
    probe = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 12, 3), dtype=np.uint8))
    size = (10, 13)  # the height shrinks by 47, the width by 2: vertical first under the rule
    whole = np.asarray(probe.resize(size, Image.Resampling.BICUBIC))
    for order, mid in (("rule", (12, 13)), ("horizontal", (10, 60))):
        two = probe.resize(mid, Image.Resampling.BICUBIC).resize(size, Image.Resampling.BICUBIC)
        if np.array_equal(whole, np.asarray(two)):
            return order
    return None


def _one_pass(jobs: list[tuple[Image.Image, tuple[int, int]]]) -> list[Image.Image]:
    """Resizes that change one side only, each cut into strips across the other side, every strip of every
    job resized in parallel: Pillow's pass works row by row (width) or column by column (height), so the
    strips give its exact pixels. Each strip is cropped out first: resizing in place (`box=`) would make
    Pillow run the other side's pass too, an identity that costs half as much again."""
    tasks = []  # (job, box, strip's output size)
    for j, (img, (w, h)) in enumerate(jobs):
        if (w, h) == img.size:
            continue
        rows = w != img.width  # the width changes: cut row bands
        cuts = np.linspace(0, img.height if rows else img.width, _STRIPS + 1).astype(int).tolist()
        for a, b in zip(cuts, cuts[1:]):
            if b > a:
                tasks.append((j, (0, a, img.width, b), (w, b - a)) if rows else (j, (a, 0, b, img.height), (b - a, h)))

    def strip(task: tuple) -> Image.Image:
        j, box, size = task
        return jobs[j][0].crop(box).resize(size, Image.Resampling.BICUBIC)

    out = [img if size == img.size else Image.new(img.mode, size) for img, size in jobs]
    for (j, box, _), part in zip(tasks, _pool.map(strip, tasks)):
        out[j].paste(part, box[:2])
    return out


def resize(img: Image.Image, sizes: list[tuple[int, int]]) -> list[np.ndarray]:
    """[img.resize(size, BICUBIC) as uint8 [h, w, 3] for each size], bit for bit. For a big image, Pillow's
    two passes in Pillow's order, the first passes of all sizes in parallel strips, then the second."""
    order = _pass_order()
    if order is None or max(img.width * img.height, *(w * h for w, h in sizes)) < PARALLEL_PIXELS:
        return [np.asarray(img.resize(size, Image.Resampling.BICUBIC)) for size in sizes]
    mids = []
    for w, h in sizes:
        shrink_h, shrink_w = img.height - h, img.width - w
        vertical_first = order == "rule" and shrink_h > 0 and shrink_h > 2 * shrink_w
        mids.append((img.width, h) if vertical_first else (w, img.height))
    firsts = _one_pass([(img, mid) for mid in mids])
    return [np.asarray(x) for x in _one_pass(list(zip(firsts, sizes)))]


def tile_image(
    img: Image.Image,
    tile: int = 448,
    min_tiles: int = 1,
    max_tiles: int = 12,
    use_thumbnail: bool = True,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
) -> torch.Tensor:
    """RGB image -> normalised tiles [N, 3, tile, tile]: the grid row by row, then the thumbnail."""
    if max_tiles > 40 or max_tiles < 1 or min_tiles < 1 or min_tiles > max_tiles:
        raise ImageError(f"tile counts must satisfy 1 <= min_tiles <= max_tiles <= 40 (got {min_tiles}, {max_tiles})")
    if max_tiles == 1:
        cols = rows = 1
    else:
        cols, rows = best_grid(img.width, img.height, tile, min_tiles, max_tiles)
    thumb = use_thumbnail and cols * rows > 1
    grid, *rest = resize(img, [(tile * cols, tile * rows)] + [(tile, tile)] * thumb)  # [rows*S, cols*S, 3], ...
    tiles = [grid[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] for r in range(rows) for c in range(cols)]
    return normalise(tiles + rest, mean, std)  # the grid row by row, then the thumbnail
