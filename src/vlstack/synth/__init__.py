"""`vlstack synth`: offline synthetic datasets of charts and documents, for adaptation and for evaluation.

A dataset directory holds `images/`, `train.jsonl` (the training format, the question asked as the evaluation
asks it), `test.jsonl` (vlstack's benchmark JSONL: the same plus `answer`, `category` = the question's kind,
`split`), `train-answers.jsonl` (the training split's questions as test.jsonl holds them: questions with
answers on training charts, to sample a model on for preference pairs, `vlstack synth preferences`), `test.tsv`
(VLMEvalKit's columns, images by path) and `provenance.json` (generator, version, seed,
parameters, the templates of each split). Test images are drawn only from held-out templates. A seed gives the
same dataset on any machine. The directory appears whole or not at all.
"""

from __future__ import annotations

import csv
import json
import random
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path

from .. import __version__
from ..errors import DataError
from ..eval.benchmarks import VQA_PROMPT
from ..files import new_directory
from . import charts, documents

VERSION = "3"  # of the generators: bump when a seed would draw something else
KINDS: dict[str, object] = {"charts": charts, "documents": documents}


MIN_SIZE, MAX_SIZE = 64, 4096  # an image's side (InternVL reads 448-px tiles: 4096 is ~80 of them)
LINE_BYTES = 4096  # a bound on what a question's lines hold in memory until the files are written


def memory_needed(n: int, size: int) -> int:
    """Bytes a dataset takes while it is drawn: one image at a time (RGB, and the drawing's copies), and every
    image's questions (~10 each) until the JSONL files are written."""
    return 16 * size * size + 10 * n * LINE_BYTES


def available_memory() -> int | None:
    """Bytes of memory available now (None where the system does not say)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def subjects(kind: str) -> list[str]:
    """What --only may name for this kind: its charts' or documents' types."""
    module = KINDS[kind]
    return sorted({style.get("chart") or style.get("doc") for style in module.TEMPLATES.values()})


def synthesize(
    kind: str,
    n: int,
    out: str | Path,
    seed: int = 0,
    size: int = 448,
    test_fraction: float = 0.2,
    questions: str = "all",
    only: list[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    conversations: bool = False,
    line_width: float = 2.0,
    decorate: bool = False,
) -> dict:
    """n images of `kind` ("charts" or "documents") with their questions into the new directory `out`;
    questions "visual" keeps only the kinds answered by looking; only: these chart or document types;
    conversations: train.jsonl holds one conversation per image, its questions as turns in a random order (the
    image encoded once for all its answers: several times the supervision per step); line_width: a line chart's
    line in pixels at 224 px (charts); decorate: the training charts get strokes that carry no data at random
    (a page border, reference lines), the test charts none. Returns the provenance record."""
    check_options(kind, n, size, test_fraction, questions, only, line_width, decorate)
    module = KINDS[kind]
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} already exists: synth writes a new directory (choose another --out)")
    pool = {t: s for t, s in module.TEMPLATES.items() if not only or (s.get("chart") or s.get("doc")) in only}
    splits = {"train": [t for t in pool if t not in module.HELD_OUT], "test": [t for t in pool if t in module.HELD_OUT]}
    n_test = round(n * test_fraction)
    if n_test and not splits["test"] or n - n_test and not splits["train"]:
        raise DataError(f"--only {','.join(only or [])}: no templates for a split")
    draw = partial(charts.chart, line_width=line_width) if kind == "charts" else documents.document

    lines: dict[str, list[dict]] = {"train": [], "test": []}
    counts: Counter = Counter()
    with new_directory(out) as tmp:
        (tmp / "images").mkdir()
        for i in range(n):
            split = "test" if i >= n - n_test else "train"
            rng = random.Random(f"{seed}:{i}")  # each image its own stream: a dataset's first k images are the same
            template = rng.choice(splits[split])
            extra = {"decorate": decorate and split == "train"} if kind == "charts" else {}
            sample = draw(rng, size, template, **extra)
            name = f"images/{i:05d}.png"
            sample.image.save(tmp / name)
            for k, (what, question, answer) in enumerate(sample.questions):
                if questions == "visual" and what not in module.VISUAL + module.TRAINING:
                    continue
                if split == "test" and what in module.TRAINING:
                    continue
                counts[split, what] += 1
                prompt = f"<image>\n{question}"
                lines[split].append(
                    {
                        "index": f"{i}-{k}",
                        "image": name,
                        "answer": answer,
                        "category": what,
                        "split": split,
                        "template": sample.template,
                        "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": answer}],
                    }
                )
            if progress:
                progress(i + 1, n)
        write_splits(tmp, lines, conversations, random.Random(f"{seed}:turns"), module.TRAINING)
        provenance = {
            "generator": f"vlstack.synth.{kind}",
            "version": VERSION,
            "vlstack": __version__,
            "seed": seed,
            "n": n,
            "size": size,
            "test_fraction": test_fraction,
            "questions": questions,
            "only": only or [],
            "conversations": conversations,
            "line_width": line_width,
            "decorate": decorate,
            "templates": splits,
            "examples": {s: dict(sorted((w, c) for (t, w), c in counts.items() if t == s)) for s in ("train", "test")},
        }
        (tmp / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return provenance


def check_options(
    kind: str,
    n: int,
    size: int,
    test_fraction: float,
    questions: str,
    only: list[str] | None,
    line_width: float,
    decorate: bool,
) -> None:
    """synthesize's options, each bad one named with its bounds (DataError)."""
    if kind not in KINDS:
        raise DataError(f"unknown kind {kind!r}: choose one of {', '.join(KINDS)}")
    if n < 1 or not 0 <= test_fraction < 1 or not MIN_SIZE <= size <= MAX_SIZE:
        raise DataError(f"--n must be >= 1, --test-fraction in [0, 1), --size in [{MIN_SIZE}, {MAX_SIZE}]")
    need, free = memory_needed(n, size), available_memory()
    if free is not None and need > free:
        raise DataError(
            f"--n {n} --size {size} would take ~{need / 2**30:.1f} GiB of memory, more than the "
            f"{free / 2**30:.1f} GiB available: make fewer or smaller images"
        )
    unknown = set(only or []) - set(subjects(kind))
    if unknown:
        raise DataError(f"--only {', '.join(sorted(unknown))}: {kind} are of the types {', '.join(subjects(kind))}")
    if decorate and kind != "charts":
        raise DataError("--decorate: only charts are decorated")
    if not 2 <= line_width <= 20 or line_width != 2 and kind != "charts":
        raise DataError(f"--line-width {line_width}: charts' lines are 2 to 20 pixels wide (at 224 px; charts only)")
    if questions not in ("all", "visual"):
        raise DataError(f"--questions {questions!r}: choose all or visual")


