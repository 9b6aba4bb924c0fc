"""Distillation: the (pruned) student learns the teacher's logits (forward KL at a temperature, as Minitron retrains
a pruned model) on a dataset in the training format, through the same fused training step as every training job
(train/multi.py: a job with a `teacher`), every weight or a LoRA adapter merged afterwards. Progress, metrics, the
loss curve and resume come with the training run, kept in a work directory beside the output until it is done.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..config import check_fields
from ..errors import ConfigError


@dataclass
class DistillConfig:
    data: str | None = None  # JSONL in the training format
    steps: int = 100
    batch_size: int = 4
    lr: float = 1e-4
    warmup_steps: int = 0
    temperature: float = 1.0
    hidden_weight: float = 0.0  # the final hidden states' mean squared difference too (the widths must agree)
    full: bool = True  # every weight of the student; false: a LoRA adapter of `rank`, merged at the end
    rank: int = 16
    teacher: str | None = None  # a checkpoint directory; default: the model as it was before this run's pruning

    def check(self) -> DistillConfig:
        check_fields(self, "distill")
        if self.data is None or not Path(self.data).is_file():
            raise ConfigError(f"distill data must be a JSONL file in the training format (got {self.data!r})")
        if self.teacher is not None and not Path(self.teacher).is_dir():
            raise ConfigError(f"distill teacher {self.teacher} is not a checkpoint directory")
        for name in ("steps", "batch_size", "rank"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"distill {name} must be an integer >= 1")
        if not self.lr > 0 or not self.temperature > 0 or self.hidden_weight < 0:
            raise ConfigError("distill lr and temperature must be > 0, hidden_weight >= 0")
        if self.warmup_steps < 0:
            raise ConfigError(f"distill warmup_steps must be >= 0 (got {self.warmup_steps})")
        return self


def distill(vlm, cfg: DistillConfig, teacher: nn.Module | str, work: Path, resume: bool = False) -> None:
    """Train vlm's model to the teacher's logits (a model, or a checkpoint directory); its work (checkpoints,
    metrics, loss curve) in `work` and `<work>.train`, so an interrupted run resumes."""
    from ..adapters import merge_adapter
    from ..train.jobs import Job
    from ..train.multi import train

    job = Job.of(
        "distill",
        Path(cfg.data),
        work,
        full=cfg.full,
        rank=cfg.rank,
        alpha=2.0 * cfg.rank,
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        steps=cfg.steps,
        warmup_steps=cfg.warmup_steps,
        teacher=teacher,
        temperature=cfg.temperature,
        hidden_weight=cfg.hidden_weight,
        save_every=max(1, cfg.steps // 10),
    )
    train(vlm, [job], cfg.batch_size, resume=resume, log_every=max(1, cfg.steps // 20))
    if not cfg.full:  # the adapter, merged into the student
        vlm.load_adapter("distill", work)
        merge_adapter(vlm.model, "distill")
        vlm.adapters.clear()
