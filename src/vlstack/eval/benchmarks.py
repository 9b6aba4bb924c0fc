"""Benchmarks as data: VLMEvalKit's TSV files as published and vlstack's own JSONL read into `Item`s, and the
prompt of each item as InternVL's VLMEvalKit integration builds it (REFERENCE.md, "Evaluation rules"), as
OpenAI content parts: text, and each image where it stands.

TSV columns: `index`, `question`, `answer`; `image` (base64, or a JSON list of base64 for several images) or
`image_path` (relative to the file); options `A`...`I` where present (multiple choice; a row with none is an
open question); `hint`, `category`, `split`. DocVQA's answers are a Python list of gold answers as text.
JSONL: the training format (`image` or `images`, `conversations`, the first human turn being the question)
plus `answer` (a string or a list), and optionally `options`, `category`, `split`, `index`.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import io
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..chat import text_of
from ..errors import DataError
from ..files import json_value

LETTERS = "ABCDEFGHI"
CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."
VQA_PROMPT = "Answer the question using a single word or phrase."
PLACEHOLDER = re.compile(r"<image (\d+)>")  # MMMU's: where the k-th image goes


@dataclass
class Item:
    index: str
    question: str
    answers: list[str]  # the gold answers
    images: list[bytes] = field(default_factory=list)  # encoded images, in order
    options: dict[str, str] = field(default_factory=dict)  # letter -> text (multiple choice)
    hint: str = ""
    category: str = ""
    split: str = ""
    template: str = ""  # what drew it (vlstack synth's JSONL): the summary scores each template's categories too


def read_items(path: str | Path) -> list[Item]:
    """A benchmark file (.tsv or .jsonl) -> its items; DataError naming the file, the line and the problem."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"benchmark data not found: {path}")
    if path.suffix not in (".tsv", ".jsonl"):
        raise DataError(f"{path}: benchmark data must be a VLMEvalKit .tsv or a vlstack .jsonl file")
    try:
        return read_tsv(path) if path.suffix == ".tsv" else read_jsonl(path)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start + 1} of the file)") from None


def read_tsv(path: Path) -> list[Item]:
    csv.field_size_limit(sys.maxsize)  # (a base64 page is megabytes)
    with path.open(newline="", encoding="utf-8") as f:
        rows = csv.DictReader(f, delimiter="\t")
        columns = set(rows.fieldnames or [])
        missing = [c for c in ("index", "question", "answer") if c not in columns]
        if "image" not in columns and "image_path" not in columns:
            missing.append("image (or image_path)")
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
        items = []
        for line, row in enumerate(rows, start=2):
            where = f"{path}:{line}"
            if None in row.values() or None in row:  # (csv's marks of a short or a long row)
                raise DataError(f"{where}: the row's cells do not match the header's {len(columns)} columns")
            options = {k: row[k] for k in LETTERS if row.get(k) not in (None, "", "nan")}
            images = _tsv_images(row, path, where)
            items.append(
                Item(
                    row["index"],
                    row["question"],
                    _answers(row["answer"]),
                    images,
                    options,
                    _text(row.get("hint")),
                    _text(row.get("category")),
                    _text(row.get("split")),
                )
            )
    return items


def read_jsonl(path: Path) -> list[Item]:
    items = []
    for line, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{line}"
        row = json_value(raw, where, DataError)
        try:
            turns = row["conversations"]
            question = next(t["value"] for t in turns if t.get("from") == "human")
            answer = row["answer"]
        except (KeyError, StopIteration, TypeError, AttributeError) as e:
            what = "conversations with a human turn, and answer"
            raise DataError(f"{where}: not a benchmark line ({what}): {e}") from None
        names = row.get("images") or row.get("image") or []
        names = [names] if isinstance(names, str) else names  # ("images": "chart.png" is one path)
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DataError(f"{where}: 'image' / 'images' must be a path or a list of paths")
        images = [_read(path.parent / n, where) for n in names]
        question = question.replace("<image>\n", "").replace("<image>", "") if images else question
        answers = [str(a) for a in answer] if isinstance(answer, list) else [str(answer)]
        if not isinstance(row.get("options") or {}, dict):
            raise DataError(f'{where}: options must be an object of letters and their texts, e.g. {{"A": "red"}}')
        items.append(
            Item(
                str(row.get("index", line)),
                question,
                answers,
                images,
                dict(row.get("options") or {}),
                "",
                str(row.get("category", "")),
                str(row.get("split", "")),
                str(row.get("template", "")),
            )
        )
    return items


