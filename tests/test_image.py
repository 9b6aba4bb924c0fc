"""Tiling and decoding: the same tiles and pixel values as transformers' GotOcr2 PIL processor; bad
images refused with a clear error."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from conftest import hf_image_processor, image
from PIL import Image

import vlstack.image
from vlstack.errors import ImageError
from vlstack.image import ImageLimits, load_image, num_tiles, resize, tile_image

# widths × heights: squares, extreme aspect ratios, tiny, exact ties, bigger than the grid and smaller
SIZES = [
    (448, 448),
    (100, 100),
    (1, 1),
    (896, 448),
    (448, 896),
    (1000, 200),
    (200, 1000),
    (3000, 10),
    (10, 3000),
    (640, 480),
    (480, 640),
    (1280, 720),
    (1920, 1080),
    (1023, 767),
    (1344, 896),
    (2000, 1500),
    (300, 1200),
    (1200, 300),
    (57, 913),
    (750, 500),
    (1600, 1600),
    (3840, 2160),
]


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
@pytest.mark.parametrize("max_tiles", [6, 12])
def test_tiles_identical_to_transformers(size, max_tiles):
    tile = 448 if size[0] * size[1] < 4_000_000 else 224  # keep the two largest images quick
    img = image(*size, seed=size[0] + size[1])
    ref = hf_image_processor(tile, max_tiles)(img, return_tensors="pt")
    ours = tile_image(img, tile, 1, max_tiles)
    assert ours.shape[0] == int(ref["num_patches"][0]) == num_tiles(*size, tile, 1, max_tiles)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, ref["pixel_values"])


@pytest.mark.parametrize(
    "size, target",
    [
        ((3840, 2160), (1792, 896)),  # the width pass first
        ((300, 1900), (280, 400)),  # the height shrinks more than twice the width: Pillow 13 starts with it
        ((700, 500), (1344, 448)),  # one side up, one down
        ((640, 480), (640, 1344)),  # the height only
        ((33, 900), (448, 900)),  # the width only
        ((5, 3), (448, 448)),
    ],
)
def test_parallel_resize_is_pillows_resize(size, target, monkeypatch):
    """The grid resize runs each of Pillow's passes in parallel strips: the pixels are Pillow's own."""
    monkeypatch.setattr(vlstack.image, "PARALLEL_PIXELS", 0)  # strips at every size
    img = Image.fromarray(np.random.default_rng(sum(size)).integers(0, 256, (*size[::-1], 3), dtype=np.uint8))
    sizes = [target, (448, 448), (200, 100)]  # resized together, as the grid and the thumbnail are
    for ours, size in zip(resize(img, sizes), sizes, strict=True):
        assert np.array_equal(ours, np.asarray(img.resize(size, Image.Resampling.BICUBIC)))


@pytest.mark.parametrize("min_tiles,max_tiles", [(1, 1), (2, 6), (4, 12), (1, 40)])
def test_tile_count_range(min_tiles, max_tiles):
    img = image(1500, 400, seed=3)
    ref = hf_image_processor(112, max_tiles, min_tiles)(img, return_tensors="pt")
    ours = tile_image(img, 112, min_tiles, max_tiles)
    assert torch.equal(ours, ref["pixel_values"])
    n = ours.shape[0]
    assert n == 1 if max_tiles == 1 else min_tiles <= n - 1 <= max_tiles


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # fully transparent red
    white = Image.new("RGB", (64, 64), (255, 255, 255))
    assert torch.equal(tile_image(load_image(rgba), 56), tile_image(white, 56))
    ref = hf_image_processor(56)(rgba, return_tensors="pt")["pixel_values"]
    assert torch.equal(tile_image(load_image(rgba), 56), ref)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_sources_decode_to_the_same_pixels(tmp_path):
    img = image(90, 70)
    data = _png(img)
    path = tmp_path / "x.png"
    path.write_bytes(data)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    arrays = [np.asarray(load_image(s)) for s in (img, data, path, str(path), url)]
    assert all(np.array_equal(a, arrays[0]) for a in arrays)
    assert load_image(Image.new("L", (5, 5))).mode == "RGB"


def test_corrupt_image_is_refused():
    with pytest.raises(ImageError, match="could not decode image"):
        load_image(b"this is not an image at all")
    truncated = _png(image(200, 200))[:500]
    with pytest.raises(ImageError, match="could not decode image"):
        load_image(truncated)


@pytest.mark.parametrize("side", [10_000, 20_000])
def test_decompression_bomb_is_refused_before_decoding(side):
    # one colour compresses to a small PNG but decodes to side² pixels (300 MB to 1.2 GB of RGB)
    bomb = _png(Image.new("1", (side, side)))
    assert len(bomb) < 200_000
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(bomb)


def test_pixel_and_byte_limits_are_configurable():
    data = _png(image(100, 100))
    with pytest.raises(ImageError, match="100x100 = 10000 pixels, over the limit of 5000"):
        load_image(data, ImageLimits(max_pixels=5000))
    with pytest.raises(ImageError, match="bytes, over the limit of 100 bytes"):
        load_image(data, ImageLimits(max_bytes=100))
    assert load_image(data, ImageLimits(max_pixels=10000)).size == (100, 100)


def test_bad_sources_are_named():
    with pytest.raises(ImageError, match="image file not found"):
        load_image("/nonexistent/picture.png")
    with pytest.raises(ImageError, match="invalid base64"):
        load_image("data:image/png;base64,@@@not-base64@@@")
    with pytest.raises(ImageError, match="must look like"):
        load_image("data:image/png,rawdata")
    with pytest.raises(ImageError, match="unsupported image input"):
        load_image(12345)


def test_tile_limits_are_checked():
    with pytest.raises(ImageError, match="max_tiles <= 40"):
        tile_image(image(10, 10), 448, 1, 41)
