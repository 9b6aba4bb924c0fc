"""Post-training's effect kind by kind: eval runs' predictions.jsonl side by side (each question's kind and chart
type), and for a Best-of-N run what its samples held: the share of questions some sample answered right (pass@N,
the most any critic could pick) and a majority vote over them (no critic), beside the critic's pick.

    python bench/post_training.py greedy=examples/learn/runs/eval-charts \\
        best-of-8=examples/learn/runs/eval-best-of-8 [NAME=DIR ...]

Scores are ChartQA's relaxed accuracy (eval/metrics.py), in percent; one Markdown table out.
"""

from __future__ import annotations

import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

from vlstack.eval.metrics import relaxed


def rows_of(directory: str) -> list[dict]:
    path = Path(directory) / "predictions.jsonl"
    if not path.is_file():
        sys.exit(f"{path}: not found (an eval run's --out directory, or one of its adapters' run directories)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def columns(name: str, rows: list[dict]) -> dict[str, dict[str, float]]:
    """Each column's score per group (kind on chart type): the run's own, and from a Best-of-N run's samples
    pass@N and the majority vote."""
    out: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        chart = (r.get("template") or "all").split("-")[0]
        for group in (f"{r['category']} ({chart})", "all"):
            out[name][group].append(r["score"])
            samples = r.get("best_of_samples")
            if samples:
                right = [relaxed(r["answers"], s.strip()) for s in samples]
                vote = Counter(s.strip() for s in samples).most_common(1)[0][0]  # (ties: the first drawn)
                out[f"{name}: pass@{len(samples)}"][group].append(max(right))
                out[f"{name}: majority"][group].append(relaxed(r["answers"], vote))
    return {c: {g: 100 * sum(v) / len(v) for g, v in groups.items()} for c, groups in out.items()}


def main(argv: list[str]) -> None:
    runs = [arg.partition("=") for arg in argv]
    if not runs or any(not sep for _, sep, _ in runs):
        sys.exit(__doc__)
    table: dict[str, dict[str, float]] = {}
    counts: Counter = Counter()
    for name, _, directory in runs:
        rows = rows_of(directory)
        table.update(columns(name, rows))
        counts = counts or Counter(f"{r['category']} ({(r.get('template') or 'all').split('-')[0]})" for r in rows)
    groups = sorted(counts) + ["all"]
    names = list(table)
    print("| kind (chart) | questions | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for g in groups:
        n = sum(counts.values()) if g == "all" else counts[g]
        cells = [f"{table[c][g]:.1f}" if g in table[c] else "" for c in names]
        label = f"**{g}**" if g == "all" else g
        print(f"| {label} | {n} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
