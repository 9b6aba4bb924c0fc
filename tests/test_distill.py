"""Distillation (compress/distill.py, a training job with a teacher): the loss is T² KL(teacher || student) by
hand, a student that is its teacher has nothing to learn, a pruned student moves toward its teacher, and an
interrupted distillation resumes to the weights of an uninterrupted one."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import write_hf_checkpoint
from test_train import write_dataset

import vlstack
from vlstack.compress import compress, read_stages
from vlstack.compress.distill import DistillConfig, distill
from vlstack.train import multi
from vlstack.train.losses import token_losses

SHAPE = dict(tile=56, width=64, layers=4, heads=4, kv_heads=2, tied=False)


def test_the_loss_is_temperature_squared_kl_by_hand():
    """... plus, where asked, the weighted mean squared difference of the final hidden states."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    hidden, targets = torch.randn(5, 8), torch.randint(0, 11, (5,))
    teacher = torch.randn(5, 11) * 3
    distilled = torch.tensor([True, True, False, True, False])
    temp = torch.tensor([2.0, 1.0, 1.0, 0.5, 1.0])
    their_hidden, weight = torch.randn(5, 8), torch.tensor([0.5, 0.0, 0.0, 2.0, 0.0])
    for recompute in (False, True):
        got = token_losses(head, hidden, targets, recompute, (teacher, distilled, temp, their_hidden, weight))
        for i in range(5):
            s = head(hidden[i])
            if distilled[i]:
                p, q = F.softmax(teacher[i] / temp[i], -1), F.log_softmax(s / temp[i], -1)
                mse = ((hidden[i] - their_hidden[i]) ** 2).mean()
                want = temp[i] ** 2 * (p * (p.log() - q)).sum() + weight[i] * mse
            else:
                want = F.cross_entropy(s[None], targets[i : i + 1])
            torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    write_hf_checkpoint(root / "base", **SHAPE)
    return root / "base", write_dataset(root / "data", "d", 6, True)


def test_a_student_that_is_its_teacher_has_nothing_to_learn(base, tmp_path):
    directory, data = base
    student, teacher = vlstack.load(directory, device="cpu"), vlstack.load(directory, device="cpu")
    cfg = DistillConfig(data=str(data), steps=1, batch_size=2, lr=1e-3).check()  # (the loss before any update)
    seen = []
    real = multi.train_step
    multi.train_step = lambda *a, **k: seen.append(float(real(*a, **k)[0])) or torch.tensor([seen[-1]])
    try:
        distill(student, cfg, teacher.model, tmp_path / "work")
    finally:
        multi.train_step = real
    assert len(seen) == 1 and abs(seen[0]) < 1e-5  # (cross-entropy would be ~7 nats here)


def kl_to(teacher, student, examples) -> float:
    from vlstack.layers.step import packed_step

    total = 0.0
    with torch.no_grad():
        for x in examples:
            step = packed_step([len(x["input_ids"])], "cpu")
            a = teacher(x["input_ids"], step, x.get("pixel_values"))
            b = student(x["input_ids"], step, x.get("pixel_values"))
            total += float(F.kl_div(F.log_softmax(b, -1), F.log_softmax(a, -1), log_target=True, reduction="batchmean"))
    return total / len(examples)


def test_a_pruned_student_moves_toward_its_teacher(base, tmp_path):
    from vlstack.compress.prune import calibration

    directory, data = base
    stages = {
        "stages": [
            {"prune": {"mlp": 0.5, "hidden": 0.75, "data": str(data), "samples": 4}},
            {"distill": {"data": str(data), "steps": 8, "batch_size": 3, "lr": 3e-3}},
        ]
    }
    (tmp_path / "c.yaml").write_text(json.dumps(stages))
    teacher = vlstack.load(directory, device="cpu")
    examples = calibration(teacher, read_stages(tmp_path / "c.yaml")[0][1])
    (tmp_path / "p.yaml").write_text(json.dumps({"stages": stages["stages"][:1]}))
    pruned = vlstack.load(
        compress(vlstack.load(directory, device="cpu"), read_stages(tmp_path / "p.yaml"), tmp_path / "pruned"),
        device="cpu",
    )
    out = compress(vlstack.load(directory, device="cpu"), read_stages(tmp_path / "c.yaml"), tmp_path / "out")
    distilled = vlstack.load(out, device="cpu")
    before, after = kl_to(teacher.model, pruned.model, examples), kl_to(teacher.model, distilled.model, examples)
    assert after < 0.85 * before, (before, after)  # (it learns the answers; KL here is over every token)
    assert (out / "distill-loss.png").is_file() and not (tmp_path / "out.distill").exists()


