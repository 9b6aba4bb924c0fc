"""What a model's image features know about line charts: linear probes (ridge regression) on the features the LLM
receives (after the projector) and on the vision tower's, fitted on line charts of the training templates and
scored on the held-out template's, for the questions the trained model fails (how many points, which is the
highest, the trend). A probe that reads a kind well where the model answers at chance says the features carry
it and the LLM has not learned to read it.

    python bench/probe_lines.py tiny examples/learn/runs/tiny-charts    # ~90 s for both on 2 CPU cores
"""

from __future__ import annotations

import argparse
import random

import numpy as np
import torch

import vlstack
from vlstack.image import normalise
from vlstack.synth import charts

KINDS = {"count": 4, "position": 7, "trend": 2}  # classes of each probed kind


def line_charts(n: int, templates: list[str], seed: int, size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """n line charts -> pixel values [n, 3, size, size] and each kind's answer [n] as a class index."""
    pixels, answers = [], {k: [] for k in KINDS}
    for i in range(n):
        rng = random.Random(f"{seed}:{i}")
        values = (sample := charts.chart(rng, size, rng.choice(templates))).table["values"]
        pixels.append(np.asarray(sample.image))
        answers["count"].append(len(values) - 4)  # 4-7 points
        answers["position"].append(values.index(max(values)))
        answers["trend"].append(int(values[-1] > values[0]))
    return normalise(np.stack(pixels)), {k: torch.tensor(v) for k, v in answers.items()}


def ridge_accuracy(train: torch.Tensor, y: torch.Tensor, test: torch.Tensor, y_test: torch.Tensor, k: int) -> float:
    """Features [n, ...] standardised, one-hot ridge regression (in its dual form: n << features), argmax."""
    train, test = train.flatten(1).double(), test.flatten(1).double()
    mean, std = train.mean(0), train.std(0) + 1e-6
    train, test = (train - mean) / std, (test - mean) / std
    targets = torch.nn.functional.one_hot(y, k).double()  # [n, k]
    gram = train @ train.T  # [n, n]
    weights = torch.linalg.solve(gram + train.shape[1] * torch.eye(len(gram), dtype=gram.dtype), targets)
    return ((test @ train.T @ weights).argmax(1) == y_test).double().mean().item()


@torch.no_grad()
def features(model: torch.nn.Module, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    vit = torch.cat([model.vision_tower(p, model.cfg.vision_feature_layer) for p in pixels.split(100)])  # [n, P, C]
    llm = torch.cat([model.image_features(p) for p in pixels.split(100)])  # [n, tokens, LLM width]
    return {"vision tower": vit, "projector (the LLM's input)": llm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="checkpoint directories, or tiny (the random weights)")
    parser.add_argument("--n", type=int, default=1500, help="training charts (the test: 400 of the held-out one)")
    args = parser.parse_args()
    train_templates = [t for t, s in charts.TEMPLATES.items() if s["chart"] == "line" and t not in charts.HELD_OUT]
    test_templates = [t for t, s in charts.TEMPLATES.items() if s["chart"] == "line" and t in charts.HELD_OUT]
    charts_of_size: dict[int, tuple] = {}  # image size -> the train and test charts, drawn once for all models
    print("| model | features | " + " | ".join(KINDS) + " |\n|---|---|" + "---:|" * len(KINDS))
    for name in args.models:
        model = vlstack.load(name).model.eval()
        size = model.cfg.vision.image_size
        if size not in charts_of_size:
            fit, held_out = line_charts(args.n, train_templates, 1, size), line_charts(400, test_templates, 2, size)
            charts_of_size[size] = fit, held_out
        (pixels, answers), (test_pixels, test_answers) = charts_of_size[size]
        for (where, train), test in zip(features(model, pixels).items(), features(model, test_pixels).values()):
            scores = [100 * ridge_accuracy(train, answers[k], test, test_answers[k], c) for k, c in KINDS.items()]
            print(f"| {name} | {where} | " + " | ".join(f"{s:.0f}" for s in scores) + " |", flush=True)


if __name__ == "__main__":
    main()
