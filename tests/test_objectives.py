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


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_dpo_bco_and_mpo_follow_their_formulas_and_the_reward_shift_runs_over_micro_batches():
    """Written out by hand: DPO -log s(b((pc - rc) - (pr - rr))); BCO with delta the running mean of the
    micro-batches' mean rewards b(p - r), this one's included; MPO 0.8 DPO + 0.2 BCO + 1 x the chosen answers'
    token-mean cross-entropy."""
    from vlstack.train.preference import Preference, RewardShift, pair_losses, preference_loss

    beta = 0.1
    batches = [
        ([[-12.0, -15.0], [-30.0, -28.0]], [[-13.0, -14.0], [-29.0, -29.5]]),
        ([[-5.0, -9.0]], [[-6.0, -6.0]]),
    ]
    shift, means = RewardShift(), []
    for policy, reference in batches:
        p, r = torch.tensor(policy, dtype=torch.float64), torch.tensor(reference, dtype=torch.float64)
        dpo, bco = pair_losses(p, r, beta, shift)
        rewards = [beta * (pp - rr) for pairs, refs in zip(policy, reference) for pp, rr in zip(pairs, refs)]
        means.append(sum(rewards) / len(rewards))
        delta = sum(means) / len(means)  # every micro-batch so far counts once
        assert shift.mean == pytest.approx(delta)
        for i, ((pc, pr), (rc, rr)) in enumerate(zip(policy, reference)):
            assert float(dpo[i]) == pytest.approx(-math.log(sig(beta * ((pc - rc) - (pr - rr)))))
            want = -math.log(sig(beta * (pc - rc) - delta)) - math.log(sig(-(beta * (pr - rr) - delta)))
            assert float(bco[i]) == pytest.approx(want)
    state = shift.state_dict()
    again = RewardShift()
    again.load_state_dict(state)  # (a resumed run goes on from the same delta)
    assert again.update(1.0) == shift.update(1.0)

    policy = torch.tensor([[-12.0, -15.0], [-30.0, -28.0]], dtype=torch.float64, requires_grad=True)
    reference = torch.tensor([[-13.0, -14.0], [-29.0, -29.5]], dtype=torch.float64)
    mpo, fresh = Preference(), RewardShift()
    loss = preference_loss(mpo, policy, reference, torch.tensor(7.0, dtype=torch.float64), 5, fresh)
    dpo, bco = pair_losses(policy, reference, 0.1, RewardShift())
    assert float(loss) == pytest.approx(0.8 * float(dpo.mean()) + 0.2 * float(bco.mean()) + 7.0 / 5)
    loss.backward()
    assert policy.grad is not None and float(policy.grad[:, 0].sum()) < 0  # raising a chosen answer lowers it
    plain = Preference(dpo=1.0, bco=0.0, sft=0.0)  # plain DPO: no shift used
    assert float(preference_loss(plain, policy, reference, torch.tensor(7.0), 5, None)) == pytest.approx(
        float(dpo.mean())
    )
