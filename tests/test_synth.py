"""`vlstack synth`: charts and documents whose drawn pixels agree with their computed answers, the same dataset
from the same seed, held-out templates only in the test split, files that the trainer and the evaluator read."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from conftest import run_cli

from vlstack.errors import DataError
from vlstack.eval.benchmarks import VQA_PROMPT, read_items
from vlstack.synth import charts, documents, synthesize
from vlstack.synth.draw import COLOURS
from vlstack.train.data import read_dataset


def colour_mask(img, name: str) -> np.ndarray:
    return (np.asarray(img) == COLOURS[name]).all(-1)  # [H, W]


@pytest.mark.parametrize("template", ["bar-grid", "bar-plain", "bar-thin", "bar-framed"])
def test_bar_answers_agree_with_the_pixels(template):
    """Without noise or a turn: one region per bar, each of its own colour; the tallest (its top highest on the
    page) is the colour and the position the answers name, and there are as many as the count says."""
    for seed in range(5):
        s = charts.chart(random.Random(seed), 224, template, noise=0, turn=0)
        answers = {kind: answer for kind, _, answer in s.questions}
        drawn = [c for c in COLOURS if colour_mask(s.image, c).any()]
        assert sorted(drawn) == sorted(s.table["colours"]) and answers["count"] == str(len(drawn))
        tops = {c: np.nonzero(colour_mask(s.image, c).any(1))[0].min() for c in drawn}
        lefts = {c: np.nonzero(colour_mask(s.image, c).any(0))[0].min() for c in drawn}
        tallest = min(tops, key=tops.get)
        assert answers["colour"] == tallest
        assert answers["position"] == str(sorted(lefts.values()).index(lefts[tallest]) + 1)
        for level, colour in zip(answers["heights"].split(), sorted(drawn, key=lefts.get)):
            tenths = 10 * colour_mask(s.image, colour).any(1).sum() / 180  # the bar's pixels of the 180-pixel axis
            assert int(level) == min(9, int(tenths)) or abs(tenths - round(tenths)) < 0.1  # (a rounded edge)
        assert len(answers["heights"].split()) == len(drawn)


def test_line_and_pie_answers_agree_with_the_pixels():
    for seed in range(5):
        line = charts.chart(random.Random(seed), 224, "line-plain", noise=0, turn=0)
        answers = {kind: answer for kind, _, answer in line.questions}
        mask = colour_mask(line.image, answers["colour"])
        cols = np.nonzero(mask.any(0))[0]
        first, last = (np.nonzero(mask[:, x])[0].mean() for x in (cols.min(), cols.max()))
        assert answers["trend"] == ("higher" if last < first else "lower")  # (up the page is higher)
        pie = charts.chart(random.Random(seed), 224, "pie-legend", noise=0, turn=0)
        answers = {kind: answer for kind, _, answer in pie.questions}
        areas = {c: colour_mask(pie.image, c).sum() for c in pie.table["colours"]}
        assert answers["colour"] == max(areas, key=areas.get) and answers["count"] == str(len(areas))
        assert answers["order"].split() == sorted(areas, key=areas.get, reverse=True)  # (largest first)


def test_a_wide_line_is_the_same_chart_drawn_wider():
    """--line-width draws the same table (same seed) with the line that many pixels wide: its pixels' spread
    across the line, column by column, grows about as the width; the answers are the same."""
    for seed in range(3):
        thin, wide = (
            charts.chart(random.Random(seed), 224, "line-plain", noise=0, turn=0, line_width=w) for w in (2, 8)
        )
        assert thin.questions == wide.questions
        colour = thin.table["colours"][0]
        spread = [
            np.median(colour_mask(s.image, colour).sum(0)[colour_mask(s.image, colour).any(0)]) for s in (thin, wide)
        ]
        assert 3 <= spread[1] / spread[0] <= 5


def test_document_answers_agree_with_the_pixels():
    """A PAID stamp is red ink on the page exactly when the answer says so; a table's header is the colour
    named; an invoice's total is the sum of its items' amounts."""
    stamps = set()
    for seed in range(8):
        receipt = documents.document(random.Random(seed), 224, "receipt-centre", noise=0, turn=0)
        answers = {kind: answer for kind, _, answer in receipt.questions}
        stamps.add(answers["stamp"])
        assert answers["stamp"] == ("Yes" if colour_mask(receipt.image, "red").sum() > 50 else "No")
        table = documents.document(random.Random(seed), 224, "table-plain", noise=0, turn=0)
        answers = {kind: answer for kind, _, answer in table.questions}
        assert colour_mask(table.image, answers["colour"]).sum() > 1000
        invoice = documents.document(random.Random(seed), 224, "invoice-band", noise=0, turn=0)
        answers = {kind: answer for kind, _, answer in invoice.questions}
        assert answers["total"] == f"{sum(q * p for _, q, p in invoice.table['items']):.2f}"
        assert answers["count"] == str(len(invoice.table["items"]))
    assert stamps == {"Yes", "No"}


def test_dataset_is_reproducible_and_holds_out_templates(tmp_path):
    a = synthesize("charts", 12, tmp_path / "a", seed=3, size=224, test_fraction=0.25)
    b = synthesize("charts", 12, tmp_path / "b", seed=3, size=224, test_fraction=0.25)
    synthesize("charts", 12, tmp_path / "c", seed=4, size=224, test_fraction=0.25)
    assert a == b
    for name in ("train.jsonl", "test.jsonl", "test.tsv", "images/00005.png", "images/00011.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a/images/00005.png").read_bytes() != (tmp_path / "c/images/00005.png").read_bytes()
    test = [json.loads(x) for x in (tmp_path / "a/test.jsonl").read_text().splitlines()]
    assert {x["template"] for x in test} <= charts.HELD_OUT and {x["split"] for x in test} == {"test"}
    assert {x["image"] for x in test} == {f"images/{i:05d}.png" for i in range(9, 12)}  # 25% of 12 images
    assert not set(a["templates"]["train"]) & charts.HELD_OUT
    provenance = json.loads((tmp_path / "a/provenance.json").read_text())
    assert provenance["seed"] == 3 and provenance["generator"] == "vlstack.synth.charts"
    assert sum(provenance["examples"]["test"].values()) == len(test)
    train = (tmp_path / "a/train.jsonl").read_text()  # the heights asked in training only
    assert "how high is each" in train.lower() and "heights" not in {x["category"] for x in test}
    assert provenance["examples"]["train"]["heights"] > 0 and "heights" not in provenance["examples"]["test"]
    answered = read_items(tmp_path / "a/train-answers.jsonl")  # training charts' questions, to sample a model on
    assert answered and not {i.template for i in answered} & charts.HELD_OUT
    assert not {i.category for i in answered} & set(charts.TRAINING)
    assert len(answered) == sum(c for k, c in provenance["examples"]["train"].items() if k not in charts.TRAINING)
    assert all(i.answers and i.question and "<image>" not in i.question for i in answered)


def test_the_trainer_and_the_evaluator_read_the_dataset(tmp_path):
    synthesize("documents", 10, tmp_path / "d", seed=0, size=224, questions="visual", only=["form", "receipt"])
    train = read_dataset(tmp_path / "d/train.jsonl")
    assert train and all(len(ex.images) == 1 for ex in train)
    assert all("single word or phrase" in json.dumps(json.loads(x)) for x in open(tmp_path / "d/train.jsonl"))
    jsonl, tsv = read_items(tmp_path / "d/test.jsonl"), read_items(tmp_path / "d/test.tsv")
    assert [(i.index, i.question, i.answers, i.category, i.images) for i in jsonl] == [
        (i.index, i.question, i.answers, i.category, i.images) for i in tsv
    ]
    assert {i.category for i in jsonl} <= set(documents.VISUAL) and jsonl[0].question.endswith("?")
    assert {i.template for i in jsonl} <= documents.HELD_OUT and all(i.template for i in jsonl)  # (scored by it)


def test_conversations_put_an_images_questions_in_one_line(tmp_path):
    """--conversations: a training line per image holding all its questions (the image placeholder once, each
    question with the evaluation's instruction); the same questions and answers as one line each."""
    one = synthesize("charts", 6, tmp_path / "one", seed=1, size=224, test_fraction=0, questions="visual")
    many = synthesize(
        "charts", 6, tmp_path / "many", seed=1, size=224, test_fraction=0, questions="visual", conversations=True
    )
    assert one["examples"] == many["examples"] and many["conversations"]
    singles = [json.loads(x) for x in (tmp_path / "one/train.jsonl").read_text().splitlines()]
    grouped = [json.loads(x) for x in (tmp_path / "many/train.jsonl").read_text().splitlines()]
    assert len(grouped) == 6 and len(singles) == sum(len(g["conversations"]) // 2 for g in grouped)

    def pairs(lines):  # (image, question, answer) of every turn, the instruction taken off
        turns = [
            (x["image"], x["conversations"][k : k + 2]) for x in lines for k in range(0, len(x["conversations"]), 2)
        ]
        return sorted(
            (image, q["value"].removeprefix("<image>\n").removesuffix(f"\n{VQA_PROMPT}"), a["value"])
            for image, (q, a) in turns
        )

    assert pairs(singles) == pairs(grouped)
    for g in grouped:  # the instruction stated once, on the first turn, as the evaluation asks
        asked = [turn["value"] for turn in g["conversations"][::2]]
        assert asked[0].endswith(VQA_PROMPT) and not any(VQA_PROMPT in q for q in asked[1:])
    assert all(json.dumps(g).count("<image>") == 1 for g in grouped)
    examples = read_dataset(tmp_path / "many/train.jsonl")
    assert all(len(ex.images) == 1 for ex in examples)
    samples = [charts.chart(random.Random(0), 96, t) for t in charts.TEMPLATES]
    training = {q for s in samples for kind, q, _ in s.questions if kind in charts.TRAINING}  # (their questions)
    for g in grouped:  # the training-only turns (a chart's heights, a pie's order) after every evaluated one
        asked = [
            q["value"].removeprefix("<image>\n").removesuffix(f"\n{VQA_PROMPT}") in training
            for q in g["conversations"][::2]
        ]
        assert asked == sorted(asked)
    assert sum(any(q in json.dumps(g) for q in training) for g in grouped) >= 2  # (some were asked)


@pytest.mark.slow
def test_decorations_are_drawn_on_training_charts_only(tmp_path):
    """--decorate: strokes that carry no data on the training charts (so their answers stay), the held-out test
    charts drawn as without it, pixel for pixel."""
    plain = synthesize("charts", 10, tmp_path / "plain", seed=3, size=224, questions="visual")
    fancy = synthesize("charts", 10, tmp_path / "fancy", seed=3, size=224, questions="visual", decorate=True)
    assert fancy["decorate"] and not plain["decorate"] and fancy["examples"] == plain["examples"]
    for name in ("train.jsonl", "test.jsonl"):
        assert (tmp_path / "plain" / name).read_text() == (tmp_path / "fancy" / name).read_text()
    train = {x["image"] for x in map(json.loads, (tmp_path / "plain/train.jsonl").read_text().splitlines())}
    test = {x["image"] for x in map(json.loads, (tmp_path / "plain/test.jsonl").read_text().splitlines())}
    same = {i: (tmp_path / "plain" / i).read_bytes() == (tmp_path / "fancy" / i).read_bytes() for i in train | test}
    assert all(same[i] for i in test) and sum(not same[i] for i in train) >= len(train) / 2  # (each at random)
    for name in ("p", "q"):  # the same decorations drawn by another process (no per-process hash in the seed)
        out = run_cli("synth", "charts", "--n", "4", "--size", "96", "--decorate", "--out", str(tmp_path / name))
        assert out.returncode == 0, out.stderr
    assert all(
        (tmp_path / "p/images" / f).read_bytes() == (tmp_path / "q/images" / f).read_bytes()
        for f in ("00000.png", "00001.png", "00002.png")
    )
    with pytest.raises(DataError, match="--decorate: only charts"):
        synthesize("documents", 4, tmp_path / "x", decorate=True)


def test_a_decoration_leaves_the_data_strokes_alone():
    """The decorations are greys: a bar's or a line's own colour covers the same pixels with them as without
    (where a reference line crosses it, a few pixels; nothing else)."""
    for seed in range(6):
        for template in ("bar-grid", "line-plain"):
            a = charts.chart(random.Random(seed), 224, template, noise=0, turn=0)
            b = charts.chart(random.Random(seed), 224, template, noise=0, turn=0, decorate=True)
            assert a.questions == b.questions
            for name in a.table["colours"]:
                before, after = colour_mask(a.image, name), colour_mask(b.image, name)
                assert not (after & ~before).any() and (before & ~after).sum() <= 0.2 * before.sum()


@pytest.mark.slow
def test_bad_requests_are_refused_and_nothing_is_left(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full/keep.txt").write_text("mine")
    with pytest.raises(DataError, match="already exists"):
        synthesize("charts", 4, tmp_path / "full")
    assert (tmp_path / "full/keep.txt").read_text() == "mine"
    with pytest.raises(DataError, match="--only scatter: charts are of the types bar, line, pie"):
        synthesize("charts", 4, tmp_path / "x", only=["scatter"])
    with pytest.raises(DataError, match="--line-width 30.0: charts' lines are 2 to 20 pixels wide"):
        synthesize("charts", 4, tmp_path / "x", line_width=30.0)
    with pytest.raises(DataError, match="--line-width 4.0"):
        synthesize("documents", 4, tmp_path / "x", line_width=4.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # no half-written directory
    out = run_cli("synth", "documents", "--n", "0", "--out", str(tmp_path / "y"))
    assert out.returncode == 2 and "--n must be >= 1" in out.stderr and "Traceback" not in out.stderr
    out = run_cli("synth", "charts", "--n", "3", "--size", "96", "--line-width", "6", "--out", str(tmp_path / "z"))
    assert out.returncode == 0, out.stderr
    assert "training and" in out.stdout and json.loads((tmp_path / "z/provenance.json").read_text())["line_width"] == 6
    out = run_cli("synth", "charts", "--n", "3", "--size", "96", "--decorate", "--out", str(tmp_path / "d"))
    assert out.returncode == 0 and json.loads((tmp_path / "d/provenance.json").read_text())["decorate"]
