"""A training job's resumable state: its adapter, AdamW, schedule, data position, counters and dropout
RNG, in `<output>.train/checkpoint/`, replaced atomically so a kill at any moment leaves the last
complete checkpoint. Jobs are independent, so each resumes from its own checkpoint.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..model.lora import lora_layers

if TYPE_CHECKING:
    from .multi import Running


def run_dir(output: Path) -> Path:
    """Where a job keeps its checkpoint, metrics and loss curve while it trains."""
    return output.with_name(output.name + ".train")


def _dropout_generator(model: torch.nn.Module, name: str) -> torch.Generator | None:
    for layer in lora_layers(model).values():
        if name in layer.dropout:
            return layer.dropout[name][1]
    return None


def save_state(r: Running, model: torch.nn.Module) -> None:
    target = run_dir(r.job.output) / "checkpoint"
    target.parent.mkdir(parents=True, exist_ok=True)
    gen = _dropout_generator(model, r.job.name)
    state = {
        "adapter": [p.detach().cpu().clone() for p in r.params],
        "optimizer": r.optimizer.state_dict(),
        "scheduler": r.scheduler.state_dict(),
        "position": r.stream.position,
        "step": r.step,
        "micro": r.micro,
        "tokens": r.tokens,
        "losses": r.losses,
        "dropout_rng": gen.get_state() if gen is not None else None,
    }
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint.", dir=target.parent))
    try:
        torch.save(state, tmp / "state.pt")
        old = target.with_name(".checkpoint.old")
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_state(output: Path) -> dict | None:
    path = run_dir(output) / "checkpoint" / "state.pt"
    if not path.is_file():
        old = run_dir(output) / ".checkpoint.old" / "state.pt"  # killed between the two renames
        path = old if old.is_file() else path
    return torch.load(path, weights_only=False) if path.is_file() else None


def restore_state(r: Running, model: torch.nn.Module, state: dict) -> None:
    with torch.no_grad():
        for p, saved in zip(r.params, state["adapter"]):
            p.copy_(saved)
    r.optimizer.load_state_dict(state["optimizer"])
    r.scheduler.load_state_dict(state["scheduler"])
    r.stream.position = state["position"]
    r.step, r.micro, r.tokens, r.losses = state["step"], state["micro"], state["tokens"], list(state["losses"])
    gen = _dropout_generator(model, r.job.name)
    if gen is not None and state["dropout_rng"] is not None:
        gen.set_state(state["dropout_rng"])
