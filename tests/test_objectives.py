"""Training objectives (train/losses.py): each job's loss from its objective, against formulas written out here
over plain per-row forwards (no packing, no routing)."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import rows_forward, started

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
        rewards = [beta * (pp - rr) for pairs, refs in zip(policy, reference) for pp, rr in zip(pairs, refs)]
        means.append(sum(rewards) / len(rewards))
        delta = sum(means) / len(means)  # every micro-batch so far counts once
        assert shift.update(float(beta * (p - r).mean())) == pytest.approx(delta)
        dpo, bco = pair_losses(p, r, beta, shift.mean)
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
    mpo, delta = Preference(), 0.03
    loss = preference_loss(mpo, policy, reference, torch.tensor(7.0, dtype=torch.float64), 2, 5, delta)
    dpo, bco = pair_losses(policy, reference, 0.1, delta)
    assert loss.detach().item() == pytest.approx(0.8 * float(dpo.mean()) + 0.2 * float(bco.mean()) + 7.0 / 5)
    loss.backward()
    assert policy.grad is not None and float(policy.grad[:, 0].sum()) < 0  # raising a chosen answer lowers it
    plain = Preference(dpo=1.0, bco=0.0, sft=0.0)  # plain DPO: no shift used
    assert float(preference_loss(plain, policy, reference, torch.tensor(7.0), 2, 5, None)) == pytest.approx(
        float(dpo.mean())
    )


QUESTIONS = [
    ("What is the total?", "42", "17"),
    ("Is it rising?", "Yes, every quarter.", "No."),
    ("Colour?", "Blue.", "It is red"),
]


def pairs_dataset(path, n: int = 4, with_image: bool = False):
    """MMPR-style lines: image (optional), question, chosen, rejected."""
    from conftest import image

    lines = []
    for i in range(n):
        q, good, bad = QUESTIONS[i % len(QUESTIONS)]
        line = {"question": f"{q} ({i})", "chosen": good, "rejected": bad}
        if with_image and i % 2 == 0:
            image(40 + 8 * i, 30, seed=i).save(path.parent / f"p{i}.png")
            line["image"] = f"p{i}.png"
        lines.append(json.dumps(line))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("moved,full", [(False, False), (True, False), (True, True)])
def test_mpo_is_its_formula_with_the_reference_the_base_with_the_adapter_off(tmp_path, moved, full):
    """The loss of a micro-batch by hand, from plain per-row forwards: each answer's summed log-probability
    with the job's adapter (the policy) and without it (the reference); DPO, BCO with the shift (the first
    micro-batch's mean reward) and 0.8 DPO + 0.2 BCO + the chosen answers' token-mean cross-entropy. A fresh
    adapter (zero: the policy is the reference) gives 0.8 log 2 + 0.2 x 2 log 2 + that cross-entropy. A full
    job's reference: the weights it started from (moved since), in a frozen copy."""
    data = pairs_dataset(tmp_path / "p.jsonl", 3, with_image=True)
    job = Job.of("m", data, tmp_path / "o", objective="mpo", batch_size=3, grad_accum=2, steps=1, beta=0.3,
                 full=full)  # fmt: skip
    vlm, (r,) = started([job])
    start_weights = {k: v.clone() for k, v in vlm.model.state_dict().items()}
    if moved:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in r.params:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    batch = r.stream.next()
    r.stream = type(r.stream)(read_dataset(data), job.batch_size, job.seed)
    got = train_step(vlm, [r])[0]
    vlm.model.eval()
    logps, ces = [], []
    with torch.no_grad():
        for ex in batch:
            for side in ex.sides():
                row = encode_example(vlm.processor, side, job.max_len)
                labels = row["labels"][1:]
                keep = labels != IGNORE
                both = []
                both_models = (
                    [(vlm.model, None), (r.reference, None)] if full else [(vlm.model, ["m"]), (vlm.model, None)]
                )
                for model, adapters in both_models:  # the policy, then the reference
                    logits = rows_forward(model, row["input_ids"][None], row.get("pixel_values"), adapters)[0]
                    both.append(F.cross_entropy(logits[:-1][keep].double(), labels[keep], reduction="none"))
                logps.append((-both[0].sum().item(), -both[1].sum().item()))
                if side is ex:
                    ces.append(both[0])
    beta = 0.3
    pairs = [(logps[2 * i], logps[2 * i + 1]) for i in range(len(batch))]  # ((policy, ref) chosen, rejected)
    rewards = [beta * (pol - ref) for pair in pairs for pol, ref in pair]
    delta = sum(rewards) / len(rewards)
    dpo = [-math.log(sig(beta * ((c[0] - c[1]) - (j[0] - j[1])))) for c, j in pairs]
    bco = [
        -math.log(sig(beta * (c[0] - c[1]) - delta)) - math.log(sig(-(beta * (j[0] - j[1]) - delta))) for c, j in pairs
    ]
    sft = torch.cat(ces).mean().item()
    want = 0.8 * sum(dpo) / len(dpo) + 0.2 * sum(bco) / len(bco) + sft
    if not moved:
        assert want == pytest.approx(0.8 * math.log(2) + 0.2 * 2 * math.log(2) + sft, abs=1e-6)
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-5)
    assert r.shift.count == 1 and r.shift.mean == pytest.approx(delta, abs=1e-6)
    if full:  # (the frozen copy: the starting weights, not the moved ones)
        assert all(torch.equal(v, start_weights[k]) for k, v in r.reference.state_dict().items())
        assert not all(torch.equal(v, start_weights[k]) for k, v in vlm.model.state_dict().items())


