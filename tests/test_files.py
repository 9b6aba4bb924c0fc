"""Nothing a user does loses their files: writes replace only the files of what is saved, a crash between
writing and renaming leaves the old files whole, and training refuses outputs that clash with its inputs."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file
from test_train import jobs, write_dataset

import vlstack
from vlstack.checkpoint import INDEX, SINGLE, save_checkpoint
from vlstack.cli import main
from vlstack.errors import ConfigError
from vlstack.layers.lora import LoRASpec, add_adapter
from vlstack.train.jobs import Job, JobError
from vlstack.train.multi import train


def _others(directory):
    """Files a user keeps beside what vlstack writes: one at the top, an adapter in a subdirectory."""
    (directory / "finance").mkdir(parents=True)
    (directory / "finance" / "adapter_model.safetensors").write_bytes(b"the user's adapter")
    (directory / "notes.txt").write_text("keep me")


def _kept(directory) -> bool:
    return (directory / "finance" / "adapter_model.safetensors").read_bytes() == b"the user's adapter" and (
        directory / "notes.txt"
    ).read_text() == "keep me"


def test_save_into_a_non_empty_directory_keeps_other_files(tmp_path):
    out = tmp_path / "out"
    _others(out)
    vlm = vlstack.load("tiny", device="cpu")
    vlm.save(out)
    assert _kept(out)
    again = vlstack.load(out, device="cpu")
    ids = torch.tensor([[1, 300, 400, 2]])
    assert torch.equal(again(ids), vlm(ids))
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_sharded_save_then_a_single_file_save_leaves_one_layout(tmp_path):
    state = {"a": torch.ones(1000), "b": torch.zeros(1000)}
    save_checkpoint(tmp_path, state, {"v": 1}, max_shard_bytes=4000)
    assert (tmp_path / INDEX).is_file() and not (tmp_path / SINGLE).exists()
    (tmp_path / "model-00009-of-00009.bin").write_text("not ours: a different pattern")
    save_checkpoint(tmp_path, state, {"v": 2})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["config.json", "model-00009-of-00009.bin", SINGLE]


def test_a_crash_between_writing_and_renaming_keeps_every_old_file(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _others(out)
    vlm = vlstack.load("tiny", device="cpu")
    vlm.save(out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    with torch.no_grad():
        vlm.model.lm_head.weight.add_(1)
    real = os.replace

    def crash(src, dst):  # the first file is renamed, then the process "dies"
        real(src, dst)
        monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        vlm.save(out)
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert _kept(out) and after.keys() == before.keys()  # no temporary file left, none lost
    assert after["config.json"] == before["config.json"]  # renamed last: the old config still stands


def test_an_adapter_saved_over_another_is_replaced_file_by_file(tmp_path, monkeypatch):
    vlm = vlstack.load("tiny", device="cpu")
    add_adapter(vlm.model, "a", LoRASpec(rank=2, targets=("q_proj",)), seed=0)
    (tmp_path / "README.md").write_text("model card")
    from vlstack.adapters import save_adapter

    save_adapter(vlm.model, "a", tmp_path, LoRASpec(rank=2, targets=("q_proj",)))
    first = load_file(tmp_path / "adapter_model.safetensors")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(ConfigError, match="No space left on device"):
        save_adapter(vlm.model, "a", tmp_path, LoRASpec(rank=2, targets=("q_proj",)))
    monkeypatch.undo()
    assert load_file(tmp_path / "adapter_model.safetensors").keys() == first.keys()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.slow
def test_merge_into_the_current_directory_keeps_its_files_and_refuses_the_base(tmp_path):
    write_dataset(tmp_path, "fin", 2, False)
    (tmp_path / "jobs.yaml").write_text("jobs:\n  - {name: fin, data: fin.jsonl, output: fin, rank: 2, steps: 1}\n")
    assert main(["train", str(tmp_path / "jobs.yaml")]) == 0
    here = tmp_path / "here"
    _others(here)
    run = run_cli("merge", "--adapter", str(tmp_path / "fin"), "--output", ".", cwd=here)
    assert run.returncode == 0, run.stderr
    assert _kept(here) and (here / SINGLE).is_file()
    run = run_cli("merge", "--model", str(here), "--adapter", str(tmp_path / "fin"), "--output", str(here))
    assert run.returncode == 2 and "is the base model's own directory" in run.stderr, run.stderr


def _run(tmp_path, jobs_list, model="tiny"):
    return train(vlstack.load(model, device="cpu"), jobs_list, max_rows=8, verbose=False)


def test_training_refuses_outputs_that_clash(tmp_path):
    js = jobs(tmp_path, "out")[:2]
    data = js[0].data.parent
    same = [js[0], Job.of("legal", js[1].data, js[0].output, steps=1)]
    with pytest.raises(JobError, match=r"job 'finance'.s output .* overlaps job 'legal'.s output"):
        _run(tmp_path, same)
    inside = [js[0], Job.of("legal", js[1].data, js[0].output / "sub", steps=1)]
    with pytest.raises(JobError, match="overlaps"):
        _run(tmp_path, inside)
    with pytest.raises(JobError, match=r"holds job 'finance'.s dataset file .*finance\.jsonl"):
        _run(tmp_path, [Job.of("finance", js[0].data, data, steps=1)])
    image_dir = [
        Job.of("legal", js[1].data, tmp_path / "out" / "legal", steps=1),
        Job.of("finance", js[0].data, data, steps=1),
    ]
    with pytest.raises(JobError, match="dataset file"):
        _run(tmp_path, image_dir)
    vlstack.load("tiny", device="cpu").save(tmp_path / "base")
    with pytest.raises(JobError, match="overlaps the base model's directory"):
        _run(tmp_path, [Job.of("finance", js[0].data, tmp_path / "base", steps=1)], model=tmp_path / "base")
    assert not (tmp_path / "out").exists()  # refused before any work


def test_a_fresh_run_removes_only_the_files_an_earlier_run_wrote(tmp_path):
    job = Job.of(
        "fin",
        write_dataset(tmp_path, "fin", 2, False),
        tmp_path / "out" / "fin",
        rank=2,
        steps=1,
        batch_size=1,
        save_every=1,
    )
    _run(tmp_path, [job])
    run_dir = tmp_path / "out" / "fin.train"
    assert (run_dir / "checkpoint" / "state.pt").is_file() and (run_dir / "metrics.jsonl").is_file()
    (run_dir / "mine.txt").write_text("keep")
    (tmp_path / "out" / "fin" / "card.md").write_text("keep")
    _run(tmp_path, [job])
    assert (run_dir / "mine.txt").read_text() == "keep" and (tmp_path / "out" / "fin" / "card.md").is_file()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1  # the earlier run's line is gone
