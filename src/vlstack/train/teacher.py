"""Distillation's teachers: a job's teacher loaded frozen beside the student, and the image features the two
share where their vision is the same (losses.teacher_logits runs them)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..api import VLM
from .jobs import Job, JobError

if TYPE_CHECKING:
    from .running import Running


def teacher_of(vlm: VLM, job: Job) -> torch.nn.Module | None:
    """The job's teacher as a frozen model on the student's device: a checkpoint directory is loaded."""
    objective = job.objective
    if not objective.distils:
        return None
    if isinstance(objective.teacher, torch.nn.Module):
        teacher = objective.teacher
    else:
        from ..api import load

        teacher = load(objective.teacher, device=vlm.model.device, dtype=vlm.model.dtype).model
    if objective.hidden_weight and teacher.cfg.text.hidden_size != vlm.cfg.text.hidden_size:
        widths = f"({teacher.cfg.text.hidden_size}) to be the student's ({vlm.cfg.text.hidden_size})"
        raise JobError(f"job {job.name!r}: hidden-state distillation needs the teacher's width {widths}")
    if teacher.cfg.text.vocab_size != vlm.cfg.text.vocab_size:
        raise JobError(
            f"job {job.name!r}: the teacher's vocabulary ({teacher.cfg.text.vocab_size}) is not the "
            f"student's ({vlm.cfg.text.vocab_size})"
        )
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def same_vision(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two models' vision towers and projectors hold the same weights (their image features agree)."""
    parts = [(dict(x.vision_tower.state_dict()), dict(x.multi_modal_projector.state_dict())) for x in (a, b)]
    return all(
        mine.keys() == theirs.keys()
        and all(mine[k].shape == theirs[k].shape and torch.equal(mine[k], theirs[k]) for k in mine)
        for mine, theirs in zip(*parts)
    )


def shared_features(vlm: VLM, running: list[Running], pixel_values: torch.Tensor | None) -> torch.Tensor | None:
    """The image features [N, P, C] computed once for the student and every teacher, where that gives what each
    would compute: the student's vision tower and projector untouched by every running job (no full job, no
    adapter on them) and each teacher's the same weights (checked once per job). None: each computes its own."""
    if pixel_values is None or not any(r.teacher is not None for r in running):
        return None
    if any(r.job.full or set(r.job.lora.parts) & {"vision", "projector"} for r in running):
        return None
    for r in running:
        if r.teacher is not None and r.shares_vision is None:
            r.shares_vision = same_vision(vlm.model, r.teacher)
    if not all(r.shares_vision for r in running if r.teacher is not None):
        return None
    with torch.no_grad():
        return vlm.model.image_features(pixel_values)
