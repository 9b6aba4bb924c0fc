"""Benchmark files (vlstack.eval.benchmarks): VLMEvalKit TSVs and vlstack JSONL read into items, their
prompts as InternVL's VLMEvalKit integration builds them, and a clear error for each kind of bad file."""

from __future__ import annotations

import base64
import csv
import io
import json

import pytest
from conftest import image
from PIL import Image

from vlstack.errors import DataError
from vlstack.eval.benchmarks import CHOICE_PROMPT, VQA_PROMPT, content, read_items


def png(seed: int) -> bytes:
    buf = io.BytesIO()
    image(20, 10, seed=seed).save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def write_tsv(path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        w.writeheader()
        w.writerows(rows)


def test_a_vlmevalkit_tsv_reads_into_items_and_prompts(tmp_path):
    one, two = png(1), png(2)
    (tmp_path / "page.png").write_bytes(two)
    rows = [
        {
            "index": "0",
            "image": b64(one),
            "question": "Which colour is the bar?",
            "answer": "B",
            "A": "red",
            "B": "blue",
            "C": "",
            "hint": "A bar chart.",
            "category": "Art",
            "split": "dev",
        },
        {
            "index": "1",
            "image": json.dumps([b64(one), b64(two)]),
            "question": "Compare <image 2> with <image 1>.",
            "answer": "B",
            "A": "same",
            "B": "different",
            "C": "nan",
            "hint": "nan",
            "category": "Art",
            "split": "dev",
        },
        {
            "index": "2",
            "image": b64(two),
            "question": "What is the total?",
            "answer": "['12', '12.0']",
            "A": "",
            "B": "",
            "C": "",
            "hint": "",
            "category": "",
            "split": "test",
        },
    ]
    write_tsv(tmp_path / "bench.tsv", rows)
    items = read_items(tmp_path / "bench.tsv")
    assert [i.index for i in items] == ["0", "1", "2"] and items[0].images == [one] and items[1].images == [one, two]
    assert items[0].options == {"A": "red", "B": "blue"} and items[2].options == {}  # "" and "nan": no option
    assert items[2].answers == ["12", "12.0"] and items[0].answers == ["B"]  # DocVQA's list of gold answers
    parts = content(items[0])
    assert parts[0]["type"] == "image_url" and base64.b64decode(parts[0]["image_url"]["url"].split(",")[1]) == one
    assert parts[1]["text"] == f"Hint: A bar chart.\nWhich colour is the bar?\nA. red\nB. blue\n{CHOICE_PROMPT}"
    parts = content(items[1])  # MMMU: each image where its placeholder stands
    assert [p["type"] for p in parts] == ["text", "image_url", "text", "image_url", "text"]
    assert parts[0]["text"] == "Compare " and parts[2]["text"] == " with " and parts[4]["text"].startswith(".\nA. same")
    assert base64.b64decode(parts[1]["image_url"]["url"].split(",")[1]) == two
    assert content(items[2])[1]["text"] == f"What is the total?\n{VQA_PROMPT}"  # an open question
    write_tsv(tmp_path / "paths.tsv", [{**r, "image": "", "image_path": "page.png"} for r in rows[:1]])
    assert read_items(tmp_path / "paths.tsv")[0].images == [two]  # image_path, relative to the file


def test_vlstack_jsonl_reads_into_items(tmp_path):
    (tmp_path / "c.png").write_bytes(png(3))
    turns = [{"from": "human", "value": "<image>\nHow many bars?"}, {"from": "gpt", "value": "7"}]
    line = {"image": "c.png", "answer": ["7", "seven"], "category": "charts", "conversations": turns}
    (tmp_path / "b.jsonl").write_text(json.dumps(line) + "\n\n")
    (item,) = read_items(tmp_path / "b.jsonl")
    assert (item.question, item.answers, item.category) == ("How many bars?", ["7", "seven"], "charts")
    assert item.images == [png(3)]


@pytest.mark.parametrize(
    "rows, match",
    [
        ([{"index": "0", "image": "", "question": "q"}], "missing column.*answer"),
        ([{"index": "0", "question": "q", "answer": "a"}], r"image \(or image_path\)"),
        ([{"index": "0", "image": "%%%", "question": "q", "answer": "a"}], r":2: image 1 is not valid base64"),
        ([{"index": "0", "image": b64(b"hello"), "question": "q", "answer": "a"}], "an image does not decode"),
        ([{"index": "0", "image_path": "nope.png", "question": "q", "answer": "a"}], "image file not found"),
    ],
)
def test_bad_benchmark_files_are_clear_errors(tmp_path, rows, match):
    write_tsv(tmp_path / "bad.tsv", rows)
    with pytest.raises(DataError, match=match):
        read_items(tmp_path / "bad.tsv")


def test_bad_jsonl_and_placeholders_are_clear_errors(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"conversations": []}\n')
    with pytest.raises(DataError, match=r"b.jsonl:1: not a benchmark line"):
        read_items(tmp_path / "b.jsonl")
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(DataError, match=r"must be a VLMEvalKit \.tsv or a vlstack \.jsonl"):
        read_items(tmp_path / "x.csv")
    write_tsv(tmp_path / "m.tsv", [{"index": "9", "image": b64(png(1)), "question": "See <image 2>.", "answer": "a"}])
    with pytest.raises(DataError, match=r"item 9: <image 2> but the item has 1 image"):
        content(read_items(tmp_path / "m.tsv")[0])


def test_vlstack_eval_scores_the_tiny_model_end_to_end_and_resumes(tmp_path, capsys):
    """`vlstack eval` on the tiny model: summary.json and predictions.jsonl, each score the official rule
    applied to the prediction; a run cut short (--limit) goes on from its predictions when run again."""
    import random

    from vlstack.cli import main
    from vlstack.eval.benchmarks import read_items
    from vlstack.eval.runner import score

    rows = [
        {
            "index": str(i),
            "image": b64(png(i)),
            "question": f"Question {i}?",
            "answer": "B" if i % 2 else "7",
            "A": "red" if i % 2 else "",
            "B": "blue" if i % 2 else "",
            "category": "odd" if i % 2 else "even",
        }
        for i in range(5)
    ]
    write_tsv(tmp_path / "b.tsv", rows)
    out = tmp_path / "run"
    common = ["eval", "mmmu", "--data", str(tmp_path / "b.tsv"), "--out", str(out), "--max-new-tokens", "4"]
    assert main([*common, "--limit", "2", "--batch", "2"]) == 0
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 2
    assert main([*common, "--batch", "2"]) == 0  # resumes: the 3 others only
    bar = capsys.readouterr().out  # the progress bar: 2 done before, 2 more, then the last
    assert "\rmmmu [" + "#" * 24 + "." * 6 + "] 4/5 score" in bar and "\rmmmu [" + "#" * 30 + "] 5/5 score" in bar
    lines = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [x["index"] for x in lines] == ["0", "1", "2", "3", "4"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["benchmark"] == "mmmu" and summary["n"] == 5 and summary["model"] == "tiny"
    assert set(summary["categories"]) == {"odd", "even"} and summary["completion_tokens"] > 0
    assert summary["score"] == pytest.approx(100 * sum(x["score"] for x in lines) / 5)
    items = {i.index: i for i in read_items(tmp_path / "b.tsv")}
    for x in lines:  # open questions by the open parser; the others' letters may come from the seeded fallback
        if not items[x["index"]].options:
            want, parsed = score("mmmu", items[x["index"]], x["prediction"], random.Random(0))
            assert x["score"] == want and x["parsed"] == parsed
        else:  # the letter read, or the fallback's draw, recorded beside its score
            assert x["parsed"] in ("A", "B") and x["score"] == float(x["parsed"] == "B")
    assert Image.open(out / "summary.png").size[1] > 48 + 26 * 3  # a bar for all, odd and even
    assert main(["eval", "mmmu", "--data", str(tmp_path / "nope.tsv")]) == 2
    assert main(["eval", "mmmu", "--data", str(tmp_path / "b.tsv"), "--batch", "0"]) == 2


def test_mmmu_disciplines_are_instance_weighted():
    """Business = Accounting's 3 items and Economics' 1 together (75), not the mean of the two subjects' means
    (83.3); subjects named with spaces or underscores alike; an unknown subject under Other."""
    from vlstack.eval.runner import breakdown

    rows = [
        {"category": c, "score": x}
        for c, x in [
            ("Accounting", 1),
            ("Accounting", 1),
            ("Accounting", 0),
            ("Economics", 1),
            ("Art Theory", 0),
            ("Art_Theory", 1),
            ("Astrology", 1),
        ]
    ]
    out = breakdown(rows, "mmmu")
    assert out["disciplines"] == {"Art and Design": 50.0, "Business": 75.0, "Other": 100.0}
    assert out["categories"]["Accounting"] == pytest.approx(200 / 3) and out["categories"]["Economics"] == 100.0
    assert "disciplines" not in breakdown(rows, "chartqa")


def test_synthetic_items_are_scored_by_template_too(tmp_path):
    """A JSONL whose lines name their template (vlstack synth's): predictions keep it, and the summary scores
    each template's categories (the chart example's bar / line / pie table), in summary.json and summary.md."""
    from vlstack.eval.benchmarks import read_items
    from vlstack.eval.runner import breakdown, table

    (tmp_path / "a.png").write_bytes(png(0))
    lines = [
        {
            "index": str(i),
            "image": "a.png",
            "answer": "1",
            "category": c,
            "template": t,
            "conversations": [{"from": "human", "value": "<image>\nHow many?"}],
        }
        for i, (t, c) in enumerate([("bar-x", "count"), ("bar-x", "count"), ("line-y", "trend")])
    ]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert [i.template for i in read_items(tmp_path / "t.jsonl")] == ["bar-x", "bar-x", "line-y"]
    rows = [
        {"category": c, "template": t, "score": x}
        for t, c, x in [("bar-x", "count", 1), ("bar-x", "count", 0), ("line-y", "trend", 1), ("line-y", "count", 1)]
    ]
    out = breakdown(rows, "chartqa")
    assert out["categories"] == {"count": pytest.approx(200 / 3), "trend": 100.0}
    assert out["templates"] == {"bar-x": {"count": 50.0}, "line-y": {"count": 100.0, "trend": 100.0}}
    assert "templates" not in breakdown([{"category": "count", "score": 1}], "chartqa")
    summary = {
        "benchmark": "chartqa",
        "metric": "relaxed",
        "model": "m",
        "n": 4,
        "score": 75.0,
        "pages_per_s": 1.0,
        **out,
    }
    md = table(summary)
    assert "| category | bar-x | line-y |" in md and "| count | 50.0 | 100.0 |" in md and "| trend |  | 100.0 |" in md


def test_eval_report_compares_runs_with_their_costs(tmp_path, capsys):
    """Runs side by side: a local run's cost per 1,000 pages from its GPU time at --gpu-price, an API run's from
    its token cost; a directory that is not a run is a clear error."""
    from vlstack.cli import main

    write_tsv(
        tmp_path / "b.tsv",
        [{"index": str(i), "image": b64(png(i)), "question": "How many?", "answer": "3"} for i in range(3)],
    )
    assert (
        main(
            [
                "eval",
                "chartqa",
                "--data",
                str(tmp_path / "b.tsv"),
                "--out",
                str(tmp_path / "local"),
                "--max-new-tokens",
                "3",
            ]
        )
        == 0
    )
    api = {
        "benchmark": "chartqa",
        "model": "gpt-x",
        "n": 200,
        "score": 81.5,
        "seconds": 50.0,
        "pages_per_s": 4.0,
        "cost_usd": 0.9,
        "source": "https://api.example.com/v1/chat/completions",
    }
    (tmp_path / "api").mkdir()
    (tmp_path / "api/summary.json").write_text(json.dumps(api))
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                "report",
                str(tmp_path / "local"),
                str(tmp_path / "api"),
                "--gpu-price",
                "3.6",
                "--out",
                str(tmp_path / "cmp"),
            ]
        )
        == 0
    )
    local = json.loads((tmp_path / "local/summary.json").read_text())
    text = (tmp_path / "cmp/report.md").read_text()
    assert text in capsys.readouterr().out
    assert f"| local | chartqa | tiny | local (cpu) | 3 | {local['score']:.1f} |" in text
    assert f"| {1000 * 3.6 * local['seconds'] / 3600 / 3:.3f} |" in text  # GPU hours at 3.6 USD
    assert "| api | chartqa | gpt-x | API | 200 | 81.5 | 4.00 | 4.500 |" in text  # 0.9 USD / 200 pages
    assert Image.open(tmp_path / "cmp/report.png").format == "PNG"
    assert main(["eval", "report", str(tmp_path)]) == 2
    assert "no summary.json" in capsys.readouterr().err


