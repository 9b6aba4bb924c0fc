"""bench/probe_lines.py, the line-chart probe behind BENCHMARKS' "why the line's kinds are not learned": its
answers are the drawn table's, and its ridge probe reads what features carry and nothing else."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
from probe_lines import line_charts, ridge_accuracy  # noqa: E402

from vlstack.synth import charts  # noqa: E402


def test_line_charts_answer_from_the_drawn_table():
    pixels, answers = line_charts(6, ["line-plain"], 3, 224)
    assert pixels.shape == (6, 3, 224, 224)
    for i in range(6):
        rng = random.Random(f"3:{i}")
        values = charts.chart(rng, 224, rng.choice(["line-plain"])).table["values"]
        assert answers["count"][i] == len(values) - 4
        assert answers["position"][i] == values.index(max(values))
        assert answers["trend"][i] == (values[-1] > values[0])


def test_ridge_probe_reads_a_carried_label_and_not_noise():
    gen = torch.Generator().manual_seed(0)
    y, y_test = torch.randint(0, 3, (300,), generator=gen), torch.randint(0, 3, (200,), generator=gen)
    noise = torch.randn(500, 8, 16, generator=gen)
    carried = noise.clone()
    carried[:300, 2, :3] += 5 * torch.nn.functional.one_hot(y, 3)  # one token's first channels say the label
    carried[300:, 2, :3] += 5 * torch.nn.functional.one_hot(y_test, 3)
    assert ridge_accuracy(carried[:300], y, carried[300:], y_test, 3) > 0.95
    assert ridge_accuracy(noise[:300], y, noise[300:], y_test, 3) < 0.5  # chance is 1/3