def moved_grads(jobs: list[Job], max_tokens: int | None = None) -> tuple[dict, torch.Tensor, list[float]]:
    """One micro-step (grad_accum 2: no optimizer step, the gradients stay) of the jobs started with their
    adapters moved away from zero (the same in every call: the policy is not the reference): each job's
    gradients, the losses [jobs] and each job's reward shift after it."""
    vlm, running = started(jobs)
    with torch.no_grad():
        for r in running:
            g = torch.Generator().manual_seed(len(r.job.name) + r.job.lora.rank)
            for p in r.params:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    losses = train_step(vlm, running, max_tokens)
    return {r.job.name: [p.grad.clone() for p in r.params] for r in running}, losses, [r.shift.mean for r in running]


def test_an_mpo_job_fused_with_an_sft_job_gets_the_gradients_it_gets_alone(tmp_path):
    """BatchLoRA over objectives: one base pass over both jobs' rows, the MPO job's pairs reduced on their own
    (its reference forward with every adapter off); each job's gradients are its gradients alone."""
    from test_train import write_dataset

    pairs = pairs_dataset(tmp_path / "p.jsonl", 4, with_image=True)
    sft = write_dataset(tmp_path / "d", "s", 4, True)
    mpo_job = Job.of("m", pairs, tmp_path / "om", objective="mpo", rank=4, batch_size=2, grad_accum=2, steps=1,
                     dropout=0.1, beta=0.2)  # fmt: skip
    sft_job = Job.of("s", sft, tmp_path / "os", rank=2, batch_size=2, grad_accum=2, steps=1, loss_weighting="square")

    fused, fused_losses, _ = moved_grads([mpo_job, sft_job])
    for i, job in enumerate([mpo_job, sft_job]):
        alone, losses, _ = moved_grads([job])
        torch.testing.assert_close(fused_losses[i], losses[0], rtol=1e-5, atol=1e-6)
        for a, b in zip(fused[job.name], alone[job.name]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        assert any(g.abs().max() > 0 for g in fused[job.name])


def test_passes_of_max_tokens_give_a_preference_job_the_step_of_one_pass(tmp_path):
    """max_tokens over an MPO job fused with an SFT job: each pair's two rows kept in one pass, BCO's reward shift
    from every pass's rewards before any pass's loss; the losses, gradients and shift of one pass."""
    from test_train import write_dataset

    from vlstack.train.batch import passes
    from vlstack.train.multi import job_rows

    pairs = pairs_dataset(tmp_path / "p.jsonl", 4, with_image=True)
    sft = write_dataset(tmp_path / "d", "s", 4, True)
    mpo_job = Job.of("m", pairs, tmp_path / "om", objective="mpo", rank=4, batch_size=4, grad_accum=2, steps=1,
                     dropout=0.1, beta=0.2)  # fmt: skip
    sft_job = Job.of("s", sft, tmp_path / "os", rank=2, batch_size=2, grad_accum=2, steps=1)
    vlm, running = started([mpo_job, sft_job])
    rows = job_rows(vlm, running, split=False)
    pair_tokens = len(rows[0][1]["input_ids"]) + len(rows[1][1]["input_ids"])
    groups = passes(rows, pair_tokens)  # (a pair's tokens a pass: no room for a third row)
    sides = [[x["side"] for _, x in g if x["side"] is not None] for g in groups]
    assert len(groups) >= 4 and all(x == [0, 1] * (len(x) // 2) for x in sides)  # every pair whole in its pass
    one, one_losses, one_shift = moved_grads([mpo_job, sft_job])
    many, many_losses, many_shift = moved_grads([mpo_job, sft_job], max_tokens=pair_tokens)
    torch.testing.assert_close(many_losses, one_losses, rtol=1e-5, atol=1e-6)
    assert many_shift == pytest.approx(one_shift, rel=1e-5) and one_shift[0] != 0
    for name in ("m", "s"):
        for a, b in zip(many[name], one[name]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # (sums in another order)


def test_dpo_learns_to_prefer_the_chosen_answers(tmp_path):
    """Plain DPO (objective: dpo) starts at log 2 a pair and goes below it as the chosen answers' log-ratio
    overtakes the rejected ones'."""
    from vlstack.train.multi import train

    data = pairs_dataset(tmp_path / "p.jsonl", 4)
    job = Job.of("d", data, tmp_path / "o", objective="dpo", rank=8, batch_size=4, steps=12, lr=2e-2, beta=0.5)
    assert job.objective.dpo == 1.0 and job.objective.bco == 0.0 and job.objective.sft == 0.0
    done = train(vlstack.load("tiny", device="cpu"), [job], 4, verbose=False)
    losses = done["d"].losses
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5)
    assert losses[-1] < 0.5 * math.log(2)
    assert (tmp_path / "o" / "adapter_model.safetensors").is_file()


def test_preference_jobs_refuse_what_they_cannot_use(tmp_path):
    from test_train import write_dataset

    from vlstack.train.data import DatasetError
    from vlstack.train.multi import train

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "Q?", "rejected": "no"}) + "\n")
    with pytest.raises(DatasetError, match=r"bad.jsonl:1: a preference pair needs 'question', 'chosen' and"):
        read_dataset(bad)
    path = tmp_path / "jobs.yaml"
    for fields, message in [
        ("objective: ppo", r"objective 'ppo' is not one of sft, distil, mpo, dpo"),
        ("objective: mpo, beta: 0", r"beta must be > 0"),
        ("beta: 0.1", r"beta and the \*_weight fields are for the objectives mpo and dpo"),
    ]:
        path.write_text(f"jobs:\n  - {{name: a, data: a.jsonl, output: o, steps: 1, {fields}}}\n")
        with pytest.raises(JobError, match=message):
            read_plan(path)
    vlm = vlstack.load("tiny", device="cpu")
    pairs, sft = pairs_dataset(tmp_path / "p.jsonl", 2), write_dataset(tmp_path / "d", "s", 2, False)
    with pytest.raises(JobError, match=r"s.jsonl:1: job 'x' \(mpo or dpo\) needs a preference pair"):
        train(vlm, [Job.of("x", sft, tmp_path / "o1", objective="mpo", batch_size=2, steps=1)], 2, verbose=False)
    with pytest.raises(JobError, match=r"p.jsonl:1: job 'y' \(sft or distil\) needs a conversation"):
        train(vlm, [Job.of("y", pairs, tmp_path / "o2", batch_size=2, steps=1)], 2, verbose=False)
    with pytest.raises(JobError, match=r"job 'z': a preference objective does not go with parallel: pipeline"):
        train(
            vlm, [Job.of("z", pairs, tmp_path / "o3", objective="dpo", batch_size=2, steps=1)], 2, parallel="pipeline"
        )
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))


