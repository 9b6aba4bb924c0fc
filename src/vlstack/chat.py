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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
import torch
from tokenizers import Tokenizer

from .config import VLMConfig
from .errors import ConfigError, PromptError
from .image import ImageInput, ImageLimits, load_image, tile_image

IMAGE = "<image>"
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"

# The chat template of InternVL2.5/3 (Qwen2 LLM): ChatML with no default system message.
DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def read_template(directory: Path) -> str:
    """chat_template.json, else tokenizer_config.json's chat_template, else InternVL's ChatML template."""
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
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"{directory} has no tokenizer.json (vlstack reads tokenizers in that format)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises a bare Exception for malformed files
        raise ConfigError(f"{path} could not be read as a tokenizer: {e}") from None


def text_of(content: Any) -> tuple[str, list[ImageInput]]:
    """A message's content -> (text with <image> placeholders, the images of its image parts)."""
    if isinstance(content, str):
        return content, []
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
            text.append(IMAGE + "\n")
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
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        try:
            self._template = env.from_string(self.template)
        except jinja2.TemplateError as e:
            raise ConfigError(f"the chat template does not parse: {e}") from None

    def token_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> tuple[str, list[ImageInput]]:
        """Messages -> (prompt text with <image> placeholders, the images of image parts in order)."""
        flat, images = [], []
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise PromptError("each message must be a dict with 'role' and 'content'")
            text, imgs = text_of(m["content"])
            flat.append({"role": m["role"], "content": text})
            images += imgs
        try:
            return self._template.render(messages=flat, add_generation_prompt=add_generation_prompt), images
        except jinja2.TemplateError as e:
            raise PromptError(f"the chat template failed on these messages: {e}") from None

    def encode(self, text: str, images: list[ImageInput] = ()) -> dict[str, torch.Tensor]:
        """Prompt text with one <image> per image -> input_ids [1, T] and pixel_values [N, 3, S, S]."""
        out = self.encode_segments([(text, False)], images)
        del out["labels"]
        return out

    def encode_segments(
        self, segments: list[tuple[str, bool]], images: list[ImageInput] = ()
    ) -> dict[str, torch.Tensor]:
        """Text segments (each marked: learn from it or not) -> input_ids [1, T], labels [1, T] (-100 where
        not learned) and pixel_values; the <image> placeholders across all segments take the images in order."""
        n_placeholders = sum(text.count(IMAGE) for text, _ in segments)
        if n_placeholders != len(images):
            raise PromptError(f"the prompt has {n_placeholders} <image> placeholders but {len(images)} images")
        tile = self.cfg.vision.image_size
        max_tiles = self.max_tiles or self.cfg.max_tiles
        tiles = [
            tile_image(load_image(src, self.limits), tile, self.cfg.min_tiles, max_tiles, self.cfg.use_thumbnail)
            for src in images
        ]
        ids: list[int] = []
        labels: list[int] = []
        n_image = 0
        for text, learn in segments:
            for i, piece in enumerate(text.split(IMAGE)):
                new = []
                if i:
                    new = [self.img_start] + [self.img_context] * (len(tiles[n_image]) * self.cfg.tokens_per_tile)
                    new.append(self.img_end)
                    n_image += 1
                if piece:
                    new += self.tokenizer.encode(piece, add_special_tokens=False).ids
                ids += new
                labels += new if learn else [-100] * len(new)
        out = {"input_ids": torch.tensor([ids], dtype=torch.long), "labels": torch.tensor([labels], dtype=torch.long)}
        if tiles:
            out["pixel_values"] = tiles[0] if len(tiles) == 1 else torch.cat(tiles)  # (a cat always copies)
        return out

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