def test_several_adapters_are_scored_in_one_command_with_a_report(tmp_path, capsys):
    """--adapter a=DIR --adapter b=DIR --adapter base: a run each under --out/NAME (each the same as scoring
    that adapter alone), then the report of them all."""
    import torch

    import vlstack
    from vlstack.adapters import save_adapter
    from vlstack.cli import main
    from vlstack.layers.lora import LoRASpec, add_adapter

    vlm, spec = vlstack.load("tiny", device="cpu"), LoRASpec(rank=4, alpha=16)
    for seed, name in enumerate(("a", "b")):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in add_adapter(vlm.model, name, spec, seed=seed):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        save_adapter(vlm.model, name, tmp_path / name, spec)
    write_tsv(
        tmp_path / "b.tsv",
        [{"index": str(i), "image": b64(png(i)), "question": "How many?", "answer": "3"} for i in range(3)],
    )
    common = ["eval", "chartqa", "--data", str(tmp_path / "b.tsv"), "--max-new-tokens", "4"]
    assert (
        main(
            [
                *common,
                "--out",
                str(tmp_path / "all"),
                "--adapter",
                f"a={tmp_path / 'a'}",
                "--adapter",
                f"b={tmp_path / 'b'}",
                "--adapter",
                "base",
            ]
        )
        == 0
    )
    assert main([*common, "--out", str(tmp_path / "alone"), "--adapter", f"b={tmp_path / 'b'}"]) == 0

    def predictions(run):
        return [json.loads(x)["prediction"] for x in (run / "predictions.jsonl").read_text().splitlines()]

    runs = {name: predictions(tmp_path / "all" / name) for name in ("a", "b", "base")}
    assert runs["b"] == predictions(tmp_path / "alone") and runs["a"] != runs["b"] != runs["base"]
    report = (tmp_path / "all/report.md").read_text()
    assert all(f"| {name} | chartqa | tiny+{name} |" in report for name in ("a", "b"))
    assert "| base | chartqa | tiny |" in report
    assert main([*common, "--adapter", "nonsense"]) == 2 and "NAME=DIR, or base" in capsys.readouterr().err