@pytest.mark.slow
@pytest.mark.parametrize("split", ["", "max_tokens: 160\n", "sharding: fsdp\n"])
def test_two_processes_train_an_mpo_job_as_one_does(tmp_path, split):
    """Data parallelism (torchrun, 2 gloo processes) over an MPO job fused with an SFT job: each process a half
    of every job's pairs, the pairs' and chosen tokens' totals and BCO's rewards summed over both; the
    adapters equal one process's in one pass. The same in passes of max_tokens (a process's rewards from all
    its passes first), and with the base and the adapters sharded (FSDP)."""
    from conftest import run_cli
    from test_train import adapter, assert_same_adapter, write_dataset

    pairs_dataset(tmp_path / "p.jsonl", 8, with_image=True)
    write_dataset(tmp_path, "s", 4, True)
    for out in ("one", "two"):
        (tmp_path / f"{out}.yaml").write_text(
            f"model: tiny\n{split if out == 'two' else ''}jobs:\n"
            f"  - {{name: m, data: p.jsonl, output: {out}/m, objective: mpo, rank: 4, batch_size: 4, steps: 3, "
            "lr: 3e-3, dropout: 0.1}\n"
            f"  - {{name: s, data: s.jsonl, output: {out}/s, rank: 2, batch_size: 2, steps: 3, lr: 3e-3}}\n"
        )
    one = run_cli("train", str(tmp_path / "one.yaml"))
    assert one.returncode == 0, one.stderr
    two = run_cli("train", str(tmp_path / "two.yaml"), processes=2)
    assert two.returncode == 0, two.stderr
    for name in ("m", "s"):
        assert_same_adapter(adapter(tmp_path / "one" / name), adapter(tmp_path / "two" / name))
        curves = [
            [
                json.loads(x)["loss"]
                for x in (tmp_path / out / f"{name}.train" / "metrics.jsonl").read_text().splitlines()
            ]
            for out in ("one", "two")
        ]
        assert curves[0][0] == pytest.approx(curves[1][0], rel=1e-5)  # the first step's loss: the same parameters
        assert curves[0] == pytest.approx(curves[1], rel=1e-3)


