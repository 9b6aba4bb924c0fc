"""Bar charts of scores as PNG files (Pillow alone: no plotting library to install)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..files import write_files

BAR = (31, 119, 180)


def bar_chart(title: str, rows: list[tuple[str, float, str]], path: str | Path, top: float = 100.0) -> Path:
    """Horizontal bars, one per row (label, value in [0, top], note printed after the value), written to path
    (atomically)."""
    big, small = ImageFont.load_default(18), ImageFont.load_default(14)
    label_w = max([small.getlength(label) for label, _, _ in rows] + [40]) + 16
    bar_w, row_h = 360, 26
    notes = max([small.getlength(f"{value:.1f}  {note}") for _, value, note in rows] + [0])
    width = int(max(label_w + bar_w + 8 + notes, 12 + big.getlength(title)) + 16)  # every text inside the picture
    img = Image.new("RGB", (width, 48 + row_h * len(rows) + 16), "white")
    draw = ImageDraw.Draw(img)
    draw.text((12, 12), title, fill=(20, 20, 20), font=big)
    for i, (label, value, note) in enumerate(rows):
        y = 48 + row_h * i
        draw.text((label_w - 8, y + row_h / 2), label, fill=(30, 30, 30), font=small, anchor="rm")
        length = bar_w * max(0.0, min(value, top)) / top
        draw.rectangle((label_w, y + 4, label_w + bar_w, y + row_h - 4), fill=(238, 238, 238))
        draw.rectangle((label_w, y + 4, label_w + length, y + row_h - 4), fill=BAR)
        text = f"{value:.1f}" + (f"  {note}" if note else "")
        draw.text((label_w + bar_w + 8, y + row_h / 2), text, fill=(30, 30, 30), font=small, anchor="lm")
    path = Path(path)
    write_files(path.parent, {path.name: lambda p: img.save(p, format="PNG")})
    return path
