"""Training objectives (train/losses.py): each job's loss from its objective, against formulas written out here
over plain per-row forwards (no packing, no routing)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import rows_forward

import vlstack
from vlstack.train.data import IGNORE, encode_example, read_dataset
from vlstack.train.jobs import Job, JobError, read_plan
from vlstack.train.multi import train_step
from vlstack.train.running import start

ANSWERS = ["Yes.", "The total is 42 thousand dollars in the third quarter.", "No, it fell by a tenth.", "Seven."]


def answers_dataset(path):
    """Rows whose answers differ in length (the weightings then differ)."""
    lines = [
        {"conversations": [{"from": "human", "value": f"Question {i}?"}, {"from": "gpt", "value": a}]}
        for i, a in enumerate(ANSWERS)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def row_losses(vlm, examples, max_len: int) -> list[torch.Tensor]:
    """Each example's token cross-entropies [l_i], by a forward of that row alone (HF's shifted labels)."""
    out = []
    with torch.no_grad():
        for ex in examples:
            row = encode_example(vlm.processor, ex, max_len)
            logits = rows_forward(vlm.model, row["input_ids"][None])[0]  # [T, V]
            labels = row["labels"][1:]
            keep = labels != IGNORE
            out.append(F.cross_entropy(logits[:-1][keep].float(), labels[keep], reduction="none"))
    return out


@pytest.mark.parametrize("weighting", ["token", "sample", "square"])
def test_a_jobs_loss_is_its_weighted_mean_of_token_losses(tmp_path, weighting):
    """loss_weighting: token (every token alike), sample (1/l: every row alike), square (1/sqrt(l), InternVL's):
    a micro-batch's loss is sum_i w_i sum_t ce_it / sum_i w_i l_i, l_i the row's learned tokens."""
    data = answers_dataset(tmp_path / "d.jsonl")
    job = Job.of("a", data, tmp_path / "o", batch_size=4, grad_accum=2, steps=1, loss_weighting=weighting)
    vlm = vlstack.load("tiny", device="cpu")
    for p in vlm.model.parameters():
        p.requires_grad_(False)
    examples = read_dataset(data)
    r = start(vlm, job, examples)
    batch = r.stream.next()  # (the micro-batch the step will take: the stream's order, replayed)
    r.stream = type(r.stream)(examples, job.batch_size, job.seed)
    vlm.model.train()
    got = train_step(vlm, [r])[0]
    vlm.model.eval()
    ces = row_losses(vlm, batch, job.max_len)  # (the adapter is zero at the start: the base's losses)
    assert len({len(c) for c in ces}) > 1  # rows of different lengths
    w = [{"token": 1.0, "sample": 1 / len(c), "square": 1 / math.sqrt(len(c))}[weighting] for c in ces]
    want = sum(wi * c.sum() for wi, c in zip(w, ces)) / sum(wi * len(c) for wi, c in zip(w, ces))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_an_unknown_loss_weighting_is_refused_by_name(tmp_path):
    path = tmp_path / "jobs.yaml"
    path.write_text("jobs:\n  - {name: a, data: a.jsonl, output: o, steps: 1, loss_weighting: mean}\n")
    with pytest.raises(JobError, match=r"loss_weighting must be one of token, sample, square"):
        read_plan(path)
    path.write_text("jobs:\n  - {name: a, data: a.jsonl, output: o, steps: 1, loss_weighting: square}\n")
    assert read_plan(path).jobs[0].objective.weighting == "square"