def prompt_text(item: Item) -> str:
    """The item's prompt (content) as text, <image> where each image stands (chat.text_of)."""
    return text_of(content(item))[0]


def content(item: Item) -> list[dict]:
    """The item's prompt as OpenAI content parts: its images where MMMU's `<image k>` placeholders stand (else
    all before the text, as InternVL puts them), then the text; multiple choice with its options and the
    letter instruction, open questions with the short-answer one."""
    text = item.question
    if item.options:
        text = (f"Hint: {item.hint}\n" if item.hint else "") + text + "\n"
        text += "".join(f"{k}. {v}\n" for k, v in item.options.items()) + CHOICE_PROMPT
    else:
        text += "\n" + VQA_PROMPT
    images = [_part(b) for b in item.images]
    pieces = PLACEHOLDER.split(text)  # text, k, text, k, ...
    if len(pieces) == 1:
        return [*images, {"type": "text", "text": text}]
    parts, used = [], set()
    for i, piece in enumerate(pieces):
        if i % 2 == 0:
            if piece:
                parts.append({"type": "text", "text": piece})
            continue
        k = int(piece)
        if not 1 <= k <= len(images):
            raise DataError(f"item {item.index}: <image {k}> but the item has {len(images)} image(s)")
        parts.append(images[k - 1])
        used.add(k)
    unplaced = [images[k - 1] for k in range(1, len(images) + 1) if k not in used]
    return unplaced + parts


def _tsv_images(row: dict, path: Path, where: str) -> list[bytes]:
    if row.get("image") not in (None, ""):
        value = row["image"]
        encoded = _cell_list(value, where, "image") if value.startswith("[") else [value]
        images = []
        for k, data in enumerate(encoded):
            try:
                images.append(base64.b64decode(data, validate=True))
            except (binascii.Error, ValueError):
                raise DataError(f"{where}: image {k + 1} is not valid base64") from None
            _check(images[-1], where)
        return images
    value = row.get("image_path") or ""
    names = _cell_list(value, where, "image_path") if value.startswith("[") else [value] if value else []
    return [_read(path.parent / n, where) for n in names]


def _cell_list(value: str, where: str, column: str) -> list[str]:
    """A TSV cell holding a JSON list of strings (several images)."""
    cells = json_value(value, f"{where}: column {column}", DataError)
    if not isinstance(cells, list) or not cells or not all(isinstance(c, str) for c in cells):
        raise DataError(f"{where}: column {column} must be one value or a JSON list of strings")
    return cells


def _read(path: Path, where: str) -> bytes:
    if not path.is_file():
        raise DataError(f"{where}: image file not found: {path}")
    data = path.read_bytes()
    _check(data, where)
    return data


def _check(data: bytes, where: str) -> None:
    """An image that decodes (its header read, not its pixels: cheap for a whole benchmark)."""
    try:
        Image.open(io.BytesIO(data))
    except Exception:
        raise DataError(f"{where}: an image does not decode") from None


def _answers(value: str) -> list[str]:
    """One gold answer, or DocVQA's Python list of them."""
    if value.startswith("[") and value.endswith("]"):
        try:
            parsed = ast.literal_eval(value)
            if isinstance(parsed, list):
                return [str(a) for a in parsed]
        except (ValueError, SyntaxError):
            pass
    return [value]


def _text(value: str | None) -> str:
    return "" if value in (None, "nan") else value


def _part(data: bytes) -> dict:
    kind = (Image.open(io.BytesIO(data)).format or "png").lower()
    return {"type": "image_url", "image_url": {"url": f"data:image/{kind};base64," + base64.b64encode(data).decode()}}
