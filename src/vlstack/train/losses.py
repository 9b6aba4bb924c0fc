"""Training objectives: what each job's learned tokens cost, from one pass's final hidden states.

A pass holds every running job's rows back to back (BatchLoRA); each of its learned tokens [N] belongs to a job.
A job's loss comes in two parts:
- per-token terms for all N tokens at once, in one chunked pass over the LM head (token_losses): the
  cross-entropy with the target, or where the job distils, the distillation term against its teacher;
- a reduction to each job's loss [jobs]: `in_job` [jobs, N] holds each token's weight in its job's sum (its
  objective's token_weight), and the step divides each sum by the job's total weight over the micro-batch.
A new objective is a new Objective here: its terms and its weights (or, for a loss over pairs of rows, its own
reduction of the terms).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..layers.step import Step, upload

if TYPE_CHECKING:
    from .running import Running


@dataclass(frozen=True)
class Objective:
    """A job's objective: supervised fine-tuning, the cross-entropy of the answers' tokens. Its subclasses say
    otherwise (Distill; preference losses next), each with its own settings."""

    weighting: str = "token"  # a row's tokens' weight in its job's loss: token, sample or square (WEIGHTINGS)

    distils: ClassVar[bool] = False  # its terms are the distillation loss against a teacher (else cross-entropy)

    def token_weight(self, learned: int) -> float:
        """The weight of each of a row's `learned` tokens in its job's loss, which is the weighted mean of its
        micro-batch's token losses (sum of weight x loss / sum of weights): 1 (token averaging: every token
        alike), 1/l (sample averaging: every row alike) or 1/sqrt(l) (square averaging, InternVL's default: in
        between), l = the row's learned tokens."""
        if not learned:
            return 0.0
        return WEIGHTINGS[self.weighting](learned)


@dataclass(frozen=True)
class Distill(Objective):
    """Learn a teacher's logits (and, with hidden_weight, its final hidden states): see token_losses."""

    teacher: Any = None  # a checkpoint directory, or a loaded model
    temperature: float = 1.0  # the softmax temperature of teacher and student (the loss scaled by T²)
    hidden_weight: float = 0.0  # the weight of the final hidden states' mean squared difference

    distils: ClassVar[bool] = True


@dataclass(frozen=True)
class Critic(Objective):
    """A critic, a process reward model as VisualPRM trains one: the cross-entropy of its '+' / '-' replies to
    an answer's steps (train/data.py's step-labelled lines); eval/critic.py reads P('+') back as a step's score."""


SFT = Objective()
WEIGHTINGS = {"token": lambda n: 1.0, "sample": lambda n: 1.0 / n, "square": lambda n: 1.0 / math.sqrt(n)}