def test_synth_preferences_pairs_the_models_right_and_wrong_answers_and_trains_on_them(tmp_path):
    """`vlstack synth preferences`: K samples per question through the engine (sample k seeded seed x K + k),
    each scored by the benchmark's rule; pairs of (right, wrong), questions all right or none right dropped and
    counted; the pairs a dataset that a dpo job trains on. The gold answers here are samples the tiny model gave
    (drawn first with the same seeds), so some questions have both kinds."""
    from conftest import image

    from vlstack.cli import main
    from vlstack.eval.benchmarks import content, read_items
    from vlstack.train.multi import train

    lines = []
    for i in range(4):
        image(40, 30, seed=i).save(tmp_path / f"q{i}.png")
        turns = [{"from": "human", "value": f"<image>\nWhat is shown ({i})?"}]
        lines.append({"image": f"q{i}.png", "conversations": turns, "answer": "x", "category": f"c{i % 2}"})
    bench = tmp_path / "b.jsonl"
    bench.write_text("".join(json.dumps(x) + "\n" for x in lines))
    vlm, k = vlstack.load("tiny", device="cpu"), 3
    items = read_items(bench)
    asked = [[{"role": "user", "content": content(i)}] for i in items]
    drawn = [vlm.generate(asked, max_new_tokens=6, temperature=1.0, seed=s) for s in range(k)]  # [k][items]
    for line, j in zip(lines, range(len(items))):
        line["answer"] = drawn[0][j].strip() if j < 3 else "no sample says this"  # (item 3: none right)
    bench.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "pairs"
    args = ["synth", "preferences", "--data", str(bench), "--out", str(out), "--samples", str(k)]
    assert main([*args, "--max-new-tokens", "6", "--batch", "3"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    pairs = [json.loads(x) for x in (out / "preferences.jsonl").read_text().splitlines()]
    gold = {line["conversations"][0]["value"].split("(")[1][0]: line["answer"] for line in lines}
    mixed = [j for j in range(3) if len({drawn[s][j].strip() for s in range(k)}) > 1]
    assert {p["question"].split("(")[1][0] for p in pairs} == {str(j) for j in mixed}
    for p in pairs:
        assert p["chosen"] == gold[p["question"].split("(")[1][0]] != p["rejected"]
        assert (out / p["image"][0]).is_file() and p["question"].endswith(content(items[0])[-1]["text"][-40:])
    assert summary["pairs"] == len(pairs) and sum(c["questions"] for c in summary["categories"].values()) == 4
    assert sum(c["none right"] for c in summary["categories"].values()) >= 1  # item 3
    assert pairs  # (the tiny model's samples differ at temperature 1)
    judged = [json.loads(x) for x in (out / "critic.jsonl").read_text().splitlines()]  # outcome labels
    assert {x["labels"][0] for x in judged} == {"+", "-"} and all(ex.steps for ex in read_dataset(out / "critic.jsonl"))
    for x in judged:
        assert (x["steps"][0] == gold[x["question"].split("(")[1][0]]) == (x["labels"] == ["+"])
    job = Job.of("d", out / "preferences.jsonl", tmp_path / "dpo", objective="dpo", batch_size=1, steps=1)
    assert "d" in train(vlm, [job], 1, verbose=False)
    assert main([*args]) == 2  # the directory exists: refused, nothing overwritten
    assert main(["synth", "preferences", "--data", str(bench), "--out", str(tmp_path / "p2"), "--samples", "1"]) == 2


def test_a_resumed_mpo_job_goes_on_from_its_reward_shift(tmp_path):
    """BCO's shift is a running mean over the job's micro-batches: the checkpoint keeps it, --resume restores it."""
    from vlstack.train.state import load_state, restore_state, save_state

    data = pairs_dataset(tmp_path / "p.jsonl", 2)
    job = Job.of("m", data, tmp_path / "o", objective="mpo", batch_size=2, steps=3)
    vlm, (r,) = started([job])
    train_step(vlm, [r])
    train_step(vlm, [r])
    assert r.shift.count == 2
    save_state(r)
    state = load_state(job)
    other, (again,) = started([job])  # (another process resuming)
    restore_state(again, state)
    assert (again.shift.mean, again.shift.count) == (r.shift.mean, r.shift.count)
    restore_state(r, {**state, "shift": {"mean": 0.5, "count": 7}})
    assert (r.shift.mean, r.shift.count) == (0.5, 7)


def test_a_resumed_full_preference_job_keeps_its_starting_weights_as_the_reference(tmp_path):
    """A full job's reference is the model it started from: after --resume, the weights of the run's start
    (the loaded base), not those of the checkpoint it goes on from."""
    from vlstack.train.state import load_state, save_state

    data = pairs_dataset(tmp_path / "p.jsonl", 2)
    job = Job.of("m", data, tmp_path / "o", objective="dpo", full=True, batch_size=2, steps=3, lr=1e-2)
    vlm, (r,) = started([job])
    base = {k: v.clone() for k, v in vlm.model.state_dict().items()}
    train_step(vlm, [r])  # (an optimizer step: the weights move)
    save_state(r)
    other = vlstack.load("tiny", device="cpu")
    again = start(other, job, read_dataset(data), load_state(job))
    assert again.step == 1 and all(torch.equal(v, base[k]) for k, v in again.reference.state_dict().items())
    moved = vlm.model.state_dict()
    assert all(torch.equal(v, moved[k]) for k, v in other.model.state_dict().items())
    assert not all(torch.equal(v, base[k]) for k, v in moved.items())


def critic_data(path, n: int):
    """Answers that start with "Yes" are right (+), with "No" wrong (-): a rule a critic can learn."""
    lines = []
    for i in range(n):
        good = i % 2 == 0
        answer = ("Yes, it rises." if good else "No, it falls.") + f" ({i})"
        lines.append({"question": f"Does line {i} rise?", "steps": [answer], "labels": ["+" if good else "-"]})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_step_labelled_lines_read_as_the_critics_chat_and_bad_ones_are_named(tmp_path):
    from vlstack.train.data import DatasetError

    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"question": "Q?", "steps": ["one", "two"], "labels": ["+", "\u2212"]}) + "\n")
    (ex,) = read_dataset(path)
    assert ex.steps and [m["content"] for m in ex.messages] == ["Q?\none", "+", "two", "-"]
    assert [m["role"] for m in ex.messages] == ["user", "assistant", "user", "assistant"]
    for line, message in [
        ({"question": "Q?", "steps": ["one"], "labels": ["+", "-"]}, "give each of the 1 steps"),
        ({"question": "Q?", "steps": ["one"], "labels": ["ok"]}, "give each of the 1 steps"),
        ({"question": "Q?", "labels": ["+"]}, "needs 'question', 'steps'"),
    ]:
        path.write_text(json.dumps(line) + "\n")
        with pytest.raises(DatasetError, match=message):
            read_dataset(path)


