"""Drawing helpers shared by the generators: named colours, fonts, and the scan look (noise, a slight turn).

Only Pillow's own font is used (at random sizes), so a seed draws the same pixels on every machine.
"""

from __future__ import annotations

import random
from functools import cache

import numpy as np
from PIL import Image, ImageFont

# colours a question may name: far apart in hue, so each is told apart at a glance
COLOURS = {
    "red": (214, 39, 40),
    "blue": (31, 119, 180),
    "green": (44, 160, 44),
    "orange": (255, 127, 14),
    "purple": (148, 103, 189),
    "black": (20, 20, 20),
}
BACKGROUNDS = [(255, 255, 255), (250, 248, 240), (240, 244, 250), (245, 245, 245)]


@cache
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size)


def text_width(text: str, size: int) -> float:
    return font(size).getlength(text)


def scan(img: Image.Image, rng: random.Random, noise: float, turn: float) -> Image.Image:
    """The look of a scan or a photo: Gaussian noise of up to `noise` (0-255) and a turn of up to `turn`
    degrees either way, the corners filled with the page's colour."""
    if turn:
        img = img.rotate(rng.uniform(-turn, turn), resample=Image.BICUBIC, fillcolor=img.getpixel((0, 0)))
    if noise:
        pixels = np.asarray(img, dtype=np.float32)
        gen = np.random.default_rng(rng.getrandbits(32))
        pixels = pixels + gen.normal(0, rng.uniform(0, noise), pixels.shape[:2])[..., None]
        img = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    return img
