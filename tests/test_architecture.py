"""The floors of the house (pyproject.toml's import-linter contracts, DESIGN.md's layout): the tree keeps them, and
an upward import breaks them (a mutated copy of the package)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = "from importlinter.cli import lint_imports_command; lint_imports_command()"  # (`lint-imports`)


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` over the package under root/src, with root's pyproject.toml."""
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    command = [sys.executable, "-c", LINT, "--config", str(root / "pyproject.toml"), "--no-cache"]
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_the_tree_keeps_its_floors():
    run = lint_imports(ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout


def test_an_upward_import_breaks_the_contracts(tmp_path):
    package = tmp_path / "src" / "vlstack"
    shutil.copytree(ROOT / "src" / "vlstack", package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    norm = package / "layers" / "norm.py"
    norm.write_text(norm.read_text() + "\nfrom ..engine import scheduler  # noqa: E402,F401\n")
    run = lint_imports(tmp_path)
    assert run.returncode != 0
    assert "vlstack.layers.norm -> vlstack.engine.scheduler" in run.stdout
    assert "floors BROKEN" in run.stdout