def test_a_critic_trained_with_prm_scores_right_answers_above_wrong_ones(tmp_path):
    """objective: prm on outcome labels: afterwards the critic's P('+') is higher for held-out right answers than
    for wrong ones; a step's score is P('+') normalised over '+' and '-', an answer's the mean of its steps'."""
    from vlstack.train.critic import critic_scores
    from vlstack.train.multi import train

    data = critic_data(tmp_path / "c.jsonl", 8)
    job = Job.of("critic", data, tmp_path / "critic", objective="prm", rank=8, batch_size=4, steps=40, lr=1e-2)
    train(vlstack.load("tiny", device="cpu"), [job], 4, verbose=False)
    vlm = vlstack.load("tiny", device="cpu")
    vlm.load_adapter("critic", tmp_path / "critic")
    right, wrong = "Yes, it rises. (40)", "No, it falls. (41)"
    scores = critic_scores(vlm, "critic", "Does line 40 rise?", [], [right, wrong, f"{right}\n{wrong}"])
    assert all(0 < s < 1 for s in scores)
    assert scores[0] > 0.7 and scores[1] < 0.3  # learned
    steps = [critic_scores(vlm, "critic", "Does line 40 rise?", [], [a])[0] for a in (right, wrong)]
    assert scores[:2] == pytest.approx(steps, abs=1e-5)  # (each answer scored alone: the same)
    assert 0.2 < scores[2] < 0.8  # two steps, one right and one wrong: in between (the second judged in context)


