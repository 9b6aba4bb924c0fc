"""Synthetic charts (bar, line, pie) drawn from a random table, with questions whose answers are computed from
that table: what can be seen without reading text (how many bars, which colour, which position, the trend,
the chart's type) and what needs the text (a value, the largest, a comparison, arithmetic, the whole table).

Each chart is drawn from a template (a style); the templates in HELD_OUT are drawn only for the test split.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .draw import BACKGROUNDS, COLOURS, font, scan, text_width

# kinds of question answered by looking alone; the rest need the chart's text read
VISUAL = ("count", "type", "colour", "position", "trend")
# kinds asked in training only: each bar's or point's height on a coarse scale, a chart-to-table that needs no
# text read (dense supervision of where things are, for the position, trend and count questions); a pie's
# colours from its largest slice to its smallest (the same for the pie's colour and count)
TRAINING = ("heights", "order")

TEMPLATES: dict[str, dict] = {
    "bar-grid": dict(chart="bar", grid=True, labels=False, width=0.6),
    "bar-plain": dict(chart="bar", grid=False, labels=True, width=0.7),
    "bar-thin": dict(chart="bar", grid=True, labels=True, width=0.4),
    "bar-framed": dict(chart="bar", grid=False, labels=False, width=0.55, frame=True),
    "line-plain": dict(chart="line", grid=False, markers=False),
    "line-grid": dict(chart="line", grid=True, markers=True),
    "line-framed": dict(chart="line", grid=True, markers=False, frame=True),
    "pie-labels": dict(chart="pie", legend=False),
    "pie-legend": dict(chart="pie", legend=True),
    "pie-offset": dict(chart="pie", legend=False, offset=True),
}
HELD_OUT = {"bar-framed", "line-framed", "pie-offset"}

TOPICS = [
    ("Sales by region", ["North", "South", "East", "West", "Centre"]),
    ("Revenue by quarter", ["Q1", "Q2", "Q3", "Q4", "Q5"]),
    ("Visitors by year", ["2019", "2020", "2021", "2022", "2023", "2024", "2025"]),
    ("Fruit harvest", ["Apples", "Pears", "Plums", "Cherries", "Grapes"]),
    ("Tickets by team", ["Alpha", "Beta", "Gamma", "Delta", "Omega"]),
    ("Monthly orders", ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul"]),
]


@dataclass
class Sample:
    image: Image.Image
    template: str
    questions: list[tuple[str, str, str]]  # (kind, question, answer)
    table: dict  # what was drawn: title, labels, values, colours


def chart(
    rng: random.Random,
    size: int,
    template: str,
    noise: float = 6.0,
    turn: float = 1.5,
    line_width: float = 2.0,
    decorate: bool = False,
) -> Sample:
    """One chart of `template` on a size x size canvas, and its questions; a line chart's line line_width pixels
    wide at 224 px (wider: a warm-up set, where a model learns to read the line's shape before the thin ones);
    decorate: strokes that are not data drawn at random too (a page border, reference lines: _decorate)."""
    style = dict(TEMPLATES[template], line_width=line_width)
    kind = style["chart"]
    n = rng.randint(4, 7) if kind == "line" else rng.randint(3, 5)
    title, pool = rng.choice([t for t in TOPICS if len(t[1]) >= n])
    start = rng.randrange(len(pool) - n + 1) if kind == "line" else 0
    labels = pool[start : start + n] if kind == "line" else rng.sample(pool, n)
    if kind == "pie":  # shares of 100, all different
        cuts = sorted(rng.sample(range(5, 96), n - 1))
        values = [b - a for a, b in zip([0, *cuts], [*cuts, 100])]
        while len(set(values)) < n or min(values) < 4:
            cuts = sorted(rng.sample(range(5, 96), n - 1))
            values = [b - a for a, b in zip([0, *cuts], [*cuts, 100])]
    else:
        values = rng.sample(range(5, 101), n)
    names = rng.sample([c for c in COLOURS if c != "black"], n) if kind != "line" else [rng.choice(list(COLOURS))]
    img = Image.new("RGB", (size, size), rng.choice(BACKGROUNDS))
    draw = ImageDraw.Draw(img)
    s = size / 224  # sizes below are for a 224-pixel canvas
    draw.text((size / 2, 4 * s), title, fill=(30, 30, 30), font=font(round(11 * s)), anchor="mt")
    box = (28 * s, 22 * s, size - 8 * s, size - 22 * s)  # the plot area: left, top, right, bottom
    {"bar": _bars, "line": _line, "pie": _pie}[kind](draw, rng, style, box, s, labels, values, names)
    if decorate:  # (from a stream of its own: the chart's noise, turn and questions stay as drawn without)
        _decorate(draw, random.Random(repr(rng.getstate()[1])), kind, box, s, size)  # (a str seed is the same
        # in every process; hash() of the whole state is not where None's hash is its address, as on Python 3.11)
    img = scan(img, rng, noise, turn)
    table = dict(title=title, labels=labels, values=values, colours=names)
    return Sample(img, template, questions(kind, table, rng), table)


def questions(kind: str, t: dict, rng: random.Random) -> list[tuple[str, str, str]]:
    labels, values, colours = t["labels"], t["values"], t["colours"]
    n, top, low = len(values), values.index(max(values)), values.index(min(values))
    thing = {"bar": "bars", "line": "points", "pie": "slices"}[kind]
    out = [("count", f"How many {thing} does the chart have?", str(n)), ("type", "What type of chart is this?", kind)]
    if kind != "pie":
        ymax = axis_top(max(values))
        levels = " ".join(str(min(9, 10 * v // ymax)) for v in values)
        out.append(("heights", f"How high is each {thing[:-1]} from left to right, from 0 to 9?", levels))
    if kind == "bar":
        out += [
            ("colour", "What colour is the tallest bar?", colours[top]),
            ("position", "Counting from the left, which bar is the tallest?", str(top + 1)),
        ]
    elif kind == "line":
        out += [
            ("colour", "What colour is the line?", colours[0]),
            ("position", "Counting from the left, which point is the highest?", str(top + 1)),
            (
                "trend",
                "Does the line end higher or lower than it starts?",
                "higher" if values[-1] > values[0] else "lower",
            ),
        ]
    else:
        out += [
            ("colour", "What colour is the largest slice?", colours[top]),
            (
                "order",
                "What colours are the slices, from the largest to the smallest?",
                " ".join(colours[i] for i in sorted(range(n), key=lambda i: -values[i])),
            ),
        ]
    a, b = rng.sample(range(n), 2)
    unit = "%" if kind == "pie" else ""
    out += [
        ("retrieval", f"What is the value of {labels[a]}?", f"{values[a]}{unit}"),
        ("extremum", "Which category has the highest value?", labels[top]),
        ("extremum", "Which category has the lowest value?", labels[low]),
        (
            "comparison",
            f"Is the value of {labels[a]} greater than that of {labels[b]}?",
            "Yes" if values[a] > values[b] else "No",
        ),
        (
            "arithmetic",
            "What is the difference between the highest and the lowest value?",
            str(max(values) - min(values)),
        ),
        ("arithmetic", f"What is the sum of {labels[a]} and {labels[b]}?", str(values[a] + values[b])),
        (
            "to_table",
            "Convert the chart to a table.",
            "\n".join(["label | value"] + [f"{x} | {v}{unit}" for x, v in zip(labels, values)]),
        ),
    ]
    return out


def axis_top(top_value: int) -> int:
    """The y axis' maximum: the largest value rounded up to a multiple of 10."""
    return 10 * -(-top_value // 10)


def _axes(draw, style, box, s, top_value) -> float:
    """Axes, ticks and (if the style has them) grid lines: the y scale's maximum."""
    left, top, right, bottom = box
    ymax = axis_top(top_value)
    for k in range(5):
        y = bottom - (bottom - top) * k / 4
        if style.get("grid") and k:
            draw.line((left, y, right, y), fill=(215, 215, 215), width=1)
        draw.text((left - 3 * s, y), str(round(ymax * k / 4)), fill=(60, 60, 60), font=font(round(8 * s)), anchor="rm")
    draw.line((left, top, left, bottom), fill=(40, 40, 40), width=max(1, round(s)))
    draw.line((left, bottom, right, bottom), fill=(40, 40, 40), width=max(1, round(s)))
    if style.get("frame"):
        draw.rectangle((left, top, right, bottom), outline=(40, 40, 40), width=max(1, round(s)))
    return ymax


def _decorate(draw, rng, kind, box, s, size) -> None:
    """Strokes that carry no data, each at random: a border round the page, and on bar and line charts a
    horizontal reference line (solid or dashed) and a vertical marker across the plot, in greys from as dark as
    the axes to mid grey: a model learns that not every long dark stroke is the data's line."""
    left, top, right, bottom = box

    def grey() -> tuple[int, int, int]:
        g = rng.randint(30, 170)
        return g, g, g

    if rng.random() < 0.5:
        m = rng.uniform(1, 5) * s
        draw.rectangle((m, m, size - 1 - m, size - 1 - m), outline=grey(), width=max(1, round(s)))
    if kind == "pie":
        return
    for horizontal in (True, False):
        if rng.random() < (0.5 if horizontal else 0.3):
            at = rng.uniform(top, bottom) if horizontal else rng.uniform(left, right)
            start, end = (left, right) if horizontal else (top, bottom)
            dash = rng.choice([0, 4 * s, 6 * s])  # 0: solid
            colour, step = grey(), 2 * dash or end - start
            for a in np.arange(start, end, step):
                b = min(a + (dash or step), end)
                draw.line((a, at, b, at) if horizontal else (at, a, at, b), fill=colour, width=max(1, round(s)))


def _bars(draw, rng, style, box, s, labels, values, names) -> None:
    left, top, right, bottom = box
    ymax = _axes(draw, style, box, s, max(values))
    slot = (right - left) / len(values)
    for i, (label, value, name) in enumerate(zip(labels, values, names)):
        x0 = left + slot * (i + (1 - style["width"]) / 2)
        y = bottom - (bottom - top) * value / ymax
        draw.rectangle((x0, y, x0 + slot * style["width"], bottom), fill=COLOURS[name])
        centre = left + slot * (i + 0.5)
        draw.text((centre, bottom + 3 * s), label, fill=(40, 40, 40), font=font(round(8 * s)), anchor="mt")
        if style["labels"]:
            draw.text((centre, y - 2 * s), str(value), fill=(40, 40, 40), font=font(round(8 * s)), anchor="mb")


def _line(draw, rng, style, box, s, labels, values, names) -> None:
    left, top, right, bottom = box
    ymax = _axes(draw, style, box, s, max(values))
    step = (right - left) / len(values)
    points = [(left + step * (i + 0.5), bottom - (bottom - top) * v / ymax) for i, v in enumerate(values)]
    width = max(2, round(style["line_width"] * s))
    joint = "curve" if style["line_width"] > 2 else None  # (a wide line's corners rounded, not cut off)
    draw.line(points, fill=COLOURS[names[0]], width=width, joint=joint)
    for (x, y), label in zip(points, labels):
        if style["markers"]:
            r = 3 * s
            draw.ellipse((x - r, y - r, x + r, y + r), fill=COLOURS[names[0]])
        draw.text((x, bottom + 3 * s), label, fill=(40, 40, 40), font=font(round(8 * s)), anchor="mt")


def _pie(draw, rng, style, box, s, labels, values, names) -> None:
    left, top, right, bottom = box
    legend = style["legend"]
    cx = (left + right) / 2 - (30 * s if legend else 0)
    cy = (top + bottom) / 2
    r = min(right - left - (60 * s if legend else 40 * s), bottom - top - 20 * s) / 2
    angle = rng.uniform(0, 360) if style.get("offset") else -90.0
    for i, (label, value, name) in enumerate(zip(labels, values, names)):
        sweep = 360 * value / 100
        draw.pieslice((cx - r, cy - r, cx + r, cy + r), angle, angle + sweep, fill=COLOURS[name], outline="white")
        if legend:
            y = top + 12 * s * i
            draw.rectangle((right - 52 * s, y, right - 45 * s, y + 7 * s), fill=COLOURS[name])
            draw.text((right - 42 * s, y), f"{label} {value}%", fill=(40, 40, 40), font=font(round(7 * s)))
        else:
            mid = math.radians(angle + sweep / 2)
            x, y = cx + 1.15 * r * math.cos(mid), cy + 1.15 * r * math.sin(mid)
            text = f"{label} {value}%"
            anchor = "lm" if math.cos(mid) >= 0 else "rm"
            width = text_width(text, round(7 * s))
            x = max(x, width + 2 * s) if anchor == "rm" else min(x, right + 6 * s - width)  # (on the canvas)
            draw.text((x, y), text, fill=(40, 40, 40), font=font(round(7 * s)), anchor=anchor)
        angle += sweep
