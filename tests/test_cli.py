"""The `vlstack` command as a user runs it: a subprocess, the tiny model by default."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import image
from conftest import run_cli as run


@pytest.mark.slow
def test_chat_answers_about_an_image_with_the_tiny_model(tmp_path):
    path = tmp_path / "page.png"
    image(640, 480).save(path)
    out = run("chat", "--image", str(path), "--max-new-tokens", "8", "What is on this page?")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    import vlstack

    expected = vlstack.load("tiny", device="cpu").chat("What is on this page?", images=str(path), max_new_tokens=8)
    assert out.stdout == expected + "\n"


@pytest.mark.slow
def test_info_reports_architecture_and_counts():
    out = run("info")
    assert out.returncode == 0, out.stderr
    assert "image tokens per tile  64" in out.stdout
    assert "parameters: total" in out.stdout and "Qwen2" in out.stdout


@pytest.mark.slow
def test_errors_are_one_line_not_tracebacks(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    out = run("chat", "--image", str(bad), "hello")
    assert out.returncode == 2
    assert out.stderr.startswith("vlstack: error: could not decode image") and "Traceback" not in out.stderr
    out = run("info", str(tmp_path))
    assert out.returncode == 2 and "has no config.json" in out.stderr and "Traceback" not in out.stderr


# Each bad input a user can give the command line: a one-line error naming it, exit status 2, no traceback,
# and no work done before it is found.


def _fails(capsys, argv: list[str], message: str) -> None:
    from vlstack.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlstack: error: ") and message in err and "Traceback" not in err, err


def _jobs(tmp_path, job: str = "", lines: int = 4) -> str:
    import json

    (tmp_path / "d.jsonl").write_text(
        "".join(
            json.dumps({"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "a"}]}) + "\n"
            for i in range(lines)
        )
    )
    (tmp_path / "jobs.yaml").write_text(
        "jobs:\n  - {name: fin, data: d.jsonl, output: out/fin, rank: 2, batch_size: 1, steps: 2, save_every: 1"
        + job
        + "}\n"
    )
    return str(tmp_path / "jobs.yaml")


@pytest.mark.slow
def test_version():
    out = run("--version")
    project = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert out.returncode == 0 and f'version = "{out.stdout.split()[1]}"' in project  # one version, two places


@pytest.mark.slow
def test_audit_log_that_cannot_be_written(tmp_path):
    out = run("serve", "--audit", "/proc/no/such/audit.jsonl", "--port", "1")
    assert out.returncode == 2 and "the audit log /proc/no/such/audit.jsonl cannot be written" in out.stderr
    assert "Traceback" not in out.stderr


def test_cuda_without_a_gpu(capsys):
    import torch

    if torch.cuda.is_available():
        _fails(capsys, ["chat", "--device", "cuda:99", "hi"], "CUDA GPU(s)")
    else:
        _fails(capsys, ["chat", "--device", "cuda", "hi"], "has no CUDA GPU")
    _fails(capsys, ["chat", "--device", "tpu0", "hi"], "is not a device")


def test_resume_after_changing_a_jobs_rank(tmp_path, capsys):
    from vlstack.cli import main

    jobs = _jobs(tmp_path)
    assert main(["train", jobs]) == 0
    capsys.readouterr()
    jobs = _jobs(tmp_path, ", rank: 4")
    _fails(capsys, ["train", jobs, "--resume"], "job 'fin': its checkpoint")


def test_resume_with_a_corrupt_checkpoint(tmp_path, capsys):
    from vlstack.cli import main

    jobs = _jobs(tmp_path)
    assert main(["train", jobs]) == 0
    capsys.readouterr()
    state = tmp_path / "out" / "fin.train" / "checkpoint" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    _fails(capsys, ["train", jobs, "--resume"], f"the checkpoint {state} cannot be read")


def test_a_dataset_that_is_not_utf8(tmp_path, capsys):
    jobs = _jobs(tmp_path)
    with open(tmp_path / "d.jsonl", "ab") as f:
        f.write(b'{"conversations": "\xff\xfe"}\n')
    _fails(capsys, ["train", jobs], f"{tmp_path / 'd.jsonl'}:5: not UTF-8 text")


def test_a_nan_learning_rate(tmp_path, capsys):
    _fails(capsys, ["train", _jobs(tmp_path, ", lr: .nan")], "field 'lr' = nan must be a finite number")


def test_a_job_named_off(tmp_path, capsys):
    jobs = _jobs(tmp_path)
    text = (tmp_path / "jobs.yaml").read_text().replace("name: fin", "name: off")
    (tmp_path / "jobs.yaml").write_text(text)
    _fails(capsys, ["train", jobs], "field 'name' = False must be a non-empty string (quote it")


def test_a_rank_over_the_bound(tmp_path, capsys):
    _fails(capsys, ["train", _jobs(tmp_path, ", rank: 100000")], "rank must be in [1, 1024]")


def test_a_corrupt_image_is_named_before_training(tmp_path, capsys):
    import json

    jobs = _jobs(tmp_path, lines=0)
    rows = []
    for i in range(40):
        image(30 + i, 20, seed=i).save(tmp_path / f"{i}.png")
        rows.append(
            {
                "image": f"{i}.png",
                "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}],
            }
        )
    (tmp_path / "30.png").write_bytes((tmp_path / "30.png").read_bytes()[:60])  # line 31's image
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _fails(capsys, ["train", jobs], f"{tmp_path / 'd.jsonl'}:31: image {tmp_path / '30.png'}: could not decode")
    assert not (tmp_path / "out").exists()


def test_the_readmes_example_jobs_file_reads(tmp_path):
    from pathlib import Path

    from vlstack.train.data import read_dataset
    from vlstack.train.jobs import read_plan

    root = Path(__file__).parent.parent
    plan = read_plan(root / "examples" / "jobs.yaml")
    assert plan.jobs[0].output.resolve() == (root / "out" / "finance").resolve()
    assert len(read_dataset(plan.jobs[0].data)) == 4


def test_the_readmes_python_example_runs_and_keeps_other_files(tmp_path, monkeypatch):
    """The README's Python example, on the tiny model, in a directory holding examples/ and a file of the
    user's in out/ (a save once wiped the adapter there)."""
    import re
    import shutil
    from pathlib import Path

    root = Path(__file__).parent.parent
    blocks = re.findall(r"```python\n(.*?)```", (root / "README.md").read_text(), re.S)
    example = next(b for b in blocks if "vlstack.load(" in b)
    shutil.copytree(root / "examples", tmp_path / "examples")
    (tmp_path / "out" / "merged").mkdir(parents=True)
    (tmp_path / "out" / "merged" / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    exec(re.sub(r'vlstack\.load\("[^"]+"\)', 'vlstack.load("tiny")', example), {})
    assert (tmp_path / "out" / "merged" / "model.safetensors").is_file()
    assert (tmp_path / "out" / "merged" / "notes.txt").read_text() == "mine"