def token_losses(
    head: torch.nn.Linear,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    recompute: bool,
    teacher: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor:
    """The loss [N] of each learned token from the final hidden states [N, C]: cross-entropy with its target, or
    where teacher = (logits [N, V], distilled [N] bool, temperature [N][, hidden [N, C], hidden weight [N]]) says,
    the distillation loss T² KL(teacher || student) of the two softmaxes at temperature T (forward KL, as Minitron
    distils), plus the weight times the mean squared difference of the final hidden states. A chunk of tokens at
    a time.

    With recompute, each chunk's logits [chunk, vocab] are dropped once its loss is known and recomputed in
    backward, so the batch's logits [N, vocab] (151k wide for Qwen2: 0.6 MB a token) never exist at once."""

    def chunk_loss(h: torch.Tensor, t: torch.Tensor, *kd: torch.Tensor) -> torch.Tensor:
        logits = head(h).float()
        ce = F.cross_entropy(logits, t, reduction="none")
        if not kd:
            return ce
        theirs, distilled, temp, *hidden_term = kd
        p = F.log_softmax(theirs.float() / temp[:, None], dim=-1)
        kl = (p.exp() * (p - F.log_softmax(logits / temp[:, None], dim=-1))).sum(-1) * temp**2
        if hidden_term:
            their_hidden, weight = hidden_term
            kl = kl + weight * (h.float() - their_hidden.float()).pow(2).mean(-1)
        return torch.where(distilled, kl, ce)

    size = max(16, (16 << 20) // head.out_features) if recompute else len(targets)  # ~64 MB of float32 logits
    parts = [hidden.split(size), targets.split(size), *(x.split(size) for x in teacher or ())]
    if not recompute:
        return chunk_loss(*(p[0] for p in parts))
    return torch.cat([checkpoint(chunk_loss, *piece, use_reentrant=False) for piece in zip(*parts)])


def pass_losses(
    head: torch.nn.Linear,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    in_job: torch.Tensor,
    recompute: bool,
    teacher: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor:
    """Each job's weighted sum of its token losses [jobs] from the final hidden states [N, C] of a pass's learned
    tokens (the fused step's and the pipeline's last stage's)."""
    return in_job @ token_losses(head, hidden, targets, recompute, teacher)  # [jobs]


def job_losses(
    model: torch.nn.Module,
    ids: torch.Tensor,
    step: Step,
    pixel_values: torch.Tensor | None,
    targets: torch.Tensor,
    in_job: torch.Tensor,
    teacher: tuple[torch.Tensor, ...] | None = None,
    features: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused forward: rows back to back ids [T] (each job's LoRA on its own, by the routing) -> each job's
    weighted sum of token losses [jobs] over the step's logit tokens, whose targets are [N] and jobs in_job
    [jobs, N], and the token losses [N] themselves (for the reductions over pairs: preference.py). teacher: see
    token_losses; features: the images' features, computed already. Tensors only: it compiles whole (a test's
    proof)."""
    hidden = model(ids, step, None if features is not None else pixel_values, features, head=False)  # [N, C]
    terms = token_losses(model.lm_head, hidden, targets, model.language_model.checkpointing, teacher)  # [N]
    return in_job @ terms, terms  # [jobs], [N]


def teacher_logits(
    running: list[Running],
    job: torch.Tensor,
    ids: torch.Tensor,
    pixel_values: torch.Tensor | None,
    step: Step,
    features: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...] | None:
    """For a pass whose rows include distilling jobs' (job [N]: each learned token's job, on the host): each
    teacher's logits [N, V] at the learned tokens of its jobs, which tokens are distilled [N], at what temperature
    [N], and where a job asks, the teacher's final hidden states [N, C] and their loss weight [N]; None when no job
    distils. features: the images' features where teacher and student share them (shared_features), else each
    teacher encodes the images itself."""
    teachers = {id(r.teacher): r.teacher for r in running if r.teacher is not None}
    if not teachers:
        return None
    logits = hidden = None
    settings = [
        (r.job.objective.temperature, r.job.objective.hidden_weight) if r.teacher is not None else (1.0, 0.0)
        for r in running
    ]
    temp, weight = torch.tensor(settings).T[:, job]  # [N] each, each job's at its tokens
    device = ids.device
    step = dataclasses.replace(step, lora=None)  # (the students' adapters are not the teachers')
    with torch.no_grad():
        for teacher in teachers.values():
            mine = upload(torch.tensor([r.teacher is teacher for r in running])[job], device)  # [N] its jobs' tokens
            h = teacher(ids, step, None if features is not None else pixel_values, features, head=False)  # [N, C]
            out = teacher.lm_head(h)  # [N, V]
            logits = out if logits is None else torch.where(mine[:, None], out, logits)
            hidden = h if hidden is None else torch.where(mine[:, None], h, hidden)
    distilled = torch.tensor([r.teacher is not None for r in running])[job]  # [N]
    kd = logits, upload(distilled, device), upload(temp, device)
    return (*kd, hidden, upload(weight, device, hidden.dtype)) if weight.any() else kd
