"""A critic's scores (a process reward model trained with `objective: prm`, loaded as an adapter of the base), and
Best-of-N: of N sampled answers, the one the critic scores highest.

An answer's steps are its non-empty lines (one line: one step, the critic then judging the outcome). They are put
to the critic as it was trained (train/data.steps_conversation): a step's score is P('+') of its reply, normalised
over '+' and '-' alone; an answer's score is the mean over its steps (VisualPRM's)."""

from __future__ import annotations

from typing import Any

import torch

from ..layers.lora import route
from ..layers.step import packed_step, v2pe_rope
from .data import IGNORE, Example, encode_example, steps_conversation

MAX_BEST_OF = 64


def steps_of(answer: str) -> list[str]:
    """An answer's steps: its non-empty lines (an empty answer: one empty step)."""
    return [line.strip() for line in answer.splitlines() if line.strip()] or [""]


def critic_scores(vlm: Any, critic: str, question: str, images: list[bytes], answers: list[str]) -> list[float]:
    """Each answer to the question (its images: encoded files; <image> where each stands, else all first) scored
    in [0, 1] by the critic (a loaded adapter's name): its steps' mean P('+')."""
    rows = [_encode(vlm, question, images, steps, ["+"] * len(steps)) for steps in map(steps_of, answers)]
    spans = [_replies(r["labels"]) for r in rows]  # each row's replies' first positions
    plus_id, minus_id = reply_ids(vlm)
    seqlens = [len(r["input_ids"]) for r in rows]
    offsets = torch.tensor([0, *seqlens]).cumsum(0)
    at = torch.cat([torch.tensor(s) - 1 + o for s, o in zip(spans, offsets)])  # [steps]: the positions predicting
    model, device = vlm.model, vlm.model.device  # each reply (the logits computed there only)
    rope = v2pe_rope([r["input_ids"] for r in rows], vlm.cfg.image_token_id, vlm.cfg.v2pe_delta)
    step = packed_step(seqlens, device, logits=at.to(device), rope=rope)
    step.lora = route(model, [critic] * len(rows), counts=seqlens)
    features = None
    with torch.no_grad():
        if "pixel_values" in rows[0]:  # (every row the same images: encoded once, by the critic, for all)
            first = rows[0]["input_ids"] == vlm.cfg.image_token_id  # [T0]
            tiles = route(model, [critic], counts=[seqlens[0]]).over_tiles(first, vlm.cfg.tokens_per_tile)
            once = model.image_features(rows[0]["pixel_values"].to(device, model.dtype), tiles)  # [n, P, C]
            features = once.repeat(len(rows), 1, 1)  # [rows x n, P, C]
        ids = torch.cat([r["input_ids"] for r in rows]).to(device)  # [T]
        logits = model(ids, step, None, features)  # [steps, V]
    plus = logits[:, [plus_id, minus_id]].float().softmax(-1)[:, 0].split([len(s) for s in spans])  # P('+')
    return [float(p.mean()) for p in plus]


def reply_ids(vlm: Any) -> tuple[int, int]:
    """The token ids of the critic's two replies, '+' and '-' (a reply is encoded apart from its context)."""
    probe = [_encode(vlm, "?", [], ["x"], [label]) for label in "+-"]
    return tuple(int(r["labels"][_replies(r["labels"])[0]]) for r in probe)


def _encode(vlm: Any, question: str, images: list[bytes], steps: list[str], labels: list[str]) -> dict:
    turns = [
        {"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
        for t in steps_conversation(question, steps, labels)
    ]
    if images and "<image>" not in question:  # (images first, as the training reader puts them)
        turns[0] = {"role": "user", "content": "<image>\n" * len(images) + turns[0]["content"]}
    return encode_example(vlm.processor, Example(turns, list(images), "the critic's input"), 1 << 20)


def _replies(labels: torch.Tensor) -> list[int]:
    """The position of each reply's first token (where a run of learned labels starts)."""
    learned = (labels != IGNORE).tolist()
    return [i for i, x in enumerate(learned) if x and (i == 0 or not learned[i - 1])]