def test_an_interrupted_distillation_resumes(base, tmp_path, monkeypatch):
    directory, data = base
    stages = [
        {"prune": {"mlp": 0.5, "data": str(data), "samples": 2}},
        {"distill": {"data": str(data), "steps": 4, "batch_size": 2, "lr": 3e-3}},
    ]
    (tmp_path / "c.yaml").write_text(json.dumps({"stages": stages}))
    whole = compress(vlstack.load(directory, device="cpu"), read_stages(tmp_path / "c.yaml"), tmp_path / "whole")
    real, calls = multi.train_step, []

    def dies_at_the_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(multi, "train_step", dies_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        compress(vlstack.load(directory, device="cpu"), read_stages(tmp_path / "c.yaml"), tmp_path / "out")
    assert not (tmp_path / "out").exists() and (tmp_path / "out.distill.train" / "checkpoint" / "state.pt").is_file()
    monkeypatch.setattr(multi, "train_step", real)
    out = compress(
        vlstack.load(directory, device="cpu"), read_stages(tmp_path / "c.yaml"), tmp_path / "out", resume=True
    )
    from safetensors.torch import load_file

    a, b = load_file(whole / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_teacher_and_student_share_the_image_features_when_their_vision_is_the_same(base, tmp_path, monkeypatch):
    """MLP-only pruning leaves the vision tower and projector as they were: with a LoRA student (its vision
    untouched) the images are encoded once for both, and the adapter is the one of each encoding its own."""
    from safetensors.torch import load_file

    from vlstack.compress.prune import PruneConfig, calibration, importance, prune

    directory, data = base
    adapters = {}
    for share in (True, False):
        teacher = vlstack.load(directory, device="cpu")
        student = vlstack.load(directory, device="cpu")
        cfg = PruneConfig(mlp=0.5, data=str(data), samples=2)
        prune(student, cfg, importance(student, calibration(student, cfg)))
        calls = []
        hook = teacher.model.vision_tower.register_forward_hook(lambda *a, calls=calls: calls.append(1))
        if not share:
            monkeypatch.setattr(multi, "shared_features", lambda *a: None)
        distill(
            student,
            DistillConfig(data=str(data), steps=3, batch_size=2, lr=1e-2, full=False, rank=4).check(),
            teacher.model,
            tmp_path / f"work{share}",
        )
        hook.remove()
        monkeypatch.undo()
        assert (len(calls) == 0) == share  # shared: the teacher never encoded an image
        adapters[share] = load_file(tmp_path / f"work{share}" / "adapter_model.safetensors")
    assert adapters[True].keys() == adapters[False].keys()
    for key in adapters[True]:
        torch.testing.assert_close(adapters[True][key], adapters[False][key], rtol=1e-4, atol=1e-5)


def test_hidden_state_distillation_needs_the_same_width(base, tmp_path):
    from vlstack.compress.prune import PruneConfig, calibration, importance, prune
    from vlstack.train.jobs import JobError

    directory, data = base
    teacher, student = vlstack.load(directory, device="cpu"), vlstack.load(directory, device="cpu")
    cfg = PruneConfig(hidden=0.75, data=str(data), samples=2)
    prune(student, cfg, importance(student, calibration(student, cfg)))
    with pytest.raises(JobError, match=r"hidden-state distillation needs the teacher's width \(64\)"):
        distill(
            student, DistillConfig(data=str(data), steps=1, hidden_weight=1.0).check(), teacher.model, tmp_path / "work"
        )
