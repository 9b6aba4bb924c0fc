"""`vlstack eval`: a benchmark's items through a local model (the serving engine, batched, an adapter for all
rows), each prediction scored by the benchmark's official rule (metrics.py), written as it comes.

`<out>/predictions.jsonl` gets a line per item (index, question, answers, prediction, score) as each batch
ends, so a run that stops keeps what it scored and a rerun with the same --out goes on from there;
`<out>/summary.json` (benchmark, model, n, score 0-100, per-category scores (MMMU: per subject and per
discipline, instance-weighted; synthetic data: per template and category too), tokens, seconds, pages per
second, where it ran, and cost_usd at given prices), `summary.md` (the same as Markdown tables) and
`summary.png` (the scores as bars) are written at the end, from every line of the file.
"""

from __future__ import annotations

import json
import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError, ImageError
from ..files import sha256_file, write_files
from ..image import load_image
from .benchmarks import Item, content, read_items
from .metrics import anls, choice_correct, exact, open_correct, parse_choice, parse_open, relaxed
from .plot import bar_chart

BENCHMARKS = {"mmmu": "mmmu", "docvqa": "anls", "chartqa": "relaxed", "vqa": None}  # benchmark -> its metric
METRICS = ("exact", "anls", "relaxed", "choice", "mmmu")

# MMMU's six disciplines and their 30 subjects (its category column), as the official summary groups them
DISCIPLINES = {
    "Art and Design": ["Art", "Art_Theory", "Design", "Music"],
    "Business": ["Accounting", "Economics", "Finance", "Manage", "Marketing"],
    "Science": ["Biology", "Chemistry", "Geography", "Math", "Physics"],
    "Health and Medicine": [
        "Basic_Medical_Science",
        "Clinical_Medicine",
        "Diagnostics_and_Laboratory_Medicine",
        "Pharmacy",
        "Public_Health",
    ],
    "Humanities and Social Science": ["History", "Literature", "Sociology", "Psychology"],
    "Tech and Engineering": [
        "Agriculture",
        "Architecture_and_Engineering",
        "Computer_Science",
        "Electronics",
        "Energy_and_Power",
        "Materials",
        "Mechanical_Engineering",
    ],
}
_DISCIPLINE_OF = {s.lower(): d for d, subjects in DISCIPLINES.items() for s in subjects}


def metric_of(bench: str, metric: str | None) -> str:
    if bench not in BENCHMARKS:
        raise DataError(f"unknown benchmark {bench!r}; choose one of {', '.join(BENCHMARKS)}")
    chosen = metric or BENCHMARKS[bench] or "exact"
    if chosen not in METRICS:
        raise DataError(f"unknown metric {chosen!r}; choose one of {', '.join(METRICS)}")
    return chosen


def score(metric: str, item: Item, prediction: str, rng: random.Random) -> tuple[float, Any]:
    """One item's score in [0, 1] and what the rule read from the prediction (recorded beside the score, so that
    every item can be audited): multiple choice by MMMU's parser (under "mmmu" and "choice"; read: the option
    letter, or the fallback's draw), MMMU's open questions by its open parser (read: the normalised answers, sorted
    as text), the rest by ANLS, relaxed accuracy or exact match (read: None, the prediction itself)."""
    if item.options and metric in ("mmmu", "choice"):
        letter = parse_choice(prediction, item.options, rng)
        return float(choice_correct(item.answers, letter)), letter
    if metric == "mmmu":
        parsed = parse_open(prediction)
        return float(open_correct(item.answers, parsed)), sorted(parsed, key=str)
    return {"anls": anls, "relaxed": relaxed}.get(metric, exact)(item.answers, prediction), None


@dataclass
class BestOf:
    """Best-of-N: n answers sampled per item at temperature (the k-th with seed k: the same answers again), the one
    score(item, answers) rates highest kept; critic names what scores (recorded in the summary)."""

    n: int
    score: Callable[[Item, list[str]], list[float]]
    critic: str
    temperature: float = 1.0


