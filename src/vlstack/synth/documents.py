"""Synthetic documents (invoices, receipts, forms, tables) drawn from random records, with questions whose
answers come from the record: what can be seen without reading (the kind of document, how many items or
rows, the header's colour, a stamp, a signature, a ticked box) and what needs the text (the total computed
from the items, a date, a name, one item's amount, one table cell).

Each document is drawn from a template (a layout); the templates in HELD_OUT are drawn only for the test split.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from .charts import Sample
from .draw import BACKGROUNDS, COLOURS, font, scan

VISUAL = ("type", "count", "colour", "stamp", "signed", "checkbox")
TRAINING: tuple[str, ...] = ()  # kinds asked in training only (none)

TEMPLATES: dict[str, dict] = {
    "invoice-band": dict(doc="invoice", header="band"),
    "invoice-side": dict(doc="invoice", header="rule"),
    "invoice-box": dict(doc="invoice", header="box"),
    "receipt-centre": dict(doc="receipt", width=0.6),
    "receipt-wide": dict(doc="receipt", width=0.8),
    "receipt-narrow": dict(doc="receipt", width=0.5),
    "form-lines": dict(doc="form", boxes=False),
    "form-boxes": dict(doc="form", boxes=True),
    "form-tight": dict(doc="form", boxes=True, tight=True),
    "table-striped": dict(doc="table", stripes=True),
    "table-plain": dict(doc="table", stripes=False),
    "table-ruled": dict(doc="table", stripes=False, ruled=True),
}
HELD_OUT = {"invoice-box", "receipt-narrow", "form-tight", "table-ruled"}

COMPANIES = ["Acme Ltd", "Nordwind AG", "Blue Harbor Inc", "Kite & Co", "Orion Labs", "Maple Goods"]
PEOPLE = ["Ana Silva", "John Park", "Mei Chen", "Omar Haddad", "Lena Vogel", "Raj Patel", "Sara Cole"]
ITEMS = ["Paper", "Toner", "Stapler", "Folders", "Pens", "Labels", "Chair", "Lamp", "Cable", "Mouse"]
CITIES = ["Lisbon", "Berlin", "Osaka", "Toronto", "Nairobi", "Lima", "Oslo"]
INK = (30, 30, 30)


def document(rng: random.Random, size: int, template: str, noise: float = 8.0, turn: float = 2.0) -> Sample:
    """One document of `template` on a size x size page, and its questions."""
    style = TEMPLATES[template]
    img = Image.new("RGB", (size, size), rng.choice(BACKGROUNDS))
    draw = ImageDraw.Draw(img)
    s = size / 224  # sizes below are for a 224-pixel page
    record = {"invoice": _invoice, "receipt": _receipt, "form": _form, "table": _table}[style["doc"]](
        draw, rng, style, s, size
    )
    return Sample(scan(img, rng, noise, turn), template, record.pop("questions"), record)


def _date(rng: random.Random) -> str:
    return f"{rng.randint(2019, 2026)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def _items(rng: random.Random, low: int, high: int) -> list[tuple[str, int, float]]:
    names = rng.sample(ITEMS, rng.randint(low, high))
    return [(name, rng.randint(1, 9), rng.randint(100, 9999) / 100) for name in names]


def _stamp(draw, rng, s, x, y) -> bool:
    """A red PAID stamp, drawn half the time: whether it was."""
    if rng.random() < 0.5:
        return False
    r = 20 * s
    draw.ellipse((x - r, y - r, x + r, y + r), outline=COLOURS["red"], width=max(2, round(2 * s)))
    draw.text((x, y), "PAID", fill=COLOURS["red"], font=font(round(10 * s)), anchor="mm")
    return True


def _item_questions(rng, items, total) -> list[tuple[str, str, str]]:
    name, qty, price = rng.choice(items)
    return [
        ("count", "How many items are listed?", str(len(items))),
        ("total", "What is the total amount?", f"{total:.2f}"),
        ("lookup", f"What is the amount for {name}?", f"{qty * price:.2f}"),
    ]


def _invoice(draw, rng, style, s, size) -> dict:
    colour = rng.choice([c for c in COLOURS if c != "black"])
    company, person, date = rng.choice(COMPANIES), rng.choice(PEOPLE), _date(rng)
    f8, f10 = font(round(8 * s)), font(round(12 * s))
    if style["header"] == "band":
        draw.rectangle((0, 0, size, 26 * s), fill=COLOURS[colour])
        draw.text((8 * s, 13 * s), "INVOICE", fill="white", font=f10, anchor="lm")
    elif style["header"] == "rule":
        draw.text((8 * s, 12 * s), "INVOICE", fill=COLOURS[colour], font=f10, anchor="lm")
        draw.rectangle((8 * s, 22 * s, size - 8 * s, 25 * s), fill=COLOURS[colour])
    else:
        draw.rectangle((size - 90 * s, 6 * s, size - 8 * s, 28 * s), fill=COLOURS[colour])
        draw.text((size - 49 * s, 17 * s), "INVOICE", fill="white", font=f10, anchor="mm")
    draw.text((8 * s, 34 * s), company, fill=INK, font=f8)
    draw.text((8 * s, 46 * s), f"Bill to: {person}", fill=INK, font=f8)
    draw.text((8 * s, 58 * s), f"Date: {date}", fill=INK, font=f8)
    items = _items(rng, 2, 6)
    y = 76 * s
    for label, x in (("Item", 8), ("Qty", 100), ("Price", 130), ("Amount", 172)):
        draw.text((x * s, y), label, fill=INK, font=f8)
    draw.line((8 * s, y + 11 * s, size - 8 * s, y + 11 * s), fill=INK)
    for name, qty, price in items:
        y += 15 * s
        for text, x in ((name, 8), (str(qty), 100), (f"{price:.2f}", 130), (f"{qty * price:.2f}", 172)):
            draw.text((x * s, y), text, fill=INK, font=f8)
    total = sum(q * p for _, q, p in items)
    y += 18 * s
    draw.line((120 * s, y - 3 * s, size - 8 * s, y - 3 * s), fill=INK)
    draw.text((130 * s, y), f"Total {total:.2f}", fill=INK, font=f8)
    stamped = _stamp(draw, rng, s, 50 * s, min(y + 22 * s, size - 24 * s))
    questions = [
        ("type", "What kind of document is this?", "invoice"),
        ("colour", "What colour is the header?", colour),
        ("stamp", "Is there a stamp on the document?", "Yes" if stamped else "No"),
        *_item_questions(rng, items, total),
        ("name", "Who is the invoice addressed to?", person),
        ("date", "What is the date of the invoice?", date),
    ]
    return dict(company=company, person=person, date=date, items=items, colour=colour, questions=questions)


def _receipt(draw, rng, style, s, size) -> dict:
    width = size * style["width"]
    left = (size - width) / 2
    draw.rectangle((left, 4 * s, left + width, size - 4 * s), fill=(255, 255, 255), outline=(200, 200, 200))
    store, date = rng.choice(COMPANIES), _date(rng)
    f8 = font(round(8 * s))
    draw.text((size / 2, 14 * s), store.upper(), fill=INK, font=font(round(10 * s)), anchor="mm")
    draw.text((size / 2, 28 * s), date, fill=INK, font=f8, anchor="mm")
    items = _items(rng, 2, 7)
    y = 42 * s
    for name, qty, price in items:
        draw.text((left + 5 * s, y), f"{qty} {name}", fill=INK, font=f8)
        draw.text((left + width - 5 * s, y), f"{qty * price:.2f}", fill=INK, font=f8, anchor="ra")
        y += 13 * s
    total = sum(q * p for _, q, p in items)
    draw.line((left + 5 * s, y, left + width - 5 * s, y), fill=INK)
    draw.text((left + 5 * s, y + 4 * s), "TOTAL", fill=INK, font=f8)
    draw.text((left + width - 5 * s, y + 4 * s), f"{total:.2f}", fill=INK, font=f8, anchor="ra")
    stamped = _stamp(draw, rng, s, size / 2, min(y + 40 * s, size - 26 * s))
    questions = [
        ("type", "What kind of document is this?", "receipt"),
        ("stamp", "Is there a stamp on the document?", "Yes" if stamped else "No"),
        *_item_questions(rng, items, total),
        ("name", "What is the name of the store?", store),
        ("date", "What is the date of the receipt?", date),
    ]
    return dict(store=store, date=date, items=items, questions=questions)


def _form(draw, rng, style, s, size) -> dict:
    person, city, date = rng.choice(PEOPLE), rng.choice(CITIES), _date(rng)
    f8 = font(round(8 * s))
    draw.text((size / 2, 12 * s), "APPLICATION FORM", fill=INK, font=font(round(11 * s)), anchor="mm")
    gap = 22 if style.get("tight") else 28
    y = 30 * s
    for label, value in (("Name", person), ("City", city), ("Date", date)):
        draw.text((10 * s, y + 4 * s), label, fill=INK, font=f8)
        if style["boxes"]:
            draw.rectangle((60 * s, y, size - 10 * s, y + 16 * s), outline=INK)
        else:
            draw.line((60 * s, y + 15 * s, size - 10 * s, y + 15 * s), fill=INK)
        draw.text((64 * s, y + 4 * s), value, fill=(20, 40, 120), font=f8)
        y += gap * s
    ticked, signed = rng.random() < 0.5, rng.random() < 0.5
    box = 12 * s
    draw.rectangle((10 * s, y, 10 * s + box, y + box), outline=INK, width=max(1, round(s)))
    if ticked:
        draw.line((12 * s, y + 6 * s, 16 * s, y + 10 * s, 21 * s, y + 2 * s), fill=INK, width=max(2, round(2 * s)))
    draw.text((28 * s, y + 2 * s), "I agree to the terms", fill=INK, font=f8)
    y += gap * s
    draw.text((10 * s, y + 12 * s), "Signature", fill=INK, font=f8)
    draw.rectangle((60 * s, y, size - 10 * s, y + 34 * s), outline=INK)
    if signed:  # a scribble
        x0, points = 70 * s, []
        for k in range(rng.randint(6, 10)):
            points.append((x0 + k * 9 * s, y + rng.uniform(6, 28) * s))
        draw.line(points, fill=(20, 40, 120), width=max(2, round(2 * s)), joint="curve")
    questions = [
        ("type", "What kind of document is this?", "form"),
        ("signed", "Is the form signed?", "Yes" if signed else "No"),
        ("checkbox", "Is the checkbox ticked?", "Yes" if ticked else "No"),
        ("name", "What is the name on the form?", person),
        ("lookup", "What city is written on the form?", city),
        ("date", "What date is written on the form?", date),
    ]
    return dict(person=person, city=city, date=date, ticked=ticked, signed=signed, questions=questions)


def _table(draw, rng, style, s, size) -> dict:
    colour = rng.choice([c for c in COLOURS if c != "black"])
    rows, columns = rng.randint(2, 7), rng.choice([["Item", "Q1", "Q2"], ["Item", "2024", "2025", "Total"]])
    names = rng.sample(ITEMS, rows)
    cells = [[rng.randint(1, 99) for _ in columns[1:]] for _ in names]
    if columns[-1] == "Total":
        cells = [[a, b, a + b] for a, b, _ in cells]
    f8 = font(round(8 * s))
    left, top, width, height = 8 * s, 10 * s, size - 16 * s, 22 * s
    col = width / len(columns)
    draw.rectangle((left, top, left + width, top + height), fill=COLOURS[colour])
    for j, name in enumerate(columns):
        draw.text((left + col * (j + 0.5), top + height / 2), name, fill="white", font=f8, anchor="mm")
    for i, (name, values) in enumerate(zip(names, cells)):
        y = top + height * (i + 1)
        if style["stripes"] and i % 2:
            draw.rectangle((left, y, left + width, y + height), fill=(230, 230, 230))
        if style.get("ruled"):
            draw.line((left, y + height, left + width, y + height), fill=INK)
        for j, text in enumerate([name, *map(str, values)]):
            draw.text((left + col * (j + 0.5), y + height / 2), text, fill=INK, font=f8, anchor="mm")
    draw.rectangle((left, top, left + width, top + height * (rows + 1)), outline=INK)
    i, j = rng.randrange(rows), rng.randrange(1, len(columns))
    questions = [
        ("type", "What kind of document is this?", "table"),
        ("count", "How many rows does the table have, not counting the header?", str(rows)),
        ("colour", "What colour is the header?", colour),
        ("lookup", f"What is the value for {names[i]} in the column {columns[j]}?", str(cells[i][j - 1])),
    ]
    return dict(columns=columns, names=names, cells=cells, colour=colour, questions=questions)
