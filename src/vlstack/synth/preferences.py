"""Preference pairs from the model's own answers (MMPR's recipe for questions with a checkable answer): K
samples per question, each scored by the benchmark's rule (eval/metrics.py); a correct sample is chosen, a wrong
one rejected. Questions where every sample is right, or none, teach no preference and are dropped.

Written as a new directory: preferences.jsonl (one {"image", "question", "chosen", "rejected"} line a pair, the
question as the model was asked it), critic.jsonl (every answer judged right or wrong as a one-step answer
labelled + or -: a critic's outcome labels, for objective: prm), images/ (each question's images) and
summary.json (pairs per category)."""

from __future__ import annotations

import io
import json
import random
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import VLStackError
from ..eval.benchmarks import Item, content, prompt_text, read_items
from ..eval.runner import metric_of, score
from ..files import new_directory


class PreferenceError(VLStackError):
    """Options or data from which no preference pairs can be made."""


def make_preferences(
    vlm: Any,
    data: str | Path,
    out: str | Path,
    bench: str = "vqa",
    metric: str | None = None,
    adapter: str | None = None,
    samples: int = 8,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
    seed: int = 0,
    batch: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Pairs from `samples` answers to each item of the benchmark file `data` (sampled at `temperature`, seed
    seed x samples + k for the k-th answer of every item: reproducible), into the new directory out; returns the
    summary."""
    if samples < 2 or not 0 < temperature <= 2 or max_new_tokens < 1 or batch < 1:
        raise PreferenceError("--samples must be >= 2, --temperature in (0, 2], --max-new-tokens and --batch >= 1")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PreferenceError(f"{out} already exists: the pairs go into a new directory (choose another --out)")
    metric = metric_of(bench, metric)
    items = read_items(data)
    rng = random.Random(42)  # (MMMU's fallback draw, as the evaluation seeds it)
    lines: list[dict] = []
    critic: list[dict] = []  # every judged answer as an outcome label, for a critic (objective: prm)
    counts: Counter = Counter()
    with new_directory(out) as tmp:
        (tmp / "images").mkdir()
        for a in range(0, len(items), batch):
            part = items[a : a + batch]
            answers = [
                vlm.generate(
                    [[{"role": "user", "content": content(i)}] for i in part],
                    adapters=[adapter] * len(part),
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    seed=seed * samples + k,
                )
                for k in range(samples)
            ]  # [samples][items]
            for j, item in enumerate(part):
                drawn = list(dict.fromkeys(answers[k][j].strip() for k in range(samples)))  # (distinct answers)
                judged = [(text, score(metric, item, text, rng)[0]) for text in drawn]
                right = [t for t, s in judged if s >= 1.0]
                wrong = [t for t, s in judged if s <= 0.0]
                counts[item.category or "all", "questions"] += 1
                images = _write_images(tmp / "images", item) if right or wrong else []
                for text, label in [(t, "+") for t in right] + [(t, "-") for t in wrong]:  # (outcome labels)
                    line = {"question": prompt_text(item), "steps": [text or "(no answer)"], "labels": [label]}
                    critic.append({**({"image": images} if images else {}), **line})
                if not right or not wrong:
                    counts[item.category or "all", "all right" if right else "none right"] += 1
                    continue
                for chosen, rejected in zip(right, wrong):
                    line = {"question": prompt_text(item), "chosen": chosen, "rejected": rejected}
                    lines.append({**({"image": images} if images else {}), **line, "category": item.category})
                    counts[item.category or "all", "pairs"] += 1
            if progress:
                progress(min(a + batch, len(items)), len(items))
        if not lines:
            raise PreferenceError(
                f"no pairs: for every question of {data} the {samples} samples were all right or all wrong "
                "(more samples or a higher temperature give more mixed questions)"
            )
        (tmp / "preferences.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        (tmp / "critic.jsonl").write_text("".join(json.dumps(x) + "\n" for x in critic))
        kinds = ("questions", "pairs", "all right", "none right")
        per = {c: {k: counts[c, k] for k in kinds} for c in sorted({c for c, _ in counts})}
        summary = {
            "data": str(data),
            "metric": metric,
            "model": vlm.name + (f"+{adapter}" if adapter else ""),
            "samples": samples,
            "temperature": temperature,
            "seed": seed,
            "pairs": len(lines),
            "categories": per,
        }
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _write_images(directory: Path, item: Item) -> list[str]:
    """The item's images as files (their own format), named by the item: paths relative to the JSONL."""
    paths = []
    for k, data in enumerate(item.images):
        fmt = (Image.open(io.BytesIO(data)).format or "png").lower()
        name = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', item.index)}-{k}.{'jpg' if fmt == 'jpeg' else fmt}"
        if not (directory / name).exists():
            (directory / name).write_bytes(data)
        paths.append(f"images/{name}")
    return paths
