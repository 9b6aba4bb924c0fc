"""Preference objectives over (chosen, rejected) pairs of answers to one prompt: DPO, BCO and their mix with
SFT on the chosen answer, MPO (InternVL3's post-training: 0.8 DPO + 0.2 BCO + 1 SFT, beta 0.1).

A pair's terms come from four summed log-probabilities [P, 2] (chosen, rejected): the policy's, and the
reference's (the starting weights: for a LoRA job, the same base with its adapter off). With the log-ratios
r = policy - reference:
- DPO (sigmoid): -log sigmoid(beta (r_chosen - r_rejected));
- BCO (TRL's bco_pair): -log sigmoid(beta r_chosen - delta) - log sigmoid(-(beta r_rejected - delta)), delta the
  reward shift: the running mean, over the micro-batches so far (this one included), of each micro-batch's mean
  reward beta r over its chosen and rejected answers (RewardShift);
- SFT: the chosen answer's cross-entropy, a token mean over the micro-batch's chosen answers (TRL's rpo_alpha).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..layers.step import upload
from .losses import Objective, token_losses

if TYPE_CHECKING:
    from .batch import Pass
    from .running import Running


@dataclass(frozen=True)
class Preference(Objective):
    """A job trained on preference pairs: its loss is dpo x DPO + bco x BCO + sft x SFT (MPO's weights by
    default; dpo: 1, bco: 0, sft: 0 is plain DPO)."""

    beta: float = 0.1  # the strength of the pull back to the reference
    dpo: float = 0.8
    bco: float = 0.2
    sft: float = 1.0


@dataclass
class RewardShift:
    """BCO's delta: the running mean of the micro-batches' mean rewards (each micro-batch counts once, as TRL's
    RunningMoments counts one value per update on one process)."""

    mean: float = 0.0
    count: int = 0

    def update(self, batch_mean: float) -> float:
        """Take one micro-batch's mean reward; returns the new delta."""
        self.count += 1
        self.mean += (batch_mean - self.mean) / self.count
        return self.mean

    def state_dict(self) -> dict:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.count = float(state["mean"]), int(state["count"])


def pair_losses(
    policy: torch.Tensor, reference: torch.Tensor, beta: float, delta: float | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each pair's DPO loss [P], and given the reward shift delta its BCO loss [P], from the summed
    log-probabilities [P, 2] (chosen, rejected) of the policy and the reference."""
    ratios = policy - reference.detach()  # [P, 2]
    dpo = -F.logsigmoid(beta * (ratios[:, 0] - ratios[:, 1]))  # [P]
    if delta is None:
        return dpo, None
    rewards = beta * ratios  # [P, 2]
    return dpo, -F.logsigmoid(rewards[:, 0] - delta) - F.logsigmoid(-(rewards[:, 1] - delta))  # [P]


def preference_loss(
    objective: Preference,
    policy: torch.Tensor,
    reference: torch.Tensor,
    chosen_nll: torch.Tensor,
    pairs: int,
    chosen_tokens: int,
    delta: float | None,
) -> torch.Tensor:
    """The loss (a scalar) of a micro-batch of `pairs` pairs and `chosen_tokens` chosen tokens, or of a share of
    one (data parallelism: each process's pairs, the shares adding up to the whole): the weighted DPO and BCO
    summed over these pairs [P, 2] / pairs, plus sft x their chosen answers' summed cross-entropy chosen_nll /
    chosen_tokens. delta: BCO's reward shift (RewardShift), None when bco is 0."""
    dpo, bco = pair_losses(policy, reference, objective.beta, delta if objective.bco else None)
    loss = objective.dpo * dpo.sum() / pairs
    if bco is not None:
        loss = loss + objective.bco * bco.sum() / pairs
    if objective.sft:
        loss = loss + objective.sft * chosen_nll / max(1, chosen_tokens)
    return loss


def preference_sums(
    model: torch.nn.Module,
    p: Pass,
    terms: torch.Tensor,
    running: list[Running],
    totals: list[tuple[int, int]],
    split: bool,
    features: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each job's preference loss [jobs] over the pass p (0 for the jobs of other objectives), from its learned
    tokens' cross-entropies terms [N] under the policy: the reference's are the same pass with every adapter off,
    without gradients (one model, no copy of it). totals: each job's (pairs, chosen tokens) over the whole
    micro-batch (every process's); split: under data parallelism, the rewards for BCO's shift summed over the
    processes (each calls this at the same point). The pass holds each pair's two rows whole."""
    jobs, device = len(running), terms.device
    with torch.no_grad():
        step = dataclasses.replace(p.step, lora=None)
        hidden = model(p.ids, step, None if features is not None else p.pixels, features, head=False)  # [N, C]
        reference = token_losses(model.lm_head, hidden, p.targets, False)  # [N]
    in_row = upload(F.one_hot(p.rows, len(p.row_jobs)).T.float(), device)  # [rows, N]
    policy_lp, reference_lp = -(in_row @ terms), -(in_row @ reference)  # [rows] each row's summed log-probability
    pairs = {}
    reward = torch.zeros(2, jobs, device=device, dtype=torch.float64)  # [2, jobs]: rewards' sum and count
    for i, r in enumerate(running):
        objective = r.job.objective
        if not isinstance(objective, Preference):
            continue
        chosen = [k for k, (j, side) in enumerate(zip(p.row_jobs, p.sides)) if j == i and side == 0]
        rejected = [k for k, (j, side) in enumerate(zip(p.row_jobs, p.sides)) if j == i and side == 1]
        where = upload([chosen, rejected], device).T  # [P, 2]
        pairs[i] = where
        reward[0, i] = objective.beta * (policy_lp[where] - reference_lp[where]).detach().sum()
        reward[1, i] = where.numel()
    if split:
        dist.all_reduce(reward)
    sums = torch.zeros(jobs, device=device)
    for i, where in pairs.items():
        r, objective = running[i], running[i].job.objective
        delta = r.shift.update(float(reward[0, i] / reward[1, i])) if objective.bco else None
        nll = (in_row[where[:, 0]] @ terms).sum()  # the chosen answers' summed cross-entropy
        loss = preference_loss(objective, policy_lp[where], reference_lp[where], nll, *totals[i], delta)
        sums = sums + F.one_hot(torch.tensor(i), jobs).to(device) * loss
    return sums
