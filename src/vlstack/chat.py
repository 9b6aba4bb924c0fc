"""Tokenizer, chat template and image placeholders: messages (+ images) -> model inputs.

Messages are OpenAI-style: `{"role", "content"}` with content a string (images referred to by
`<image>` placeholders, filled in order from `images=`) or a list of parts
(`{"type": "text", "text"}`, `{"type": "image", "image": ...}`, `{"type": "image_url", "image_url":
{"url": ...}}`). Image parts become `<image>\n` before the chat template runs, so any template
written for string contents works. After rendering, each `<image>` becomes
`<img>` + `<IMG_CONTEXT>` × (tiles × tokens per tile) + `</img>`.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
import torch
from tokenizers import Tokenizer

from . import spm
from .config import VLMConfig
from .errors import ConfigError, PromptError
from .image import ImageInput, ImageLimits, best_grid, load_image, tile_image
from .templates import TEMPLATES

IMAGE = "<image>"
ROLES = ("system", "user", "assistant")  # what InternVL's templates render
# a checkpoint's tokenizer files (copied beside a saved checkpoint)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "added_tokens.json",
    "special_tokens_map.json",
    "tokenization_internlm2.py",
)
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"

# The chat template of InternVL2.5/3 (Qwen2 LLM): ChatML with no default system message.
DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def read_template(directory: Path, conversation: str | None = None) -> str:
    """The chat template: the original layout's named `conversation` (templates.py) as InternVL's chat() renders
    it; else chat_template.json, else tokenizer_config.json's chat_template, else InternVL's ChatML template."""
    if conversation is not None:
        if conversation not in TEMPLATES:
            raise ConfigError(
                f"config.json names the template {conversation!r}, which vlstack does not know; it "
                f"knows {', '.join(TEMPLATES)}"
            )
        return TEMPLATES[conversation].jinja()
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = directory / name
        if path.is_file():
            try:
                template = json.loads(path.read_text()).get("chat_template")
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} is not valid JSON: {e}") from None
            if isinstance(template, list):  # named templates: take the default one
                template = next((t["template"] for t in template if t.get("name") == "default"), None)
            if template:
                return template
    return DEFAULT_TEMPLATE


def read_tokenizer(directory: Path) -> Tokenizer:
    """The checkpoint's tokenizer.json, else its SentencePiece tokenizer.model (converted: spm.py)."""
    path = directory / "tokenizer.json"
    if not path.is_file() and (directory / "tokenizer.model").is_file():
        return spm.convert(directory)
    if not path.is_file():
        raise ConfigError(f"{directory} has neither tokenizer.json nor a SentencePiece tokenizer.model")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises a bare Exception for malformed files
        raise ConfigError(f"{path} could not be read as a tokenizer: {e}") from None


def text_of(content: Any, image_mark: str = IMAGE) -> tuple[str, list[ImageInput]]:
    """A message's content -> (its text with image_mark where an image goes, the images of its image parts).
    In a string content <image> is a placeholder; in a text part it is text."""
    if isinstance(content, str):
        return content.replace(IMAGE, image_mark), []
    if not isinstance(content, list):
        raise PromptError(f"message content must be a string or a list of parts, not {type(content).__name__}")
    text, images = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            text.append(str(part.get("text", "")))
        elif kind in ("image", "image_url"):
            src = part.get("image") or part.get("url") or part.get("path")
            if kind == "image_url":
                url = part.get("image_url")
                src = url.get("url") if isinstance(url, dict) else url
            if src is None:
                raise PromptError(f"image part has no image: {sorted(part)}")
            images.append(src)
            text.append(image_mark + "\n")
        else:
            raise PromptError(f"unknown message part type {kind!r} (expected text, image or image_url)")
    return "".join(text), images