def evaluate(
    vlm: Any,
    bench: str,
    data: str | Path,
    out: str | Path,
    adapter: str | None = None,
    metric: str | None = None,
    limit: int | None = None,
    batch: int = 16,
    max_new_tokens: int = 64,
    progress: bool = True,
    name: str | None = None,
    prices: tuple[float, float] | None = None,
    skip_bad_images: bool = False,
    best_of: BestOf | None = None,
) -> dict:
    """Score vlm (with adapter) on the benchmark file; writes and returns the summary (its model: name, else
    the checkpoint directory's, + the adapter's). prices: USD per million prompt and completion tokens (an API's
    list prices): the summary then holds cost_usd, for every item scored. vlm: a local model, or an Endpoint
    (eval/remote.py): the summary says which (source) for `vlstack eval report`. An item whose image does not
    decode stops the run, named; with skip_bad_images it is scored as failed (its error recorded) instead.
    best_of: each item's answer the best of N samples by a critic; usage counts every sample."""
    metric = metric_of(bench, metric)
    items = read_items(data)[:limit]
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file: give a directory for the run's predictions and summary")
    identity = run_identity(vlm, bench, metric, data, adapter)
    if best_of is not None:
        identity["best_of"] = {"n": best_of.n, "critic": best_of.critic, "temperature": best_of.temperature}
    check_resume(out, identity)
    write_files(out, {"run.json": lambda p: p.write_text(json.dumps(identity, indent=2))})
    done = _done(out / "predictions.jsonl")
    todo = [i for i in items if i.index not in done]
    rng = random.Random(42)  # MMMU's fallback, seeded once per run (items in file order)
    start = time.perf_counter()
    for a in range(0, len(todo), batch):
        part = todo[a : a + batch]
        part, answers, usage = _answer(vlm, part, adapter, max_new_tokens, skip_bad_images, best_of)
        _record(out / "predictions.jsonl", done, metric, part, answers, usage, rng)
        if progress:
            _progress(
                bench,
                len(done),
                len(items),
                [r["score"] for r in done.values()],
                time.perf_counter() - start,
                a + len(part),
            )
    seconds = time.perf_counter() - start
    rows = [done[i.index] for i in items if i.index in done]
    summary = _summary(vlm, bench, metric, rows, name, adapter, seconds, len(todo))
    if best_of is not None:
        extra = sum(r.get("extra_tokens", 0) for r in rows)
        summary["best_of"] = {**identity["best_of"], "extra_completion_tokens": extra}
    if prices is not None:
        summary["cost_usd"] = (summary["prompt_tokens"] * prices[0] + summary["completion_tokens"] * prices[1]) / 1e6
    bars = [(c, v, "") for c, v in {**summary.get("disciplines", {}), **summary["categories"]}.items()]
    title = f"{bench} ({metric}), {summary['model']}: {summary['score']:.1f} over {len(rows)} items"
    bar_chart(title, [("all", summary["score"], f"n={len(rows)}"), *bars], out / "summary.png")
    write_files(
        out,
        {
            "summary.json": lambda p: p.write_text(json.dumps(summary, indent=2)),
            "summary.md": lambda p: p.write_text(table(summary)),
        },
    )
    return summary


def _record(path: Path, done: dict, metric: str, items: list, answers: list, usage: list, rng: random.Random) -> None:
    """A batch's items scored, appended to predictions.jsonl and to done (index -> row)."""
    with path.open("a") as f:
        for item, answer, use in zip(items, answers, usage):
            value, parsed = score(metric, item, answer, rng)
            row = {
                "index": item.index,
                "question": item.question,
                "answers": item.answers,
                "prediction": answer,
                "score": value,
                **({"parsed": parsed} if parsed is not None else {}),
                "category": item.category,
                **({"template": item.template} if item.template else {}),
                "prompt_tokens": use["prompt_tokens"],
                "completion_tokens": use["completion_tokens"],
                **(
                    {k: use[k] for k in ("best_of_samples", "best_of_scores", "extra_tokens")}
                    if "best_of_scores" in use
                    else {}
                ),
                **({"error": use["error"], "score": 0.0} if "error" in use else {}),
            }
            f.write(json.dumps(row) + "\n")
            done[item.index] = row


