"""Fused multi-adapter training: each job ends with the adapter it gets alone; datasets and job files
are checked before training; the command line trains and merges."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import image, rel_err, rows_forward, run_cli, started
from safetensors.torch import load_file

import vlstack
from vlstack.train.data import DatasetError, encode_example, read_dataset
from vlstack.train.jobs import Job, JobError, read_plan
from vlstack.train.multi import train
from vlstack.train.state import shape_of

ANSWERS = ["red", "a bar chart", "revenue grew", "the total is 42", "blue circle", "three items"]


def write_dataset(directory, name: str, n: int, with_images: bool, seed: int = 0):
    directory.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        row = {
            "conversations": [
                {"from": "human", "value": f"Question {i} about {name}?"},
                {"from": "gpt", "value": ANSWERS[(i + seed) % len(ANSWERS)] + f" ({name})"},
            ]
        }
        if with_images and i % 2 == 0:
            image(40 + 10 * i, 30 + 5 * i, seed=i).save(directory / f"{name}-{i}.png")
            row["image"] = f"{name}-{i}.png"
        lines.append(json.dumps(row))
    path = directory / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def jobs(tmp_path, out: str) -> list[Job]:
    data = tmp_path / "data"
    return [
        Job.of(
            "finance",
            write_dataset(data, "finance", 5, True),
            tmp_path / out / "finance",
            rank=4,
            alpha=8,
            batch_size=2,
            steps=3,
            lr=1e-2,
            seed=1,
        ),
        Job.of(
            "legal",
            write_dataset(data, "legal", 4, False, 1),
            tmp_path / out / "legal",
            rank=2,
            alpha=4,
            targets=["q_proj", "v_proj"],
            batch_size=1,
            grad_accum=2,
            steps=2,
            lr=5e-3,
            schedule="linear",
            warmup_steps=1,
            dropout=0.1,
            seed=2,
        ),
        Job.of(
            "support",
            write_dataset(data, "support", 6, True, 2),
            tmp_path / out / "support",
            rank=8,
            alpha=8,
            rslora=True,
            targets=["q_proj", "fc1", "linear_1"],
            parts=["language", "vision", "projector"],
            batch_size=2,
            epochs=1.0,
            lr=1e-2,
            seed=3,
        ),
    ]


def adapter(directory):
    return load_file(directory / "adapter_model.safetensors")


def assert_same_adapter(a: dict, b: dict) -> None:
    """Equal up to float rounding: batches of other shapes (or gradients summed over processes) round
    differently in the last bits, and Adam's m / sqrt(v) turns that into a few percent of one step
    (lr = 1e-2 here) for the rare near-zero gradient. The gradients themselves are compared tightly in
    test_fused_gradients_equal_gradients_alone."""
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=3e-4)


def test_fused_training_equals_each_job_alone(tmp_path):
    fused_jobs = jobs(tmp_path, "fused")
    done = train(vlstack.load("tiny", device="cpu"), fused_jobs, max_rows=5, verbose=False)
    assert sorted(done) == ["finance", "legal", "support"]
    assert done["support"].total_steps == 3  # epochs: 1 over 6 examples, batch 2, no accumulation
    for job in jobs(tmp_path, "alone"):
        train(vlstack.load("tiny", device="cpu"), [job], max_rows=5, verbose=False)
        fused, alone = adapter(tmp_path / "fused" / job.name), adapter(job.output)
        assert_same_adapter(fused, alone)
        assert any(k.endswith("lora_B.weight") and fused[k].abs().max() > 0 for k in fused)  # it trained


def test_a_job_added_while_others_run_ends_as_if_alone(tmp_path, capsys):
    """Jobs that more() hands over mid-run join the queue and end with the adapter they get alone; a bad
    one (missing dataset, a name in use) is reported and left out while the others go on."""
    finance, legal, support = jobs(tmp_path, "late")
    missing = Job.of("broken", tmp_path / "nope.jsonl", tmp_path / "late" / "broken", steps=1)
    calls = []

    def more():
        calls.append(1)
        return [support, missing, Job.of("legal", legal.data, tmp_path / "x", steps=1)] if len(calls) == 2 else []

    done = train(vlstack.load("tiny", device="cpu"), [finance, legal], max_rows=5, verbose=False, more=more)
    assert sorted(done) == ["finance", "legal", "support"] and len(calls) > 2
    assert done["support"].first_step == 0 and not (tmp_path / "late" / "broken").exists()
    err = capsys.readouterr().err
    assert "job 'broken' not added: dataset not found" in err
    assert "job 'legal' not added: a job of that name is already in this run" in err
    alone = jobs(tmp_path, "alone")[2]
    train(vlstack.load("tiny", device="cpu"), [alone], max_rows=5, verbose=False)
    assert_same_adapter(adapter(support.output), adapter(alone.output))


def test_watched_jobs_file_hands_over_new_jobs(tmp_path, capsys):
    from vlstack.train.jobs import PlanWatcher

    path = tmp_path / "jobs.yaml"
    path.write_text("jobs:\n  - {name: a, data: a.jsonl, output: o/a, steps: 1}\n")
    watch = PlanWatcher(path, read_plan(path))
    assert watch() == []  # unchanged
    path.write_text("jobs:\n  - {name: a, data: a.jsonl, output: o/a, steps: 9}\n  - {name: b, data: b.jsonl,\n")
    assert watch() == [] and "the changed jobs file is not used: " in capsys.readouterr().err
    path.write_text(
        "jobs:\n  - {name: a, data: a.jsonl, output: o/a, steps: 9}\n"
        "  - {name: b, data: b.jsonl, output: o/b, steps: 2, rank: 4}\n"
    )
    new = watch()
    assert [(j.name, j.lora.rank, j.output) for j in new] == [("b", 4, tmp_path / "o" / "b")]  # a keeps its settings
    assert "job 'a' changed in the jobs file: it goes on with the settings it started with" in capsys.readouterr().err
    path.write_text(path.read_text() + "  - {name: c, data: c.jsonl, output: o/c, steps: 1}\n")
    assert [j.name for j in watch()] == ["c"] and watch() == []


@pytest.mark.slow
def test_queue_with_few_rows_gives_the_same_adapters(tmp_path):
    train(vlstack.load("tiny", device="cpu"), jobs(tmp_path, "wide"), max_rows=5, verbose=False)
    train(vlstack.load("tiny", device="cpu"), jobs(tmp_path, "narrow"), max_rows=2, verbose=False)
    for name in ("finance", "legal", "support"):
        assert_same_adapter(adapter(tmp_path / "wide" / name), adapter(tmp_path / "narrow" / name))


def test_fused_gradients_equal_gradients_alone(tmp_path):
    """Before any optimizer step, each job's gradient in the fused batch is its gradient alone."""
    from vlstack.train.multi import train_step
    from vlstack.train.running import start

    def grads(selected):
        vlm = vlstack.load("tiny", device="cpu")
        for p in vlm.model.parameters():
            p.requires_grad_(False)
        vlm.model.train()
        running = [start(vlm, j, read_dataset(j.data)) for j in selected]
        train_step(vlm, running)
        return {r.job.name: [p.grad.clone() for p in r.params] for r in running}

    all_jobs = jobs(tmp_path, "g")
    for j in all_jobs:
        j.grad_accum = 2  # no optimizer step after the first micro-batch: the gradients stay
    fused = grads(all_jobs)
    for j in all_jobs:
        for a, b in zip(fused[j.name], grads([j])[j.name]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
        assert any(g.abs().max() > 0 for g in fused[j.name])


@pytest.mark.slow
def test_fused_training_step_compiles_without_a_graph_break(tmp_path, monkeypatch):
    """The proof on a CPU that the fused step's forward can be compiled (and captured): job_losses compiled with
    fullgraph=True (backend "eager": tracing without code generation) over two jobs' rows, images included,
    gives the losses and gradients of the eager step."""
    from vlstack.train import multi

    selected = [j for j in jobs(tmp_path, "c") if j.name in ("finance", "support")]  # no dropout
    for j in selected:
        j.grad_accum = 2  # no optimizer step: the gradients stay

    def step():
        vlm = vlstack.load("tiny", device="cpu")
        for p in vlm.model.parameters():
            p.requires_grad_(False)
        vlm.model.train()
        running = [multi.start(vlm, j, read_dataset(j.data)) for j in selected]
        losses = multi.train_step(vlm, running)
        return losses, [p.grad for r in running for p in r.params]

    eager_losses, eager_grads = step()
    torch._dynamo.reset()
    monkeypatch.setattr(multi, "job_losses", torch.compile(multi.job_losses, fullgraph=True, backend="eager"))
    losses, grads = step()
    torch.testing.assert_close(losses, eager_losses)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_every_job_in_one_matmul_gives_the_gradients_of_one_per_job(tmp_path, checkpointing):
    """Slots.fused (a GPU's default): each LoRA layer runs every job in one pair of matmuls over slots built
    from the adapters' parameters; the losses and gradients are those of a pair per job, with dropout,
    different ranks and images, and with layers recomputed in backward."""
    from vlstack.layers.lora import slots_of
    from vlstack.layers.lora_routing import active
    from vlstack.train import multi

    selected = jobs(tmp_path, "f")  # finance (images), legal (rank 2 on q, v; dropout), support (rsLoRA, vision)
    for j in selected:
        j.grad_accum = 2  # no optimizer step: the gradients stay

    def step(fused):
        vlm = vlstack.load("tiny", device="cpu")
        for p in vlm.model.parameters():
            p.requires_grad_(False)
        vlm.model.train()
        vlm.model.language_model.checkpointing = checkpointing
        slots_of(vlm.model).fused = fused
        calls = []
        hook = torch.nn.Module.register_forward_hook  # (which path ran: the one-hot's or the per-job one)
        running = [multi.start(vlm, j, read_dataset(j.data)) for j in selected]
        layer = next(m for m in slots_of(vlm.model).members if m.name.startswith("language_model."))  # (tokens)
        hook(layer, lambda m, i, o: calls.append(active().onehot is not None))
        losses = multi.train_step(vlm, running)
        return losses, [p.grad for r in running for p in r.params], calls

    per_job, per_job_grads, calls = step(False)
    assert calls and not any(calls)
    fused, fused_grads, calls = step(True)
    assert calls and all(calls)
    torch.testing.assert_close(fused, per_job, rtol=1e-5, atol=1e-6)
    for a, b in zip(fused_grads, per_job_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("norms", [(1.0, 0.5), (float("inf"), float("inf"))])
@pytest.mark.parametrize("foreach", [True, False])
def test_one_step_for_every_job_is_each_jobs_adamw(foreach, norms):
    """step_jobs (every ready job's clipping and AdamW as foreach kernels over all their tensors, a GPU's way; or
    each job's own fused step, a CPU's) moves each
    tensor as torch's clip_grad_norm_ + AdamW do, job by job: its own lr, weight decay and clipping, a tensor
    without a gradient at a step left as it is (its step count too), no clipping under infinite bounds; the state
    is torch's, and loads in it."""
    from vlstack.train.optim import step_jobs

    gen = torch.Generator().manual_seed(0)
    shapes = [[(5, 7), (3,)], [(4, 4)]]
    ours = [[torch.nn.Parameter(torch.randn(s, generator=gen)) for s in job] for job in shapes]
    ref = [[torch.nn.Parameter(p.detach().clone()) for p in job] for job in ours]
    settings = [dict(lr=1e-2, weight_decay=0.1), dict(lr=3e-3, weight_decay=0.0, betas=(0.8, 0.95))]
    opts = [torch.optim.AdamW(ps, **kw) for ps, kw in zip(ours, settings)]
    ref_opts = [torch.optim.AdamW(ps, **kw) for ps, kw in zip(ref, settings)]
    for step in range(6):
        for job, ref_job in zip(ours, ref):
            for i, (p, q) in enumerate(zip(job, ref_job)):
                g = None if (step == 2 and i == 1) else torch.randn(p.shape, generator=gen) * 5
                p.grad, q.grad = g, None if g is None else g.clone()
        for ps, opt, norm in zip(ref, ref_opts, norms):
            torch.nn.utils.clip_grad_norm_([p for p in ps if p.grad is not None], norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        step_jobs(opts, list(norms), foreach)
        for p, q in zip(sum(ours, []), sum(ref, [])):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
            assert p.grad is None
    assert int(opts[0].state[ours[0][1]]["step"]) == 5 and opts[0].state[ours[0][1]].get("host_step", 5) == 5
    fresh = torch.optim.AdamW(ref[0], **settings[0])
    fresh.load_state_dict(opts[0].state_dict())  # torch's own format
    torch.testing.assert_close(fresh.state[ref[0][0]]["exp_avg"], opts[0].state[ours[0][0]]["exp_avg"])


@pytest.mark.slow
def test_a_step_in_passes_gives_the_gradients_and_adapters_of_one_pass(tmp_path):
    """With max_tokens a step's rows go through the base in several passes, gradients adding up: the same
    gradients and losses as one pass (a job's rows split across passes included), and the same adapters."""
    from vlstack.train.multi import train_step
    from vlstack.train.running import start

    def step(max_tokens):
        vlm = vlstack.load("tiny", device="cpu")
        for p in vlm.model.parameters():
            p.requires_grad_(False)
        vlm.model.train()
        calls = []
        vlm.model.language_model.register_forward_pre_hook(lambda *_: calls.append(1))
        running = [start(vlm, j, read_dataset(j.data)) for j in selected]
        losses = train_step(vlm, running, max_tokens)
        return losses, {r.job.name: [p.grad.clone() for p in r.params] for r in running}, len(calls)

    selected = [j for j in jobs(tmp_path, "s") if j.name in ("finance", "support")]  # no dropout
    for j in selected:
        j.grad_accum = 2  # no optimizer step: the gradients stay
    one_loss, one_grads, one_calls = step(None)
    for max_tokens in (1, 1450):  # each row alone; rows [43, 877 | 494] [45]: two jobs, one split
        losses, grads, calls = step(max_tokens)
        assert one_calls == 1 and calls == (4 if max_tokens == 1 else 2)
        assert losses.tolist() == pytest.approx(one_loss.tolist(), rel=1e-5)
        for name in one_grads:
            for a, b in zip(one_grads[name], grads[name]):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    train(vlstack.load("tiny", device="cpu"), jobs(tmp_path, "whole"), max_rows=5, verbose=False)
    train(vlstack.load("tiny", device="cpu"), jobs(tmp_path, "parts"), max_rows=5, verbose=False, max_tokens=150)
    for name in ("finance", "legal", "support"):
        assert_same_adapter(adapter(tmp_path / "whole" / name), adapter(tmp_path / "parts" / name))


def test_dropout_masks_do_not_depend_on_how_a_step_is_split(tmp_path):
    """A row's LoRA dropout mask follows from its example, the layer and the adapter: each row in a pass of its
    own gives the gradients of one pass (language, vision and projector adapters, with images)."""
    from vlstack.train.multi import train_step
    from vlstack.train.running import start

    def grads(dropout, max_tokens):
        job = Job.of(
            "drop",
            write_dataset(tmp_path / "d", "drop", 6, True),
            tmp_path / "o" / "drop",
            rank=4,
            dropout=dropout,
            batch_size=4,
            grad_accum=2,
            steps=1,
            targets=["q_proj", "fc1", "linear_1"],
            parts=["language", "vision", "projector"],
            seed=5,
        )
        vlm = vlstack.load("tiny", device="cpu")
        for p in vlm.model.parameters():
            p.requires_grad_(False)
        vlm.model.train()
        r = start(vlm, job, read_dataset(job.data))
        with torch.no_grad():
            for p in r.params:  # B away from zero, so that A's gradient feels the masks too
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
        train_step(vlm, [r], max_tokens)
        return [p.grad.clone() for p in r.params]

    whole, split, plain = grads(0.3, None), grads(0.3, 1), grads(0.0, None)
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert max(rel_err(a, b) for a, b in zip(whole, plain)) > 0.05  # the masks are applied


def test_a_rows_dropout_mask_depends_on_its_key_alone():
    from vlstack.layers.lora_routing import Route

    def masks(rows, salt=11, tiles=False):
        routing = Route(keys=rows)
        total = sum(n for _, n in rows)
        xs = torch.ones(total, 16, 32) if tiles else torch.ones(total, 512)  # tiles [N, P, C] or tokens [T, C]
        mask = routing.dropout_mask(xs, 0, total, 0.25, salt)
        return dict(zip([k for k, _ in rows], mask.split([n for _, n in rows])))

    both = masks([(3, 100), (4, 80)])
    assert torch.equal(torch.cat(list(both.values())).unique(), torch.tensor([0.0, 1 / 0.75]))
    assert abs((torch.cat(list(both.values())) == 0).float().mean().item() - 0.25) < 0.01
    alone, swapped = masks([(4, 80)]), masks([(4, 80), (3, 100)])
    assert torch.equal(alone[4], both[4]) and torch.equal(swapped[3], both[3])  # wherever the row is
    assert (masks([(3, 100)], salt=12)[3] != both[3]).float().mean() > 0.3  # another layer or adapter
    assert (both[3][:80] != both[4]).float().mean() > 0.3  # another row
    tiles = masks([(7, 1), (8, 1)], tiles=True)  # a row per tile: [tiles, patches, width]
    assert tiles[7].shape == (1, 16, 32) and not torch.equal(tiles[7], tiles[8])


def test_metrics_every_log_every_steps_with_the_mean_loss(tmp_path):
    """log_every 2: a metrics line every second optimizer step and at the end, its loss the mean of the
    micro-steps since the line before (read back from the device then, not at every step)."""
    finance = jobs(tmp_path, "logged")[0]  # 3 steps of batch 2, grad_accum 1
    done = train(vlstack.load("tiny", device="cpu"), [finance], max_rows=5, verbose=False, log_every=2)
    lines = [json.loads(x) for x in (tmp_path / "logged" / "finance.train" / "metrics.jsonl").read_text().splitlines()]
    losses = done["finance"].losses  # every micro-step's
    assert [m["step"] for m in lines] == [2, 3] and len(losses) == 3 and not done["finance"].pending
    assert lines[0]["loss"] == pytest.approx(sum(losses[:2]) / 2) and lines[1]["loss"] == pytest.approx(losses[2])


@pytest.mark.slow
def test_gradient_checkpointing_recomputes_and_gives_the_same_adapters(tmp_path):
    """Recomputed layers see the routing and dropout masks of their forward: the same adapters (dropout,
    images and vision adapters included), while each decoder layer runs twice per step."""
    calls = []
    for out, checkpointing in (("kept", False), ("recomputed", True)):
        vlm = vlstack.load("tiny", device="cpu")
        hook = vlm.model.language_model.layers[0].register_forward_pre_hook(lambda *_, out=out: calls.append(out))
        train(vlm, jobs(tmp_path, out), max_rows=5, verbose=False, gradient_checkpointing=checkpointing)
        hook.remove()
        assert not vlm.model.language_model.checkpointing  # off again after training
    assert calls.count("recomputed") == 2 * calls.count("kept") > 0
    for name in ("finance", "legal", "support"):
        kept, recomputed = adapter(tmp_path / "kept" / name), adapter(tmp_path / "recomputed" / name)
        for key in kept:
            torch.testing.assert_close(kept[key], recomputed[key], rtol=1e-5, atol=1e-6)


def test_chunked_loss_equals_the_whole_batch_loss():
    """With recompute, the loss is taken a chunk of tokens at a time (logits of a 70k vocabulary: 239 tokens a
    chunk, 3 chunks here): the same losses and gradients as from the whole batch's logits at once."""
    from vlstack.train.losses import token_losses

    torch.manual_seed(0)
    head = torch.nn.Linear(32, 70_000, bias=False)
    targets = torch.randint(0, 70_000, (600,))
    results = []
    for recompute in (False, True):
        hidden = torch.randn(600, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
        losses = token_losses(head, hidden, targets, recompute)
        (losses * torch.linspace(0.5, 1, 600)).sum().backward()
        results.append((losses.detach(), hidden.grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
    assert results[0][1].abs().min() > 0  # every token got its gradient


def test_packed_step_equals_each_example_on_its_own(tmp_path):
    """A fused step packs every row back to back without padding; each job's loss and gradient equal
    those of its examples run one at a time through the ordinary forward (images, vision adapters)."""
    import torch.nn.functional as F

    from vlstack.train.data import Stream
    from vlstack.train.multi import train_step

    selected = [j for j in jobs(tmp_path, "p") if j.name in ("finance", "support")]  # no dropout
    for j in selected:
        j.grad_accum = 2  # no optimizer step: the gradients stay
    vlm, running = started(selected)
    losses = train_step(vlm, running)
    ref_vlm, ref_running = started(selected)
    for r, loss in zip(ref_running, losses):
        total, count = 0.0, 0
        for ex in Stream(read_dataset(r.job.data), r.job.batch_size, r.job.seed).next():
            enc = encode_example(ref_vlm.processor, ex, r.job.max_len)
            ids, labels = enc["input_ids"][None], enc["labels"][1:]
            logits = rows_forward(ref_vlm.model, ids, enc.get("pixel_values"), [r.job.name])[0, :-1]  # [T-1, V]
            learn = labels != -100
            total = total + F.cross_entropy(logits[learn], labels[learn], reduction="sum")
            count += int(learn.sum())
        (total / count / 2).backward()  # grad_accum 2
        assert abs(total.item() / count - float(loss)) < 1e-5
        fused = next(x for x in running if x.job.name == r.job.name)
        for a, b in zip(fused.params, r.params):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)
        assert all(b.grad.abs().max() > 0 for b in r.params[1::2])  # every B, vision and projector included


@pytest.mark.slow
def test_training_lowers_the_loss_and_the_adapter_works_in_peft(tmp_path):
    from peft import PeftModel
    from transformers import InternVLForConditionalGeneration

    from vlstack.tiny import tiny_dir

    job = Job.of(
        "one",
        write_dataset(tmp_path, "one", 3, True),
        tmp_path / "out",
        rank=8,
        alpha=16,
        batch_size=3,
        steps=25,
        lr=3e-2,
        schedule="constant",
    )
    vlm = vlstack.load("tiny", device="cpu")
    done = train(vlm, [job], max_rows=3, verbose=False)
    losses = done["one"].losses
    # the tiny model bounds its logits (tied embeddings of std 0.02): ~5.5 nats is near its floor
    assert losses[-1] < losses[0] - 1.0
    hf = InternVLForConditionalGeneration.from_pretrained(tiny_dir()).eval()
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "out").eval()
    vlm.load_adapter("one", tmp_path / "out")
    ex = read_dataset(job.data)[0]
    enc = encode_example(vlm.processor, ex, 4096)
    ids, pv = enc["input_ids"][None], enc["pixel_values"]
    with torch.no_grad():
        ref = peft_model(input_ids=ids, pixel_values=pv).logits
    ours = vlm(ids, pv, adapter="one")
    assert ((ours - ref).abs().max() / ref.abs().max()) <= 1e-4


def test_labels_cover_only_assistant_replies(tmp_path):
    vlm = vlstack.load("tiny", device="cpu")
    ex = read_dataset(write_dataset(tmp_path, "x", 1, True))[0]
    enc = encode_example(vlm.processor, ex, 4096)
    learned = enc["labels"][enc["labels"] != -100].tolist()
    assert vlm.processor.tokenizer.decode(learned, skip_special_tokens=False) == ANSWERS[0] + " (x)<|im_end|>\n"
    full = vlm.processor(ex.messages, [str(p) for p in ex.images])
    assert torch.equal(enc["input_ids"], full["input_ids"][0, : len(enc["input_ids"])])


def test_bad_dataset_lines_are_named_before_training(tmp_path):
    good = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    cases = [
        ("{not json", "not valid JSON"),
        (json.dumps({"conversations": []}), "non-empty 'conversations'"),
        (json.dumps({"conversations": [{"from": "robot", "value": "x"}]}), "role 'robot'"),
        (json.dumps({"conversations": [{"from": "human", "value": "hi"}]}), "no assistant turn"),
        (json.dumps({**good, "image": "missing.png"}), "image not found"),
        (
            json.dumps(
                {
                    **good,
                    "image": ["a.png"],
                    "conversations": [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}],
                }
            ),
            "image not found",
        ),
    ]
    for bad, message in cases:
        path = tmp_path / "d.jsonl"
        path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n" + bad + "\n")
        with pytest.raises(DatasetError, match=rf"d\.jsonl:3: .*{message}"):
            read_dataset(path)
    image(20, 20).save(tmp_path / "a.png")
    path.write_text(
        json.dumps(
            {
                **good,
                "image": ["a.png"],
                "conversations": [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "x"}],
            }
        )
        + "\n"
    )
    with pytest.raises(DatasetError, match=r"d\.jsonl:1: 2 <image> placeholders but 1 images"):
        read_dataset(path)
    job = Job.of("late", tmp_path / "ok.jsonl", tmp_path / "o", steps=1)
    (tmp_path / "ok.jsonl").write_text(json.dumps(good) + "\n")
    broken = Job.of("broken", path, tmp_path / "o2", steps=1)
    vlm = vlstack.load("tiny", device="cpu")
    with pytest.raises(DatasetError, match="placeholders"):
        train(vlm, [job, broken], max_rows=8, verbose=False)
    assert not (tmp_path / "o").exists()  # nothing trained before the bad file was found


def test_bad_job_files_are_named(tmp_path):
    def plan(text):
        path = tmp_path / "jobs.yaml"
        path.write_text(text)
        return read_plan(path)

    with pytest.raises(JobError, match="not valid YAML"):
        plan("jobs: [\n")
    with pytest.raises(JobError, match="non-empty 'jobs' list"):
        plan("model: tiny\n")
    with pytest.raises(JobError, match=r"job 1: missing the field 'output'"):
        plan("jobs:\n  - {name: a, data: a.jsonl, steps: 1}\n")
    with pytest.raises(JobError, match=r"job 1: unknown field\(s\) \['rnak'\]"):
        plan("jobs:\n  - {name: a, data: a.jsonl, output: o, steps: 1, rnak: 4}\n")
    with pytest.raises(JobError, match=r"job 1: field 'rank' = 'big' "):
        plan("jobs:\n  - {name: a, data: a.jsonl, output: o, steps: 1, rank: big}\n")
    with pytest.raises(JobError, match=r"\(a\): give exactly one of steps and epochs"):
        plan("jobs:\n  - {name: a, data: a.jsonl, output: o}\n")
    with pytest.raises(JobError, match="sharding must be fsdp"):
        plan("sharding: zero3\njobs:\n  - {name: a, data: a.jsonl, output: o, steps: 1}\n")
    with pytest.raises(JobError, match="parallel must be pipeline"):
        plan("parallel: tensor\njobs:\n  - {name: a, data: a.jsonl, output: o, steps: 1}\n")
    with pytest.raises(JobError, match="do not go together"):
        plan("sharding: fsdp\nparallel: pipeline\njobs:\n  - {name: a, data: a.jsonl, output: o, steps: 1}\n")
    with pytest.raises(JobError, match="job names must be unique"):
        plan("jobs:\n  - {name: a, data: a.jsonl, output: o, steps: 1}\n  - {name: a, data: b, output: p, steps: 1}\n")
    with pytest.raises(JobError, match="gradient_checkpointing must be true or false"):
        plan("gradient_checkpointing: sometimes\njobs:\n  - {name: a, data: a.jsonl, output: o, steps: 1}\n")
    p = plan("model: tiny\nmax_rows: 4\njobs:\n  - {name: a, data: d/a.jsonl, output: o/a, epochs: 2, lr: 1e-3}\n")
    assert p.max_rows == 4 and p.jobs[0].data == tmp_path / "d" / "a.jsonl" and p.jobs[0].epochs == 2.0
    assert not p.gradient_checkpointing
    p = plan("gradient_checkpointing: true\njobs:\n  - {name: a, data: a.jsonl, output: o, steps: 1}\n")
    assert p.gradient_checkpointing and p.max_tokens is None
    assert plan("max_tokens: 512\njobs:\n  - {name: a, data: a.jsonl, output: o, steps: 1}\n").max_tokens == 512
    for bad in ("0", "many", "true", "1.5"):
        with pytest.raises(JobError, match="max_tokens must be a positive integer"):
            plan(f"max_tokens: {bad}\njobs:\n  - {{name: a, data: a.jsonl, output: o, steps: 1}}\n")


@pytest.mark.slow
def test_cli_train_and_merge(tmp_path):
    write_dataset(tmp_path, "fin", 4, True)
    write_dataset(tmp_path, "law", 4, False)
    (tmp_path / "jobs.yaml").write_text(
        "model: tiny\ngradient_checkpointing: true\njobs:\n"
        "  - {name: fin, data: fin.jsonl, output: out/fin, rank: 4, batch_size: 2, steps: 2}\n"
        "  - {name: law, data: law.jsonl, output: out/law, rank: 2, batch_size: 2, steps: 3}\n"
    )
    run = run_cli("train", str(tmp_path / "jobs.yaml"), "--watch")
    assert run.returncode == 0, run.stderr
    assert "[fin] step 2/2" in run.stderr and "[law] step 3/3" in run.stderr
    assert f"law: adapter written to {tmp_path / 'out' / 'law'}" in run.stdout
    assert (tmp_path / "out" / "fin" / "adapter_config.json").is_file()
    run = run_cli("merge", "--adapter", str(tmp_path / "out" / "law"), "--output", str(tmp_path / "merged"))
    assert run.returncode == 0, run.stderr
    merged = vlstack.load(tmp_path / "merged", device="cpu")
    base = vlstack.load("tiny", device="cpu")
    base.load_adapter("law", tmp_path / "out" / "law")
    ids = torch.tensor([[1, 300, 400, 500, 2, 7]])
    assert ((merged(ids) - base(ids, adapter="law")).abs().max() / base(ids).abs().max()) <= 1e-5
    bad = run_cli("train", str(tmp_path / "nope.yaml"))
    assert bad.returncode == 2 and "jobs file not found" in bad.stderr and "Traceback" not in bad.stderr
    bad = run_cli("train", str(tmp_path / "jobs.yaml"), "--watch", "--sequential")
    assert bad.returncode == 2 and "does not go with --sequential" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_resume_after_kill_gives_the_same_adapters(tmp_path):
    """SIGKILL a fused run mid-way, resume it, and end with the adapters of an uninterrupted run."""
    import signal
    import time

    write_dataset(tmp_path, "fin", 6, False)
    write_dataset(tmp_path, "law", 5, False, 1)

    def jobs_file(out: str) -> str:
        path = tmp_path / f"{out}.yaml"
        path.write_text(
            "model: tiny\njobs:\n"
            f"  - {{name: fin, data: fin.jsonl, output: {out}/fin, rank: 4, batch_size: 2, steps: 24, save_every: 1,"
            " lr: 1e-2}\n"
            f"  - {{name: law, data: law.jsonl, output: {out}/law, rank: 2, batch_size: 1, grad_accum: 2, steps: 18,"
            " save_every: 3, dropout: 0.1, lr: 1e-2}\n"
        )
        return str(path)

    full = run_cli("train", jobs_file("full"))
    assert full.returncode == 0, full.stderr
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlstack.cli", "train", jobs_file("cut")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = tmp_path / "cut" / "law.train" / "checkpoint" / "state.pt"
    deadline = time.time() + 120
    while not state.is_file() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (tmp_path / "cut" / "law").exists()  # killed before the end
    resumed = run_cli("train", jobs_file("cut"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    first = [line for line in resumed.stderr.splitlines() if line.startswith("[law] step ")][0]
    assert not first.startswith("[law] step 1/")  # it continued rather than starting over
    for name in ("fin", "law"):
        assert_same_adapter(adapter(tmp_path / "full" / name), adapter(tmp_path / "cut" / name))
    metrics = [json.loads(x) for x in (tmp_path / "cut" / "law.train" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 19))  # steps after the checkpoint recorded once
    from PIL import Image

    assert Image.open(tmp_path / "cut" / "fin.train" / "loss.png").size == (640, 360)


def one_and_two(tmp_path, top: str, fin: str = "", law: str = "", *args: str):
    """The same two jobs (images, LoRA dropout on the language and vision parts, gradient accumulation) trained by
    one process and by two under torchrun with `top` in the jobs file: asserts the adapters agree; returns the
    two-process run."""
    write_dataset(tmp_path, "fin", 6, True)
    write_dataset(tmp_path, "law", 4, False, 1)
    for out, options in (("one", ""), ("two", top)):
        (tmp_path / f"{out}.yaml").write_text(
            f"model: tiny\n{options}jobs:\n"
            f"  - {{name: fin, data: fin.jsonl, output: {out}/fin, rank: 4, steps: 3, lr: 1e-2, dropout: 0.2{fin}}}\n"
            f"  - {{name: law, data: law.jsonl, output: {out}/law, rank: 2, grad_accum: 2, steps: 2, lr: 1e-2, "
            f"parts: [language, vision], dropout: 0.3{law}}}\n"
        )
    one = run_cli("train", str(tmp_path / "one.yaml"))
    assert one.returncode == 0, one.stderr
    two = run_cli("train", str(tmp_path / "two.yaml"), *args, processes=2)
    assert two.returncode == 0, two.stderr
    for name in ("fin", "law"):
        assert_same_adapter(adapter(tmp_path / "one" / name), adapter(tmp_path / "two" / name))
    return two


@pytest.mark.slow
def test_two_processes_give_the_adapters_of_one(tmp_path):
    """torchrun with 2 CPU processes (gloo), each taking half of every job's rows (in passes of at most 64
    tokens: about a row each) = 1 process in one pass, LoRA dropout (language and vision) included."""
    two = one_and_two(
        tmp_path, "max_tokens: 64\n", ", batch_size: 2", ", batch_size: 4, targets: [q_proj, fc1]", "--watch"
    )  # (every step asks rank 0)
    assert two.stdout.count("fin: adapter written") == 2  # both processes ran the jobs
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: tiny\njobs:\n  - {name: x, data: law.jsonl, output: o/x, batch_size: 3, steps: 1}\n")
    run = run_cli("train", str(bad), processes=2)
    assert run.returncode != 0 and "batch_size 3 is not a multiple of 2 processes" in run.stderr


@pytest.mark.slow
def test_sharded_training_gives_the_adapters_of_one_process(tmp_path):
    """sharding: fsdp under torchrun (2 gloo processes): the base and the adapters split by FSDP2, rows shared
    out as in data parallelism; the adapters written once, in PEFT's format, equal to one process's (LoRA dropout,
    gradient accumulation, a vision adapter, gradient checkpointing included)."""
    one_and_two(
        tmp_path,
        "sharding: fsdp\ngradient_checkpointing: true\n",
        ", batch_size: 2",
        ", batch_size: 4, targets: [q_proj, fc1, down_proj]",
    )
    alone = run_cli("train", str(tmp_path / "two.yaml"))
    assert alone.returncode != 0 and "sharding: fsdp splits the base over processes" in alone.stderr


@pytest.mark.slow
def test_pipelined_training_gives_the_adapters_of_one_process(tmp_path):
    """parallel: pipeline under torchrun (2 gloo processes, 2 decoder layers each): each job's rows a pass through
    the stages, activations and their gradients sent between them; the adapters equal the fused one-process run's
    (a vision adapter trained on the first stage, LoRA dropout, gradient accumulation, clipping by each job's norm
    over both stages, gradient checkpointing), fin distilling a teacher (run whole on the last stage, encoding
    fin's images itself)."""
    from vlstack.train.pipeline import bubble, split

    teacher = vlstack.load("tiny", device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in teacher.model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    teacher.save(tmp_path / "teacher")
    one_and_two(
        tmp_path,
        "parallel: pipeline\ngradient_checkpointing: true\n",
        ", batch_size: 3, max_grad_norm: 0.05, teacher: teacher, temperature: 2.0",
        ", batch_size: 2, targets: [q_proj, fc1, down_proj]",
    )
    assert split(4, 2) == [range(0, 2), range(2, 4)] and split(5, 2) == [range(0, 3), range(3, 5)]
    assert bubble(2, 2) == 1 / 3 and bubble(4, 12) == 3 / 15


def test_a_split_run_refuses_what_it_cannot_do():
    """parallel: pipeline and sharding: fsdp need 2+ processes, and name each option they do not go with."""
    from vlstack.train.multi import check_split

    job = Job.of(name="a", data="unused.jsonl", output="o", steps=1)
    for mode in ("pipeline", "fsdp"):
        with pytest.raises(JobError, match="launch it with torchrun"):
            options = {"parallel": "pipeline"} if mode == "pipeline" else {"sharding": "fsdp"}
            train(vlstack.load("tiny", device="cpu"), [job], 8, **options)
    with pytest.raises(JobError, match=r"^sharding: fsdp does not go with --resume, --watch \(yet\)$"):
        check_split("sharding: fsdp", 2, {"--resume": True, "max_tokens": None, "--watch": True})
    check_split("parallel: pipeline", 2, {"--resume": False, "max_tokens": None})  # nothing given: no error


def test_a_pipeline_stage_holds_only_its_part_of_the_base():
    from vlstack.train.pipeline import Pipe, keep_stage, split

    def held(model) -> int:  # bytes of distinct storage
        return sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}.values())

    whole = held(vlstack.load("tiny", device="cpu").model)
    parts = []
    for rank in range(2):
        vlm = vlstack.load("tiny", device="cpu")
        keep_stage(vlm.model, Pipe(rank, 2, split(4, 2)[rank], split(4, 2)))
        parts.append(held(vlm.model))
        lm = vlm.model.language_model
        mine, others = (lm.layers[:2], lm.layers[2:]) if rank == 0 else (lm.layers[2:], lm.layers[:2])
        assert all(p.stride() != (0,) * p.dim() for layer in mine for p in layer.parameters())
        assert all(p.stride() == (0,) * p.dim() for layer in others for p in layer.parameters())
        vision = [p.stride() == (0,) * p.dim() for p in vlm.model.vision_tower.parameters()]
        assert all(vision) if rank == 1 else not any(vision)
    assert max(parts) < 0.8 * whole and sum(parts) < 1.3 * whole  # (the tied embedding is on both ends)


@pytest.mark.slow
def test_a_full_job_trains_every_weight_into_a_checkpoint_transformers_loads(tmp_path):
    """full: true trains the model itself (no adapter): the loss falls far, every part of the model moves, the
    output is a whole checkpoint that transformers loads with our logits, and the built-in tiny model stays
    the random one."""
    from transformers import InternVLForConditionalGeneration

    job = Job.of(
        "base",
        write_dataset(tmp_path, "d", 4, True),
        tmp_path / "trained",
        batch_size=4,
        steps=30,
        lr=3e-3,
        schedule="constant",
        full=True,
    )
    vlm = vlstack.load("tiny", device="cpu")
    before = {k: v.clone() for k, v in vlm.model.state_dict().items()}
    losses = train(vlm, [job], max_rows=4, verbose=False)["base"].losses
    assert losses[-1] < losses[0] - 3.0  # (an adapter of the same steps gains about 1 nat: above)
    moved = {k.split(".")[0] for k, v in vlm.model.state_dict().items() if not torch.equal(v, before[k])}
    assert moved == {"vision_tower", "multi_modal_projector", "language_model", "lm_head"}
    assert not any(p.requires_grad for p in vlm.model.parameters())
    trained = vlstack.load(tmp_path / "trained", device="cpu")
    hf = InternVLForConditionalGeneration.from_pretrained(tmp_path / "trained").eval()
    enc = encode_example(trained.processor, read_dataset(job.data)[0], 4096)
    ids, pv = enc["input_ids"][None], enc["pixel_values"]
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pv).logits
    assert rel_err(trained(ids, pv), ref) <= 1e-4 and rel_err(vlm(ids, pv), ref) <= 1e-4
    fresh = vlstack.load("tiny", device="cpu").model.state_dict()
    assert all(torch.equal(fresh[k], before[k]) for k in before)


def test_a_full_job_trains_the_parts_it_names_and_only_those(tmp_path):
    """A full job trains all three parts unless it names some (parts: [language, projector] leaves the vision
    tower as it was: InternVL's frozen-backbone fine-tuning); its checkpoint resumes only a job of the same parts."""
    data = write_dataset(tmp_path, "d", 4, True)
    (tmp_path / "jobs.yaml").write_text(
        f"jobs:\n  - {{name: base, data: {data}, output: out/base, steps: 3, batch_size: 4, lr: 3.0e-3, full: true,"
        " parts: [language, projector]}\n"
    )
    (tmp_path / "all.yaml").write_text(f"jobs:\n  - {{name: b, data: {data}, output: b, full: true, steps: 1}}\n")
    assert read_plan(tmp_path / "all.yaml").jobs[0].lora.parts == ("language", "projector", "vision")
    job = read_plan(tmp_path / "jobs.yaml").jobs[0]
    assert shape_of(job) != shape_of(read_plan(tmp_path / "all.yaml").jobs[0])
    vlm = vlstack.load("tiny", device="cpu")
    before = {k: v.clone() for k, v in vlm.model.state_dict().items()}
    train(vlm, [job], max_rows=4, verbose=False)
    moved = {k.split(".")[0] for k, v in vlm.model.state_dict().items() if not torch.equal(v, before[k])}
    assert moved == {"multi_modal_projector", "language_model", "lm_head"}
    saved = vlstack.load(tmp_path / "out/base", device="cpu").model.state_dict()
    assert all(torch.equal(saved[k], before[k]) for k in before if k.startswith("vision_tower."))


def test_a_full_job_gives_a_part_its_own_learning_rate(tmp_path):
    """part_lr: the vision tower stepped at 1e-6 while the rest is at 1e-2 (AdamW moves a weight by about its
    learning rate a step); only a full job has it, and only for parts it trains."""
    data = write_dataset(tmp_path, "d", 4, True)
    job = Job.of("base", data, tmp_path / "out", batch_size=4, steps=2, lr=1e-2, full=True, part_lr={"vision": 1e-6})
    vlm = vlstack.load("tiny", device="cpu")
    before = {k: v.clone() for k, v in vlm.model.state_dict().items()}
    train(vlm, [job], max_rows=4, verbose=False)
    moved = {k: (v - before[k]).abs().max().item() for k, v in vlm.model.state_dict().items()}
    vision = max(d for k, d in moved.items() if k.startswith("vision_tower."))
    language = max(d for k, d in moved.items() if k.startswith("language_model."))
    assert 0 < vision <= 3e-6 and language >= 1e-2
    for extra, message in [
        ("part_lr: {vision: 1.0e-4}", "part_lr is for a job with full: true"),
        ("full: true, parts: [language], part_lr: {vision: 1.0e-4}", "part_lr names a part"),
        ("full: true, parts: [language], part_lr: {vision_tower.encoder: 1.0e-4}", "part_lr names a part"),
        ("full: true, part_lr: {eyes: 1.0e-4}", "must map some of"),
        ("full: true, part_lr: {'vision tower': 1.0e-4}", "must map some of"),
    ]:
        (tmp_path / "jobs.yaml").write_text(f"jobs:\n  - {{name: b, data: {data}, output: b, steps: 1, {extra}}}\n")
        with pytest.raises(JobError, match=message):
            read_plan(tmp_path / "jobs.yaml")


def test_part_lr_keys_may_be_prefixes_of_weights_names(tmp_path):
    """A part_lr key may be a prefix of weights' names: the longest key that matches a weight gives its rate (the
    patch embedding at 1e-2 inside a vision tower at 1e-6), and a prefix that names no weight is refused."""
    data = write_dataset(tmp_path, "d", 4, True)
    rates = {"vision": 1e-6, "vision_tower.embeddings": 1e-2}
    job = Job.of("base", data, tmp_path / "out", batch_size=4, steps=2, lr=1e-3, full=True, part_lr=rates)
    vlm = vlstack.load("tiny", device="cpu")
    before = {k: v.clone() for k, v in vlm.model.state_dict().items()}
    train(vlm, [job], max_rows=4, verbose=False)
    moved = {k: (v - before[k]).abs().max().item() for k, v in vlm.model.state_dict().items()}
    patch = moved["vision_tower.embeddings.patch_embeddings.projection.weight"]
    encoder = max(d for k, d in moved.items() if k.startswith("vision_tower.encoder."))
    assert patch >= 1e-2 and 0 < encoder <= 3e-6
    job = Job.of("base", data, tmp_path / "out2", batch_size=4, steps=1, full=True, part_lr={"vision_tower.eyes": 1e-4})
    with pytest.raises(JobError, match="no weight's name starts with 'vision_tower.eyes'"):
        train(vlstack.load("tiny", device="cpu"), [job], max_rows=4, verbose=False)


def test_a_full_job_runs_alone(tmp_path):
    data = write_dataset(tmp_path, "d", 2, False)
    (tmp_path / "jobs.yaml").write_text(
        f"jobs:\n  - {{name: base, data: {data}, output: out/base, steps: 1, full: true}}\n"
        f"  - {{name: other, data: {data}, output: out/other, steps: 1}}\n"
    )
    with pytest.raises(JobError, match="full: true trains the base itself.*runs alone"):
        read_plan(tmp_path / "jobs.yaml")
