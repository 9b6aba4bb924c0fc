"""`vlstack eval report DIR...`: several runs side by side, for the choice between hosting a model and paying
for an API: each run's score, pages per second and cost per 1,000 pages, an API's from its token prices
(`--price-in/--price-out` at eval time), a local run's from the GPU hours it took at `--gpu-price` per hour.
Writes `report.md` and `report.png` into the output directory."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DataError
from ..files import write_files
from .plot import bar_chart
from .runner import markdown

FIELDS = {"benchmark", "model", "n", "score", "seconds", "pages_per_s"}  # what a report reads of a summary


def read_summary(run: str | Path) -> dict:
    path = Path(run) / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{run}: no summary.json (is it the --out of a finished vlstack eval?)") from None
    except (OSError, json.JSONDecodeError):
        summary = None
    if not isinstance(summary, dict) or not FIELDS <= set(summary):
        raise DataError(f"{path}: not a vlstack eval summary")
    return summary


def cost_per_1000(summary: dict, gpu_price: float | None) -> float | None:
    """USD per 1,000 pages: an API's token cost, or a local run's GPU time at gpu_price per hour; None when
    neither is known."""
    if "cost_usd" in summary and summary["n"]:
        return 1000 * summary["cost_usd"] / summary["n"]
    timed = summary.get("timed", summary["n"])
    if summary.get("source", "local") == "local" and gpu_price is not None and timed:
        return 1000 * gpu_price * summary["seconds"] / 3600 / timed
    return None


def report(runs: list[str | Path], out: str | Path, gpu_price: float | None = None) -> str:
    """The comparison of these runs as a Markdown table (also written, with a chart, into out)."""
    if not runs:
        raise DataError("vlstack eval report needs the --out directories of one or more runs")
    summaries = [read_summary(r) for r in runs]
    head = ["run", "benchmark", "model", "where", "n", "score", "pages/s", "USD per 1,000 pages"]
    rows = []
    for run, s in zip(runs, summaries):
        cost = cost_per_1000(s, gpu_price)
        where = "API" if s.get("source", "local") != "local" else f"local ({s.get('device') or '?'})"
        rows.append(
            [
                Path(run).name,
                s["benchmark"],
                s["model"],
                where,
                str(s["n"]),
                f"{s['score']:.1f}",
                f"{s['pages_per_s']:.2f}",
                "-" if cost is None else f"{cost:.3f}",
            ]
        )
    text = markdown([head, ["---"] * 4 + ["---:"] * 4, *rows])
    if gpu_price is not None:
        text += f"\nLocal runs' cost: the GPU time they took at {gpu_price:g} USD per hour.\n"
    out = Path(out)
    bars = [
        (f"{Path(r).name}", s["score"], f"{row[6]} pages/s, ${row[7]}/1k") for r, s, row in zip(runs, summaries, rows)
    ]
    bar_chart("score by run", bars, out / "report.png")
    write_files(out, {"report.md": lambda p: p.write_text(text)})
    return text
