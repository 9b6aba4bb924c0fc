"""Images: decoding with limits, InternVL's dynamic tiling, normalisation.

Tiling is the reference rule (InternVL's `dynamic_preprocess`, transformers' GotOcr2 image
processor): pick the tile grid whose aspect ratio is closest to the image's, resize (bicubic) to the
grid, cut into square tiles row by row, append a thumbnail when there is more than one tile. The pixel
values are bit-identical to transformers' PIL processor; speed comes from cutting each pass of Pillow's
resize into strips resized in parallel (images of 2 Mpx and more), and normalising with a lookup table
instead of float64 arithmetic.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import ImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ImageInput = Image.Image | str | Path | bytes

_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="vlstack-image")  # PIL resizes release the GIL
_STRIPS = max(2, min(4, os.cpu_count() or 1))  # strips per resize pass
# Below this many pixels (a 1080p frame) an image is resized and normalised on the caller's thread: the
# hand-offs cost more than the strips save, and a server encodes several requests at once anyway.
PARALLEL_PIXELS = 2_000_000


def _map(fn, items: list, pixels: int) -> list:
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
    except Image.DecompressionBombError as e:
        raise ImageError(f"image refused as a decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"could not decode image: {e}") from None
    w, h = img.size
    if w * h > limits.max_pixels:
        raise ImageError(
            f"image is {w}x{h} = {w * h} pixels, over the limit of {limits.max_pixels} "
            "(possibly a decompression bomb); raise max_pixels to allow it"
        )
    try:
        img.load()  # decode now, inside the limits, so a corrupt file fails here and not later
    except Image.DecompressionBombError as e:
        raise ImageError(f"image refused as a decompression bomb: {e}") from None
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


def normalise(tiles: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 [N, S, S, 3] -> float32 [N, 3, S, S], by table lookup, one (tile, channel) plane per job."""
    table = _normalise_table(tuple(mean), tuple(std))
    out = np.empty((tiles.shape[0], 3, *tiles.shape[1:3]), dtype=np.float32)

    def plane(nc: tuple[int, int]) -> None:
        n, c = nc
        np.take(table[c], tiles[n, :, :, c], out=out[n, c])

    _map(plane, [(n, c) for n in range(tiles.shape[0]) for c in range(3)], tiles.shape[0] * tiles.shape[1] ** 2)
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


def _one_pass(img: Image.Image, size: tuple[int, int], first: bool) -> Image.Image:
    """A resize that changes one side only, in strips across the other side resized in parallel: Pillow's
    pass works row by row (width) or column by column (height), so the strips give its exact pixels. The
    first pass reads its strips in place (`box`: the other side's pass is then an exact identity); the
    second copies them out (`crop`), cheaper on the smaller intermediate image."""
    w, h = size
    if (w, h) == img.size:
        return img
    rows = w != img.width  # the width changes: cut row bands
    cuts = np.linspace(0, img.height if rows else img.width, _STRIPS + 1).astype(int).tolist()
    boxes = [(0, a, img.width, b) if rows else (a, 0, b, img.height) for a, b in zip(cuts, cuts[1:]) if b > a]

    def strip(box: tuple[int, int, int, int]) -> Image.Image:
        out = (w, box[3] - box[1]) if rows else (box[2] - box[0], h)
        if first:
            return img.resize(out, Image.Resampling.BICUBIC, box=box)
        return img.crop(box).resize(out, Image.Resampling.BICUBIC)

    joined = Image.new(img.mode, size)
    for box, part in zip(boxes, _pool.map(strip, boxes)):
        joined.paste(part, (0, box[1]) if rows else (box[0], 0))
    return joined


def resize(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """img.resize(size, BICUBIC) as uint8 [h, w, 3], bit for bit: Pillow's two passes in Pillow's order,
    each in parallel strips."""
    order, (w, h) = _pass_order(), size
    if order is None or img.width * img.height < PARALLEL_PIXELS and w * h < PARALLEL_PIXELS:
        return np.asarray(img.resize(size, Image.Resampling.BICUBIC))
    shrink_h, shrink_w = img.height - h, img.width - w
    vertical_first = order == "rule" and shrink_h > 0 and shrink_h > 2 * shrink_w
    mid = (img.width, h) if vertical_first else (w, img.height)
    return np.asarray(_one_pass(_one_pass(img, mid, first=True), size, first=mid == img.size))


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
    grid = resize(img, (tile * cols, tile * rows))  # [rows*S, cols*S, 3]
    thumb = resize(img, (tile, tile)) if use_thumbnail and cols * rows > 1 else None
    tiles = grid.reshape(rows, tile, cols, tile, 3).transpose(0, 2, 1, 3, 4).reshape(-1, tile, tile, 3)
    if thumb is not None:
        tiles = np.concatenate([tiles, thumb[None]], axis=0)
    return normalise(tiles, mean, std)