def _summary(
    vlm: Any,
    bench: str,
    metric: str,
    rows: list[dict],
    name: str | None,
    adapter: str | None,
    seconds: float,
    timed: int,
) -> dict:
    """The run's summary over its scored rows: the score, its breakdown, tokens, speed and where it ran."""
    summary = {
        "benchmark": bench,
        "metric": metric,
        "model": (name or vlm.name) + (f"+{adapter}" if adapter else ""),
        "n": len(rows),
        "score": 100 * sum(r["score"] for r in rows) / max(len(rows), 1),
        **breakdown(rows, bench),
        "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
        "completion_tokens": sum(r["completion_tokens"] for r in rows),
        "seconds": seconds,
        "pages_per_s": timed / seconds if seconds > 0 else 0.0,
        "timed": timed,  # the items of this run's seconds (a resumed run times only what it scored)
        "source": "local" if hasattr(vlm, "model") else vlm.url,
        "device": str(vlm.model.device) if hasattr(vlm, "model") else None,
    }
    return summary


def _answer(
    vlm: Any,
    part: list[Item],
    adapter: str | None,
    max_new_tokens: int,
    skip_bad_images: bool,
    best_of: BestOf | None = None,
) -> tuple[list[Item], list[str], list[dict]]:
    """The items (reordered: those whose images do not decode last), their answers and usage, generated together.
    An image that does not decode: an error naming its item, or with skip_bad_images, an empty answer and the
    error in its usage."""
    try:
        return (part, *_generate(vlm, part, adapter, max_new_tokens, best_of))
    except ImageError:
        broken = {i.index: why for i in part if (why := _undecodable(i))}
        if not broken:
            raise
        if not skip_bad_images:
            index, why = next(iter(broken.items()))
            raise DataError(
                f"item {index}: {why} (--skip-bad-images scores such items as failed and goes on)"
            ) from None
    good = [i for i in part if i.index not in broken]
    answers, usage = _generate(vlm, good, adapter, max_new_tokens, best_of) if good else ([], [])
    failed = [i for i in part if i.index in broken]
    usage += [{"prompt_tokens": 0, "completion_tokens": 0, "error": broken[i.index]} for i in failed]
    return good + failed, answers + [""] * len(failed), usage


def _generate(
    vlm: Any, part: list[Item], adapter: str | None, max_new_tokens: int, best_of: BestOf | None = None
) -> tuple[list[str], list[dict]]:
    """The items' answers and usage, generated together (best_of: N samples each, the critic's best kept)."""
    conversations = [[{"role": "user", "content": content(i)}] for i in part]
    adapters = [adapter] * len(part)
    if best_of is None:
        usage: list[dict] = []
        answers = vlm.generate(conversations, adapters=adapters, max_new_tokens=max_new_tokens, usage=usage)
        return answers, usage
    samples, uses = [], []  # [N][items]
    for k in range(best_of.n):
        uses.append([])
        kw = {"temperature": best_of.temperature, "seed": k, "usage": uses[-1]}
        samples.append(vlm.generate(conversations, adapters=adapters, max_new_tokens=max_new_tokens, **kw))
    answers, usage = [], []
    for j, item in enumerate(part):
        drawn = [samples[k][j] for k in range(best_of.n)]
        scores = best_of.score(item, drawn)
        pick = max(range(best_of.n), key=lambda k: scores[k])  # (ties: the first)
        completion = [uses[k][j]["completion_tokens"] for k in range(best_of.n)]
        answers.append(drawn[pick])
        usage.append(
            {
                "prompt_tokens": sum(uses[k][j]["prompt_tokens"] for k in range(best_of.n)),
                "completion_tokens": sum(completion),
                "best_of_samples": drawn,
                "best_of_scores": scores,
                "extra_tokens": sum(completion) - completion[pick],
            }
        )
    return answers, usage


def _undecodable(item: Item) -> str | None:
    """Why one of the item's images does not decode, or None."""
    for k, data in enumerate(item.images, 1):
        try:
            load_image(data)
        except ImageError as e:
            return f"image {k} does not decode ({e})"
    return None


def run_identity(vlm: Any, bench: str, metric: str, data: str | Path, adapter: str | None) -> dict:
    """What a run's predictions are of: the benchmark and metric, the model (a local checkpoint's directory, or an
    endpoint's URL and model), the adapter (its weights' sha256) and the data (its sha256). A rerun into the same
    --out continues only the same run."""
    local = hasattr(vlm, "model")
    model = str(Path(vlm.directory).resolve()) if local and vlm.directory else f"{getattr(vlm, 'url', '')} {vlm.name}"
    hashes = getattr(vlm, "adapter_hashes", {})
    return {
        "benchmark": bench,
        "metric": metric,
        "model": model,
        "adapter": None if adapter is None else {"name": adapter, "sha256": hashes.get(adapter)},
        "data": {"path": str(Path(data).resolve()), "sha256": sha256_file(data)},
    }


