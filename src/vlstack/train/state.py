"""A training job's resumable state: its adapter, AdamW, schedule, data position and counters (its dropout
masks follow from the counters), in `<output>.train/checkpoint/state.pt`, written to a temporary file and
renamed, so a kill at any moment leaves the last complete checkpoint. Jobs are independent, so each
resumes from its own checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError
from ..files import write_files

if TYPE_CHECKING:
    from .jobs import Job
    from .running import Running


STATE_KEYS = {"adapter", "optimizer", "scheduler", "position", "step", "micro", "tokens", "losses"}
RUN_FILES = ("checkpoint/state.pt", "metrics.jsonl", "loss.png")  # what a run writes to its run directory


def run_dir(output: Path) -> Path:
    """Where a job keeps its checkpoint, metrics and loss curve while it trains."""
    return output.with_name(output.name + ".train")


def save_state(r: Running) -> None:
    target = run_dir(r.job.output) / "checkpoint"
    r.read_losses()  # (the micro-steps' losses still on the device)
    state = {  # STATE_KEYS
        "shape": shape_of(r.job),
        "adapter": [p.detach().cpu().clone() for p in r.params],
        "optimizer": r.optimizer.state_dict(),
        "scheduler": r.scheduler.state_dict(),
        "position": r.stream.position,
        "step": r.step,
        "micro": r.micro,
        "tokens": r.tokens,
        "losses": r.losses,
        "shift": r.shift.state_dict(),
    }
    write_files(target, {"state.pt": lambda path: torch.save(state, path)})


def shape_of(job: Job) -> dict:
    """What fixes the shape of a job's adapter: a checkpoint resumes only a job of the same shape."""
    if job.full:
        return {"full": True, "parts": sorted(job.lora.parts), "part_lr": job.part_lr or {}}
    return {"rank": job.lora.rank, "targets": sorted(job.lora.targets), "parts": sorted(job.lora.parts)}


def load_state(job: Job) -> dict | None:
    """The job's last checkpoint, or None if it has none."""
    path = run_dir(job.output) / "checkpoint" / "state.pt"
    if not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=True)  # (plain data and tensors: nothing in it runs)
    except Exception as e:  # torch raises bare RuntimeErrors and pickle errors for a damaged file
        state = e
    if not isinstance(state, dict) or not STATE_KEYS <= set(state):
        why = f" ({state})" if isinstance(state, Exception) else ""
        raise ConfigError(f"the checkpoint {path} cannot be read{why}; delete it to start the job again") from None
    if state.get("shape", shape_of(job)) != shape_of(job):
        raise ConfigError(
            f"job {job.name!r}: its checkpoint {path} is of an adapter with {state['shape']}, the job now asks for "
            f"{shape_of(job)}; restore those settings, or train it afresh without --resume"
        )
    return state


def clear_run(output: Path) -> None:
    """A fresh start: remove what an earlier run of this job wrote to its run directory (only those files)."""
    for name in RUN_FILES:
        (run_dir(output) / name).unlink(missing_ok=True)


def restore_state(r: Running, state: dict) -> None:
    shapes = [tuple(p.shape) for p in r.params]
    if [tuple(t.shape) for t in state["adapter"]] != shapes:
        raise ConfigError(
            f"job {r.job.name!r}: its checkpoint holds an adapter of another shape (were rank, targets or parts "
            f"changed?); restore the job's settings, or train it afresh without --resume"
        )
    with torch.no_grad():
        for p, saved in zip(r.params, state["adapter"]):
            p.copy_(saved)
    r.optimizer.load_state_dict(state["optimizer"])
    r.scheduler.load_state_dict(state["scheduler"])
    r.stream.position = state["position"]
    r.step, r.micro, r.tokens, r.losses = state["step"], state["micro"], state["tokens"], list(state["losses"])
    r.recorded = len(r.losses)
    if "shift" in state:  # (checkpoints from before preference objectives have none)
        r.shift.load_state_dict(state["shift"])
