"""Images: decoding with limits, InternVL's dynamic tiling, normalisation.

Tiling is the reference rule (InternVL's `dynamic_preprocess`, transformers' GotOcr2 image
processor): pick the tile grid whose aspect ratio is closest to the image's, resize (bicubic) to the
grid, cut into square tiles row by row, append a thumbnail when there is more than one tile. The pixel
values are bit-identical to transformers' PIL processor; speed comes from resizing the grid and the
thumbnail in parallel and normalising with a lookup table instead of float64 arithmetic.
"""

from __future__ import annotations

import base64
import binascii
import io
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
def _normalise_table(mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """[3 * 256] float32: the normalised value of every channel byte, computed exactly as transformers
    does per pixel (x·(1/255) in float64, cast to float32, then (x - mean) / std in float32)."""
    values = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    m, s = np.array(mean, dtype=np.float32), np.array(std, dtype=np.float32)
    return torch.from_numpy(((values[None, :] - m[:, None]) / s[:, None]).reshape(-1).copy())


def normalise(tiles: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 [N, S, S, 3] -> float32 [N, 3, S, S]."""
    table = _normalise_table(tuple(mean), tuple(std))
    idx = torch.from_numpy(tiles).permute(0, 3, 1, 2).to(torch.int64)  # [N, 3, S, S]
    idx += torch.arange(0, 768, 256).view(1, 3, 1, 1)
    return table[idx]


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
    resize = lambda size: np.asarray(img.resize(size, Image.Resampling.BICUBIC))  # noqa: E731
    grid_job = _pool.submit(resize, (tile * cols, tile * rows))
    thumb = resize((tile, tile)) if use_thumbnail and cols * rows > 1 else None
    grid = grid_job.result()  # [rows*S, cols*S, 3]
    tiles = grid.reshape(rows, tile, cols, tile, 3).transpose(0, 2, 1, 3, 4).reshape(-1, tile, tile, 3)
    if thumb is not None:
        tiles = np.concatenate([tiles, thumb[None]], axis=0)
    tiles = np.ascontiguousarray(tiles)
    return normalise(tiles if tiles.flags.writeable else tiles.copy(), mean, std)