def check_resume(out: Path, identity: dict) -> None:
    """Predictions already in out are resumed only by the run that made them (run.json says which)."""
    if not (out / "predictions.jsonl").is_file() or not (out / "predictions.jsonl").stat().st_size:
        return
    try:
        theirs = json.loads((out / "run.json").read_text())
    except (OSError, ValueError):
        theirs = None
    if theirs != identity:
        differ = [k for k in identity if not isinstance(theirs, dict) or theirs.get(k) != identity[k]]
        why = f"its {', '.join(differ)} differ" if theirs is not None else "it records no run.json"
        raise DataError(f"--out {out} holds the predictions of another run ({why}): give this run its own --out")


def breakdown(rows: list[dict], bench: str) -> dict:
    """Scores 0-100 by category (each the mean over its items); for MMMU also by discipline, instance-weighted
    (each the mean over all its subjects' items, not the mean of the subjects' means); where the items name the
    template that drew them (synthetic data), also by template and category: {template: {category: score}}."""
    groups: dict[str, dict[str, list[float]]] = {"categories": defaultdict(list), "disciplines": defaultdict(list)}
    by_template: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        groups["categories"][r["category"] or "all"].append(r["score"])
        if bench == "mmmu" and r["category"]:
            subject = r["category"].replace(" ", "_").lower()
            groups["disciplines"][_DISCIPLINE_OF.get(subject, "Other")].append(r["score"])
        if r.get("template"):
            by_template[r["template"]][r["category"] or "all"].append(r["score"])
    out = {name: _means(g) for name, g in groups.items() if g}
    out.setdefault("categories", {})
    if by_template:
        out["templates"] = {t: _means(g) for t, g in sorted(by_template.items())}
    return out


def _means(groups: dict[str, list[float]]) -> dict[str, float]:
    return {k: 100 * sum(s) / len(s) for k, s in sorted(groups.items())}


def _progress(bench: str, done: int, total: int, scores: list[float], seconds: float, timed: int) -> None:
    """A progress bar on one line: items done, the running score, pages per second."""
    width = 30
    filled = width * done // max(total, 1)
    rate = timed / seconds if seconds > 0 else 0.0
    score = 100 * sum(scores) / max(len(scores), 1)
    end = "\n" if done == total else ""
    print(
        f"\r{bench} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} score {score:.1f} {rate:.2f} pages/s",
        end=end,
        flush=True,
    )


def table(summary: dict) -> str:
    """The summary as a Markdown table: the score, then each category's."""
    s, has_cost = summary, "cost_usd" in summary
    head = ["", "model", "n", "score", "pages/s"] + (["cost (USD)"] if has_cost else [])
    first = ["all", s["model"], str(s["n"]), f"{s['score']:.1f}", f"{s['pages_per_s']:.2f}"]
    rows = [first + ([f"{s['cost_usd']:.4f}"] if has_cost else [])]
    parts = {**s.get("disciplines", {}), **s["categories"]}
    rows += [[c, "", "", f"{v:.1f}", ""] + ([""] if has_cost else []) for c, v in parts.items()]
    text = f"{s['benchmark']} ({s['metric']})\n\n" + markdown([head, ["---"] + ["---:"] * (len(head) - 1), *rows])
    if s.get("templates"):  # categories down, templates across; blank where a template has no such item
        names = list(s["templates"])
        cells = [["category", *names], ["---"] + ["---:"] * len(names)]
        for c in sorted({c for t in s["templates"].values() for c in t}):
            cells.append([c, *(f"{s['templates'][t][c]:.1f}" if c in s["templates"][t] else "" for t in names)])
        text += "\nBy template:\n\n" + markdown(cells)
    return text


def markdown(lines: list[list[str]]) -> str:
    """Rows of cells (the header and the alignment row first) as Markdown table lines."""
    return "".join("| " + " | ".join(r) + " |\n" for r in lines)


def _done(path: Path) -> dict[str, dict]:
    """The items a run already scored (a rerun goes on from them); a cut-off last line is dropped."""
    done = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[row["index"]] = row
    return done
