"""Conversation datasets: the JSONL that InternVL / LLaVA users already have, checked line by line
before training starts, and encoded with loss only on the assistant's tokens.

One example per line, either InternVL/LLaVA style
    {"image": "img/1.png" | ["a.png", "b.png"], "conversations": [{"from": "human", "value": "<image>\\n..."},
                                                                  {"from": "gpt", "value": "..."}]}
or OpenAI style
    {"images": [...], "messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
or a preference pair, as MMPR (for the preference objectives: train/preference.py)
    {"image": "img/1.png", "question": "...", "chosen": "the better answer", "rejected": "the worse one"}
or an answer's steps labelled right (+) or wrong (-), for a critic (objective: prm), as VisualPRM poses it: a
multi-turn chat, the question and the first step the first user turn, each further step a turn, each label the
critic's reply (its only learned tokens)
    {"image": "img/1.png", "question": "...", "steps": ["first step", "second step"], "labels": ["+", "-"]}
Image paths are relative to the JSONL file. Without any <image> placeholder, images go before the
first user message (InternVL's convention).
"""

from __future__ import annotations

import os
import random
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch

from ..chat import IMAGE, Processor
from ..errors import ImageError, VLStackError
from ..files import json_value
from ..image import ImageLimits, load_image

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IGNORE = -100  # label of tokens without loss


class DatasetError(VLStackError):
    """A dataset line that cannot be used, named by file and line number."""


@dataclass
class Example:
    messages: list[dict]  # {"role", "content"} with <image> placeholders
    images: list[Path]
    where: str  # "file.jsonl:12"
    sizes: list[tuple[int, int]] | None = None  # the images' (width, height), once they are checked
    rejected: list[dict] | None = None  # a preference pair's: the messages with the rejected answer (messages:
    #   with the chosen one)
    steps: bool = False  # a critic's chat: an answer's steps, each labelled + or -

    def sides(self) -> list[Example]:
        """The rows it trains: itself, or a pair's chosen and rejected conversations."""
        if self.rejected is None:
            return [self]
        return [self, Example(self.rejected, self.images, self.where, self.sizes)]


def _parse(line: str, where: str, root: Path) -> Example:
    raw = json_value(line, where, DatasetError)
    if not isinstance(raw, dict):
        raise DatasetError(f"{where}: each line must be a JSON object")
    if "steps" in raw or "labels" in raw:
        raw = _steps(raw, where)
    pair = [k for k in ("question", "chosen", "rejected") if k in raw]
    if pair:
        if len(pair) < 3 or not all(isinstance(raw[k], str) and raw[k] for k in pair):
            raise DatasetError(f"{where}: a preference pair needs 'question', 'chosen' and 'rejected' (strings)")
        raw = {**raw, "conversations": [{"from": "human", "value": raw["question"]}, {"from": "gpt", "value": ""}]}
    turns = raw.get("conversations", raw.get("messages"))
    if not isinstance(turns, list) or not turns:
        raise DatasetError(f"{where}: needs a non-empty 'conversations' (or 'messages') list")
    messages = []
    for i, t in enumerate(turns):
        role = t.get("from", t.get("role")) if isinstance(t, dict) else None
        text = t.get("value", t.get("content")) if isinstance(t, dict) else None
        if role not in ROLES:
            raise DatasetError(f"{where}: turn {i} has role {role!r}; expected one of {sorted(ROLES)}")
        if not isinstance(text, str):
            raise DatasetError(f"{where}: turn {i} has no text ('value' or 'content' must be a string)")
        messages.append({"role": ROLES[role], "content": text})
    if pair:  # (the question's image placeholder settled below, once: both sides share it)
        messages[-1]["content"] = raw["chosen"]
    if not any(m["role"] == "assistant" for m in messages):
        raise DatasetError(f"{where}: has no assistant turn to learn from")
    images = raw.get("image", raw.get("images")) or []
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise DatasetError(f"{where}: 'image' must be a path or a list of paths")
    paths = [root / p for p in images]
    for p in paths:
        if not p.is_file():
            raise DatasetError(f"{where}: image not found: {p}")
    n_placeholders = sum(m["content"].count(IMAGE) for m in messages)
    if n_placeholders == 0 and paths:
        first = next(i for i, m in enumerate(messages) if m["role"] == "user")
        prefix = IMAGE + "\n" if len(paths) == 1 else "".join(f"Image-{k + 1}: {IMAGE}\n" for k in range(len(paths)))
        messages[first] = {"role": "user", "content": prefix + messages[first]["content"]}
    elif n_placeholders != len(paths):
        raise DatasetError(f"{where}: {n_placeholders} <image> placeholders but {len(paths)} images")
    rejected = [*messages[:-1], {"role": "assistant", "content": raw["rejected"]}] if pair else None
    return Example(messages, paths, where, rejected=rejected, steps="steps" in raw)


LABELS = {"+": "+", "-": "-", "\u2212": "-"}  # a step's label: right or wrong (the minus sign read as "-")


def steps_conversation(question: str, steps: list[str], labels: list[str]) -> list[dict]:
    """An answer's steps as the critic's chat: the question and the first step, then each step a user turn,
    each followed by its label as the critic's reply."""
    turns = []
    for k, (step, label) in enumerate(zip(steps, labels)):
        turns += [
            {"from": "human", "value": f"{question}\n{step}" if k == 0 else step},
            {"from": "gpt", "value": LABELS[label]},
        ]
    return turns