def test_critic_scores_are_its_reply_probabilities_with_the_images_encoded_once():
    """critic_scores against each answer's own forward (the critic's adapter on its vision tower and LLM): a
    step's P('+') over '+' and '-' at its reply, an answer's the mean; the answers' shared image through the
    vision tower once for all of them."""
    from conftest import image, rows_forward

    from vlstack.layers.lora import LoRASpec, add_adapter
    from vlstack.train.critic import _encode, _replies, critic_scores, reply_ids, steps_of

    vlm = vlstack.load("tiny", device="cpu")
    spec, gen = LoRASpec(rank=4, alpha=16, parts=("language", "vision")), torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in add_adapter(vlm.model, "critic", spec, seed=3):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    vlm.adapters["critic"] = spec
    buf = io.BytesIO()
    image(90, 60, seed=4).save(buf, format="PNG")
    answers = ["Four.", "There are\nthree bars", "7"]
    calls = []
    hook = vlm.model.vision_tower.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    scores = critic_scores(vlm, "critic", "<image>\nHow many bars?", [buf.getvalue()], answers)
    hook.remove()
    plus, minus = reply_ids(vlm)
    for answer, score in zip(answers, scores):
        steps = steps_of(answer)
        row = _encode(vlm, "<image>\nHow many bars?", [buf.getvalue()], steps, ["+"] * len(steps))
        with torch.no_grad():
            logits = rows_forward(vlm.model, row["input_ids"][None], row["pixel_values"], ["critic"])[0]
        at = torch.tensor(_replies(row["labels"])) - 1  # the positions predicting each reply
        p = logits[at][:, [plus, minus]].double().softmax(-1)[:, 0]
        assert len(at) == len(steps) and score == pytest.approx(float(p.mean()), abs=1e-5)
    assert calls == [row["pixel_values"].shape[0]]  # the image's tiles through the tower once, not once an answer
    assert len(set(round(s, 4) for s in scores)) == 3