@dataclass
class Processor:
    """Turns messages into `input_ids` [1, T] and `pixel_values` [tiles, 3, S, S]."""

    tokenizer: Tokenizer
    cfg: VLMConfig
    template: str = DEFAULT_TEMPLATE
    limits: ImageLimits = field(default_factory=ImageLimits)
    max_tiles: int | None = None  # None: the checkpoint's

    def __post_init__(self) -> None:
        ids = {t: self.tokenizer.token_to_id(t) for t in (IMG_START, IMG_END, IMG_CONTEXT)}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ConfigError(f"the tokenizer lacks InternVL's special tokens {missing}")
        self.img_start, self.img_end, self.img_context = ids[IMG_START], ids[IMG_END], ids[IMG_CONTEXT]
        # what the tokenizer puts before a text of its own (BOS, where its post-processor adds one): before a prompt
        plain, full = (self.tokenizer.encode("x", add_special_tokens=flag).ids for flag in (False, True))
        self.prefix = next((full[:i] for i in range(len(full)) if full[i : i + len(plain)] == plain), [])
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        try:
            self._template = env.from_string(self.template)
        except jinja2.TemplateError as e:
            raise ConfigError(f"the chat template does not parse: {e}") from None
        # Messages' text is plain text to the tokenizer: a copy that never matches its added tokens encodes it,
        # and the template's own special tokens are found by _specials.
        spec = json.loads(self.tokenizer.to_str())
        added = [t["content"] for t in spec.get("added_tokens", [])]
        for t in spec.get("added_tokens", []):
            t["special"] = True  # encode_special_tokens covers special added tokens only
        self._plain = Tokenizer.from_str(json.dumps(spec))
        self._plain.encode_special_tokens = True
        self._ids = {t: self.tokenizer.token_to_id(t) for t in added}
        marks = [IMAGE, *sorted(added, key=len, reverse=True)]
        self._specials = re.compile("(" + "|".join(re.escape(t) for t in marks) + ")")
        nonce = secrets.token_hex(8)  # marks no message can contain
        self._open, self._close, self._image = (f"\ue000{nonce}{c}\ue001" for c in "oci")
        self._marks = re.compile(f"({re.escape(self._open)}|{re.escape(self._close)}|{re.escape(self._image)})")

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> tuple[str, list[ImageInput]]:
        """Messages -> (the prompt text, the images of image parts in order). In the text, each message's content
        stands between marks, so that encode_segments tokenizes it as plain text (a `<|im_end|>` or
        `<IMG_CONTEXT>` written by a user stays text), and each image is a mark; unmark() shows the text."""
        flat, images = [], []
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise PromptError("each message must be a dict with 'role' and 'content'")
            if m["role"] not in ROLES:
                raise PromptError(f"unknown message role {m['role']!r} (roles: {', '.join(ROLES)})")
            text, imgs = text_of(m["content"], self._image)
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise PromptError("message text is not valid Unicode (a lone surrogate)") from None
            flat.append({"role": m["role"], "content": text})
            images += imgs
        marked = [{**m, "content": self._open + m["content"] + self._close} for m in flat]
        try:
            text = self._template.render(messages=marked, add_generation_prompt=add_generation_prompt)
            if self._marks.sub(lambda g: "" if g[0] != self._image else g[0], text) != (
                plain := self._template.render(messages=flat, add_generation_prompt=add_generation_prompt)
            ):  # a template that rewrites message contents: no marks (their special-token strings stay special)
                text = plain
        except jinja2.TemplateError as e:
            raise PromptError(f"the chat template failed on these messages: {e}") from None
        return text, images

    def unmark(self, text: str) -> str:
        """Rendered text as the model's template writes it (images as <image>)."""
        return self._marks.sub(lambda g: IMAGE if g[0] == self._image else "", text)

    def encode(self, text: str, images: list[ImageInput] = ()) -> dict[str, torch.Tensor]:
        """Prompt text with one <image> per image -> input_ids [1, T] and pixel_values [N, 3, S, S]."""
        out = self.encode_segments([(text, False)], images)
        del out["labels"]
        return out

    def encode_segments(
        self,
        segments: list[tuple[str, bool]],
        images: list[ImageInput] = (),
        sizes: list[tuple[int, int]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Text segments (each marked: learn from it or not) -> input_ids [1, T], labels [1, T] (-100 where
        not learned) and pixel_values; the image places across all segments take the images in order.

        Text is cut at the template's special tokens and image places (as the tokenizer itself cuts at its
        added tokens), and each run between them, template and message text together, is encoded with added
        tokens off: the same ids as encoding the whole text, except that messages never yield special tokens.
        sizes: the images' (width, height) instead of the images: the ids alone (no pixel_values), nothing decoded."""
        pieces = [self._pieces(text) for text, _ in segments]
        n_placeholders = sum(kind == "image" for p in pieces for kind, _ in p)
        n_images = len(images) if sizes is None else len(sizes)
        if n_placeholders != n_images:
            raise PromptError(f"the prompt has {n_placeholders} <image> placeholders but {n_images} images")
        tile = self.cfg.vision.image_size
        max_tiles = self.max_tiles or self.cfg.max_tiles
        if sizes is None:
            tiles = [
                tile_image(load_image(src, self.limits), tile, self.cfg.min_tiles, max_tiles, self.cfg.use_thumbnail)
                for src in images
            ]
            counts = [len(t) for t in tiles]
        else:
            tiles, counts = [], [self.tile_count(w, h) for w, h in sizes]
        ids: list[int] = list(self.prefix)
        labels: list[int] = [-100] * len(ids)
        n_image = 0
        for (_, learn), segment in zip(segments, pieces):
            for kind, value in segment:
                if kind == "text":
                    new = self._plain.encode(value, add_special_tokens=False).ids
                elif kind == "special":
                    new = [self._ids[value]]
                else:
                    new = [self.img_start] + [self.img_context] * (counts[n_image] * self.cfg.tokens_per_tile)
                    new.append(self.img_end)
                    n_image += 1
                ids += new
                labels += new if learn else [-100] * len(new)
        expected = sum(counts) * self.cfg.tokens_per_tile
        if ids.count(self.img_context) != expected:  # only a template that rewrites contents can get here
            raise PromptError(f"the prompt holds {IMG_CONTEXT} tokens of its own; image tokens come from images")
        out = {"input_ids": torch.tensor([ids], dtype=torch.long), "labels": torch.tensor([labels], dtype=torch.long)}
        if tiles:
            out["pixel_values"] = tiles[0] if len(tiles) == 1 else torch.cat(tiles)  # (a cat always copies)
        return out

    def tile_count(self, width: int, height: int) -> int:
        """The tiles an image of this size becomes (tile_image's grid, and its thumbnail)."""
        max_tiles = self.max_tiles or self.cfg.max_tiles
        tile = self.cfg.vision.image_size
        cols, rows = (1, 1) if max_tiles == 1 else best_grid(width, height, tile, self.cfg.min_tiles, max_tiles)
        return cols * rows + int(self.cfg.use_thumbnail and cols * rows > 1)

    def _pieces(self, text: str) -> list[tuple[str, str]]:
        """Marked text -> [(kind, value)]: ("text", a run to encode), ("special", an added token of the template),
        ("image", "") for each image place (a mark, or <image> outside message contents)."""
        out: list[tuple[str, str]] = []
        run: list[str] = []
        inside = False

        def flush() -> None:
            if run:
                out.append(("text", "".join(run)))
                run.clear()

        for part in self._marks.split(text):
            if part in (self._open, self._close):
                inside = part == self._open
            elif part == self._image:
                flush()
                out.append(("image", ""))
            elif inside:
                run.append(part)
            else:
                for i, piece in enumerate(self._specials.split(part)):
                    if i % 2 == 0:
                        run.append(piece)
                    else:
                        flush()
                        out.append(("image", "") if piece == IMAGE else ("special", piece))
        flush()
        return [p for p in out if p != ("text", "")]

    def __call__(self, messages: list[dict], images: list[ImageInput] | None = None) -> dict[str, torch.Tensor]:
        text, part_images = self.render(messages)
        return self.encode(text, part_images + list(images or []))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def question_messages(
    question: str, n_images: int, history: list | None = None, system: str | None = None
) -> list[dict]:
    """InternVL's `chat()` convention: without <image> in the question, images go first
    (`<image>\\n`, or `Image-1: <image>\\nImage-2: <image>\\n...` for several)."""
    if n_images and IMAGE not in question:
        if n_images == 1:
            question = f"{IMAGE}\n{question}"
        else:
            question = "".join(f"Image-{i + 1}: {IMAGE}\n" for i in range(n_images)) + question
    messages = [{"role": "system", "content": system}] if system else []
    for turn in history or []:
        if isinstance(turn, dict):
            messages.append(turn)
        else:
            q, a = turn
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return messages + [{"role": "user", "content": question}]