def _steps(raw: dict, where: str) -> dict:
    """A step-labelled line -> the same line with its critic's conversations."""
    question, steps, labels = raw.get("question"), raw.get("steps"), raw.get("labels")
    texts = isinstance(steps, list) and steps and all(isinstance(x, str) and x.strip() for x in steps)
    if not isinstance(question, str) or not question or not texts or not isinstance(labels, list):
        raise DatasetError(f"{where}: a step-labelled line needs 'question', 'steps' (non-empty strings), 'labels'")
    if len(labels) != len(steps) or not all(x in LABELS for x in labels):
        raise DatasetError(f"{where}: 'labels' must give each of the {len(steps)} steps '+' (right) or '-' (wrong)")
    rest = {k: v for k, v in raw.items() if k not in ("question", "steps", "labels")}
    return {**rest, "steps": True, "conversations": steps_conversation(question, steps, labels)}


def read_dataset(path: str | Path) -> list[Example]:
    """Every line of a JSONL file, checked now: the first bad line raises DatasetError naming it."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset not found: {path}")
    examples = []
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DatasetError(f"{path}:{n}: not UTF-8 text (byte {e.start + 1} of the line)") from None
            if line.strip():
                examples.append(_parse(line, f"{path}:{n}", path.parent))
    if not examples:
        raise DatasetError(f"{path}: holds no examples")
    sizes = check_images(examples, str(path))
    for ex in examples:
        ex.sizes = [sizes[p] for p in ex.images]
    return examples


def check_images(examples: list[Example], name: str, limits: ImageLimits | None = None) -> dict[Path, tuple[int, int]]:
    """Decode every image of the examples now, in parallel, with a progress line on stderr: a bad image is named
    by file and line before training starts, not when a step reaches it. Returns each image's (width, height)."""
    first = {p: ex.where for ex in reversed(examples) for p in ex.images}  # each image once, at its first line
    todo = list(first.items())
    sizes: dict[Path, tuple[int, int]] = {}
    if not todo:
        return sizes
    done, tty = 0, sys.stderr.isatty()
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 2)) as pool:
        futures = {pool.submit(load_image, p, limits): (where, p) for p, where in todo}
        for future in as_completed(futures):
            try:
                sizes[futures[future][1]] = future.result().size
            except ImageError as e:
                where, p = futures[future]
                for f in futures:
                    f.cancel()
                raise DatasetError(f"{where}: image {p}: {e}") from None
            done += 1
            if tty or done == len(todo):
                print(
                    f"\r{name}: {done}/{len(todo)} images checked",
                    end="\n" if done == len(todo) else "",
                    file=sys.stderr,
                    flush=True,
                )
    return sizes


def count_cut(processor: Processor, examples: list[Example], max_len: int) -> int:
    """How many examples keep no answer token to learn from once cut to max_len tokens (their images counted by
    size, nothing tiled)."""
    cut = 0
    for ex in examples:
        labels = encode_example(processor, ex, max_len, ids_only=True)["labels"]
        cut += not bool((labels[1:] != IGNORE).any())  # (a token learns the label of the next one)
    return cut


def encode_example(processor: Processor, ex: Example, max_len: int, ids_only: bool = False) -> dict[str, torch.Tensor]:
    """-> input_ids [T], labels [T] (IGNORE except on assistant replies), pixel_values [N, 3, S, S] (ids_only:
    without them, the images counted by their sizes)."""
    segments = []  # (text, learn?)
    done = ""
    for i, m in enumerate(ex.messages):
        full, _ = processor.render(ex.messages[: i + 1], add_generation_prompt=False)
        if not full.startswith(done):
            raise DatasetError(f"{ex.where}: the chat template renders earlier turns differently as the chat grows")
        if m["role"] == "assistant":
            header, _ = processor.render(ex.messages[:i], add_generation_prompt=True)
            if not header.startswith(done) or not full.startswith(header):
                raise DatasetError(f"{ex.where}: the chat template's assistant header is not a prefix of the turn")
            segments += [(header[len(done) :], False), (full[len(header) :], True)]
        else:
            segments.append((full[len(done) :], False))
        done = full
    sizes = ex.sizes if ids_only and ex.sizes is not None else None
    images = [p if isinstance(p, bytes) else str(p) for p in ex.images]  # (files, or an evaluation's image bytes)
    enc = processor.encode_segments(segments, images, sizes)
    ids, labels = enc["input_ids"][0], enc["labels"][0]
    if len(ids) > max_len:
        img_positions = (ids == processor.img_context).nonzero()
        if len(img_positions) and int(img_positions[-1]) >= max_len:
            raise DatasetError(f"{ex.where}: {len(ids)} tokens; max_len {max_len} would cut into an image")
        ids, labels = ids[:max_len], labels[:max_len]
    out = {"input_ids": ids, "labels": labels}
    if "pixel_values" in enc:
        out["pixel_values"] = enc["pixel_values"]
    return out


class Stream:
    """A job's endless sequence of micro-batches: the examples in a seeded shuffle, epoch after epoch.

    The order depends only on the seed and the position, so a job sees the same batches whether it is
    trained alone or fused with others, and a resumed job continues where it stopped.
    """

    def __init__(self, examples: list[Example], batch_size: int, seed: int):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.position = 0  # micro-batches served so far

    def order(self, epoch: int) -> list[int]:
        idx = list(range(len(self.examples)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(idx)
        return idx

    def next(self) -> list[Example]:
        n = len(self.examples)
        start = self.position * self.batch_size
        batch = [self.examples[self.order(k // n)[k % n]] for k in range(start, start + self.batch_size)]
        self.position += 1
        return batch
