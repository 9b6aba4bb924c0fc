"""A critic's scores (a process reward model trained with `objective: prm`, loaded as an adapter of the base), and
Best-of-N: of N sampled answers, the one the critic scores highest.

An answer's steps are its non-empty lines (one line: one step, the critic then judging the outcome). They are put
to the critic as it was trained (train/data.steps_conversation): a step's score is P('+') of its reply, normalised
over '+' and '-' alone; an answer's score is the mean over its steps (VisualPRM's)."""

from __future__ import annotations

from typing import Any

import torch

from ..layers.lora import route
from ..layers.step import packed_step
from .data import IGNORE, Example, encode_example, steps_conversation

MAX_BEST_OF = 64


def steps_of(answer: str) -> list[str]:
    """An answer's steps: its non-empty lines (an empty answer: one empty step)."""
    return [line.strip() for line in answer.splitlines() if line.strip()] or [""]


def critic_scores(vlm: Any, critic: str, question: str, images: list[bytes], answers: list[str]) -> list[float]:
    """Each answer to the question (its images: encoded files; <image> where each stands, else all first) scored
    in [0, 1] by the critic (a loaded adapter's name): its steps' mean P('+')."""
    rows, spans = [], []
    for answer in answers:
        steps = steps_of(answer)
        rows.append(_encode(vlm, question, images, steps, ["+"] * len(steps)))
        spans.append(_replies(rows[-1]["labels"]))
    minus = _encode(vlm, question, images, steps_of(answers[0]), ["-"] * len(steps_of(answers[0])))
    plus_id, minus_id = int(rows[0]["labels"][spans[0][0]]), int(minus["labels"][spans[0][0]])
    seqlens = [len(r["input_ids"]) for r in rows]
    model, device = vlm.model, vlm.model.device
    step = packed_step(seqlens, device)
    step.lora = route(model, [critic] * len(rows), counts=seqlens)
    pixels = [r["pixel_values"] for r in rows if "pixel_values" in r]
    with torch.no_grad():
        ids = torch.cat([r["input_ids"] for r in rows]).to(device)  # [T]
        logits = model(ids, step, torch.cat(pixels).to(device, model.dtype) if pixels else None)  # [T, V]
    scores, start = [], 0
    for r, replies in zip(rows, spans):
        at = torch.tensor([start + p - 1 for p in replies], device=device)  # the positions predicting each reply
        pair = logits[at][:, [plus_id, minus_id]].float().softmax(-1)[:, 0]  # [steps] P('+')
        scores.append(float(pair.mean()))
        start += len(r["input_ids"])
    return scores


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