def test_eval_best_of_n_keeps_the_critics_pick_and_counts_every_sample(tmp_path, capsys):
    """`vlstack eval --best-of 3 --critic DIR`: each item's 3 samples (the k-th seeded k), scored by the critic;
    the prediction is the best-scored sample, predictions.jsonl records the scores, usage counts every sample
    and the summary records N, the critic and the extra tokens."""
    from conftest import image

    from vlstack.cli import main
    from vlstack.eval.benchmarks import content, prompt_text, read_items
    from vlstack.train.critic import critic_scores
    from vlstack.train.multi import train

    critic = tmp_path / "critic"
    job = Job.of("c", critic_data(tmp_path / "c.jsonl", 4), critic, objective="prm", batch_size=4, steps=2)
    train(vlstack.load("tiny", device="cpu"), [job], 4, verbose=False)
    lines = []
    for i in range(3):
        image(40, 30, seed=i).save(tmp_path / f"q{i}.png")
        turns = [{"from": "human", "value": f"<image>\nWhat is shown ({i})?"}]
        lines.append({"image": f"q{i}.png", "conversations": turns, "answer": "x", "category": "c"})
    bench = tmp_path / "b.jsonl"
    bench.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "run"
    args = ["eval", "vqa", "--data", str(bench), "--out", str(out), "--max-new-tokens", "5"]
    assert main([*args, "--best-of", "3", "--critic", str(critic)]) == 0
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    vlm = vlstack.load("tiny", device="cpu")
    vlm.load_adapter("critic", critic)
    items = read_items(bench)
    asked = [[{"role": "user", "content": content(i)}] for i in items]
    usage = [[] for _ in range(3)]
    drawn = [vlm.generate(asked, max_new_tokens=5, temperature=1.0, seed=k, usage=usage[k]) for k in range(3)]
    for j, (row, item) in enumerate(zip(rows, items)):
        samples = [drawn[k][j] for k in range(3)]
        scores = critic_scores(vlm, "critic", prompt_text(item), item.images, samples)
        assert row["best_of_scores"] == pytest.approx(scores, abs=1e-5) and row["best_of_samples"] == samples
        assert row["prediction"] == samples[max(range(3), key=lambda k: scores[k])]
        assert row["completion_tokens"] == sum(usage[k][j]["completion_tokens"] for k in range(3))
    assert summary["best_of"]["n"] == 3 and summary["best_of"]["critic"] == str(critic)
    assert summary["best_of"]["extra_completion_tokens"] == sum(r["extra_tokens"] for r in rows) > 0
    assert main([*args, "--best-of", "65", "--critic", str(critic), "--out", str(tmp_path / "r2")]) == 2
    assert main([*args, "--critic", str(critic), "--out", str(tmp_path / "r3")]) == 2
    assert main([*args, "--best-of", "2", "--critic", str(tmp_path), "--out", str(tmp_path / "r4")]) == 2
    assert "error" in capsys.readouterr().err