def write_splits(tmp: Path, lines: dict[str, list[dict]], conversations: bool, rng: random.Random, last: tuple) -> None:
    """train.jsonl (the training lines, grouped into conversations when asked: _training), train-answers.jsonl
    (the training lines in test.jsonl's format, the kinds asked in training only left out), test.jsonl and
    test.tsv (the evaluation's table) into the directory tmp."""
    with open(tmp / "train.jsonl", "w", encoding="utf-8") as f:
        for image, group in _training(lines["train"], conversations, rng, last):
            turns = []
            for i, line in enumerate(group):  # the first asked as the evaluation asks (VQA_PROMPT), answered;
                human, gpt = line["conversations"]  # the instruction stated once: the others just asked
                text = f"{human['value']}\n{VQA_PROMPT}" if i == 0 else human["value"].removeprefix("<image>\n")
                turns += [dict(human, value=text), gpt]
            f.write(json.dumps({"image": image, "conversations": turns}) + "\n")
    with open(tmp / "train-answers.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines["train"] if line["category"] not in last)
    with open(tmp / "test.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines["test"])
    with open(tmp / "test.tsv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["index", "image_path", "question", "answer", "category", "split"])
        for line in lines["test"]:
            question = line["conversations"][0]["value"].removeprefix("<image>\n")
            w.writerow([line["index"], line["image"], question, line["answer"], line["category"], "test"])


def _training(
    lines: list[dict], conversations: bool, rng: random.Random, last: tuple[str, ...]
) -> list[tuple[str, list[dict]]]:
    """The training lines as (image, its questions): one each, or all of an image's in a random order with the
    kinds in `last` (asked in training only) after the others: no evaluated answer can be read off theirs (a
    chart's heights give its highest point and trend) in the conversation above it."""
    if not conversations:
        return [(line["image"], [line]) for line in lines]
    groups: dict[str, list[dict]] = {}
    for line in lines:
        groups.setdefault(line["image"], []).append(line)
    for group in groups.values():
        rng.shuffle(group)
        group.sort(key=lambda line: line["category"] in last)  # (stable: the others stay shuffled)
    return list(groups.items())
