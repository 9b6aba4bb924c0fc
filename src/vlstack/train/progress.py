"""Training progress: a line per job and step on stderr (steps, loss, tokens/s, ETA), per-job metrics
as JSONL, and a loss-curve PNG per job, all in the job's `<output>.train/` directory."""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw

from ..files import write_files
from .state import run_dir

if TYPE_CHECKING:
    from .running import Running


def record(r: Running, verbose: bool) -> None:
    """After an optimizer step: append the job's metrics line (its loss: the mean of the micro-steps since the
    last line) and, if verbose, print its progress."""
    elapsed = time.perf_counter() - r.started
    r.read_losses()
    recent = r.losses[r.recorded :] or r.losses[-1:]
    r.recorded = len(r.losses)
    row = {
        "step": r.step,
        "total_steps": r.total_steps,
        "loss": sum(recent) / len(recent),
        "lr": r.scheduler.get_last_lr()[0],
        "tokens": r.tokens,
        "tokens_per_s": r.tokens_since_start / elapsed if elapsed > 0 else 0.0,
        "elapsed_s": elapsed,
    }
    path = run_dir(r.job.output) / "metrics.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    if verbose:
        eta = elapsed / max(r.step - r.first_step, 1) * (r.total_steps - r.step)
        print(
            f"[{r.job.name}] step {r.step}/{r.total_steps} loss {row['loss']:.4f} "
            f"{row['tokens_per_s']:.0f} tok/s eta {eta:.0f}s",
            file=sys.stderr,
            flush=True,
        )


def truncate_metrics(r: Running) -> None:
    """On resume: forget metrics of steps after the checkpoint (they will be recorded again)."""
    path = run_dir(r.job.output) / "metrics.jsonl"
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= r.step]
        write_files(path.parent, {path.name: lambda p: p.write_text("".join(line + "\n" for line in keep))})


def plot_loss(r: Running, width: int = 640, height: int = 360) -> None:
    """The job's loss per micro-step as a PNG line chart."""
    losses = r.losses
    lo, hi = min(losses), max(losses)
    title = f"{r.job.name}: training loss per micro-step ({len(losses)})"
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength  # (every label inside the picture)
    left = max(60, 12 + int(max(measure(f"{hi:.3f}"), measure(f"{lo:.3f}"))))
    width = max(width, left + int(measure(title)) + 20)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    right, top, bottom = width - 20, 30, height - 40
    draw.rectangle((left, top, right, bottom), outline="black")
    span = hi - lo or 1.0

    def xy(i: int, v: float) -> tuple[float, float]:
        x = left + (right - left) * (i / max(len(losses) - 1, 1))
        return x, bottom - (bottom - top) * (v - lo) / span

    if len(losses) > 1:
        draw.line([xy(i, v) for i, v in enumerate(losses)], fill="#1f77b4", width=2)
    draw.text((left, 8), title, fill="black")
    draw.text((4, top), f"{hi:.3f}", fill="black")
    draw.text((4, bottom - 10), f"{lo:.3f}", fill="black")
    draw.text((left, bottom + 12), "0", fill="black")
    draw.text((right - measure(str(len(losses))), bottom + 12), str(len(losses)), fill="black")
    write_files(run_dir(r.job.output), {"loss.png": lambda path: img.save(path, format="PNG")})
