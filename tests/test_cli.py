"""The `vlstack` command as a user runs it: a subprocess, the tiny model by default."""

from __future__ import annotations

from conftest import image
from conftest import run_cli as run


def test_chat_answers_about_an_image_with_the_tiny_model(tmp_path):
    path = tmp_path / "page.png"
    image(640, 480).save(path)
    out = run("chat", "--image", str(path), "--max-new-tokens", "8", "What is on this page?")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()
    import vlstack

    expected = vlstack.load("tiny", device="cpu").chat("What is on this page?", images=str(path), max_new_tokens=8)
    assert out.stdout == expected + "\n"


def test_info_reports_architecture_and_counts():
    out = run("info")
    assert out.returncode == 0, out.stderr
    assert "image tokens per tile  64" in out.stdout
    assert "parameters: total" in out.stdout and "Qwen2" in out.stdout


def test_errors_are_one_line_not_tracebacks(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    out = run("chat", "--image", str(bad), "hello")
    assert out.returncode == 2
    assert out.stderr.startswith("vlstack: error: could not decode image") and "Traceback" not in out.stderr
    out = run("info", str(tmp_path))
    assert out.returncode == 2 and "has no config.json" in out.stderr and "Traceback" not in out.stderr
