"""Which styles of chart a model reads: n charts of every template and of every combination of the line
template's attributes (grid, markers, frame: the held-out `line-framed` is grid + frame, no markers), each
visual kind scored as `vlstack eval chartqa` scores it. A kind that a model answers on the training templates
and not on a held-out one points at the attribute that the training charts never showed.

    python bench/chart_styles.py examples/learn/runs/tiny-charts --n 60    # ~1 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import tempfile
from pathlib import Path

import vlstack
from vlstack.eval.runner import evaluate
from vlstack.synth import charts


def styles() -> dict[str, dict]:
    """The templates (training and held-out), then each combination of the line's attributes that no template
    draws, named line_ and its attributes: name -> style."""
    out = dict(charts.TEMPLATES)
    for flags in itertools.product((False, True), repeat=3):
        style = dict(chart="line", grid=flags[0], markers=flags[1], frame=flags[2])
        drawn = ({"frame": False, **t} for t in out.values() if t["chart"] == "line")
        if style not in drawn:
            out["_".join(["line", *(a for a, on in zip(("grid", "markers", "frame"), flags) if on)])] = style
    return out


def draw(root: Path, n: int, seed: int, size: int) -> Path:
    """n charts of each style under root, their visual questions as vlstack's eval JSONL: the file."""
    (root / "images").mkdir(parents=True)
    rows = []
    for name, style in styles().items():
        charts.TEMPLATES.setdefault(name, style)  # (the line combinations drawn as templates of their own)
        for i in range(n):
            sample = charts.chart(random.Random(f"{seed}:{name}:{i}"), size, name)
            image = f"images/{name}-{i}.png"
            sample.image.save(root / image)
            for kind, question, answer in sample.questions:
                if kind in charts.VISUAL:
                    turn = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]
                    rows.append(dict(index=f"{name}-{i}-{kind}", image=image, answer=answer, category=kind,
                                     template=name, conversations=turn))  # fmt: skip
    data = root / "styles.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a checkpoint directory (or tiny)")
    ap.add_argument("--n", type=int, default=60, help="charts per style")
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None, help="the scores as JSON")
    args = ap.parse_args()
    vlm = vlstack.load(args.model, device=args.device)
    with tempfile.TemporaryDirectory() as tmp:
        data = draw(Path(tmp), args.n, args.seed, args.size)
        summary = evaluate(vlm, "chartqa", data, Path(tmp) / "eval", batch=64, max_new_tokens=8, progress=False)
    scores = summary["templates"]  # {style: {kind: score}}
    kinds = list(charts.VISUAL)
    print(f"{args.model}: {args.n} charts per style; held out: {', '.join(sorted(charts.HELD_OUT))}")
    print(f"| style | {' | '.join(kinds)} |\n|---|{'---:|' * len(kinds)}")
    for name in styles():
        cells = [f"{scores[name][k]:.0f}" if k in scores[name] else "" for k in kinds]
        print(f"| {name}{' (held out)' if name in charts.HELD_OUT else ''} | {' | '.join(cells)} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"model": args.model, "n": args.n, "scores": scores}, indent=2) + "\n")


if __name__ == "__main__":
    main()
