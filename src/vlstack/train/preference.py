"""Preference objectives over (chosen, rejected) pairs of answers to one prompt: DPO, BCO and their mix with
SFT on the chosen answer, MPO (InternVL3's post-training: 0.8 DPO + 0.2 BCO + 1 SFT, beta 0.1).

A pair's terms come from four summed log-probabilities [P, 2] (chosen, rejected): the policy's, and the
reference's (the starting weights: for a LoRA job, the same base with its adapter off; for a full job, a frozen
copy of the weights it started from). With the log-ratios
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


class PairStep:
    """One micro-step's preference reductions over its passes. The reference's log-probabilities are each pass's
    preference rows again with every adapter off, without gradients (one model, no copy of it); BCO's reward
    shift needs the whole micro-batch's rewards (every process's) before any pass's loss: with one pass they come
    from its own forward, with several (max_tokens) from a forward of each pass without gradients first
    (`early`, `observe`, `close`), so the passes give the loss of one. Every process calls close once a
    micro-step (data parallelism: the rewards summed over the processes)."""

    def __init__(self, model: torch.nn.Module, running: list[Running], totals: list[tuple[int, int]], split: bool):
        self.model, self.running, self.totals, self.split = model, running, totals, split
        self.references: dict[int, torch.Tensor] = {}  # pass -> each preference row's summed log-probability
        self.reward = torch.zeros(2, len(running), dtype=torch.float64, device=model.device)  # [2, jobs]: sum, count
        self.deltas: list[float | None] | None = None

    def early(self, passes: int) -> bool:
        """Whether the rewards must be gathered before the passes (several of them, and a job's loss needs the
        shift)."""
        return passes > 1 and any(isinstance(r.job.objective, Preference) and r.job.objective.bco for r in self.running)

    def observe(self, k: int, p: Pass, terms: torch.Tensor, features: torch.Tensor | None = None) -> None:
        """Pass k's rewards from its learned tokens' cross-entropies terms [N] under the policy."""
        self._rewards(k, p, row_sums(p, terms.detach()), features)

    def _rewards(self, k: int, p: Pass, policy: torch.Tensor, features: torch.Tensor | None) -> None:
        """Pass k's rewards added, from its rows' summed log-probabilities under the policy [rows]."""
        reference = self.reference(k, p, features)
        for i, where in pair_rows(p, self.running).items():
            objective = self.running[i].job.objective
            self.reward[0, i] += objective.beta * (policy[where] - reference[where]).sum()
            self.reward[1, i] += where.numel()

    def close(self) -> None:
        """The micro-batch's rewards complete (summed over the processes): each BCO job's shift moved on."""
        if self.split:
            dist.all_reduce(self.reward)
        (total, count) = self.reward.tolist()  # (the step's one read of the device: the shift is a number)
        self.deltas = [
            r.shift.update(total[i] / count[i])
            if isinstance(r.job.objective, Preference) and r.job.objective.bco and count[i] > 0
            else None
            for i, r in enumerate(self.running)
        ]

    def reference(self, k: int, p: Pass, features: torch.Tensor | None) -> torch.Tensor:
        """Pass k's rows' summed log-probabilities under the reference [rows] (each pass's forward once)."""
        if k not in self.references:  # (a full job runs alone: its frozen starting weights, else the base)
            model = next((r.reference for r in self.running if r.reference is not None), self.model)
            with torch.no_grad():
                step = dataclasses.replace(p.step, lora=None)
                hidden = model(p.ids, step, None if features is not None else p.pixels, features, head=False)
                self.references[k] = row_sums(p, token_losses(model.lm_head, hidden, p.targets, False))
        return self.references[k]

    def sums(self, k: int, p: Pass, terms: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """Each job's preference loss [jobs] over pass k (0 for the jobs of other objectives), from its learned
        tokens' cross-entropies terms [N] under the policy."""
        policy, reference = row_sums(p, terms), self.reference(k, p, features)  # [rows] each
        if self.deltas is None:  # (one pass: its own forward gives the rewards)
            self._rewards(k, p, policy.detach(), features)
            self.close()
        jobs, device = len(self.running), terms.device
        sums = torch.zeros(jobs, device=device)
        for i, where in pair_rows(p, self.running).items():
            objective = self.running[i].job.objective
            nll = -policy[where[:, 0]].sum()  # the chosen answers' summed cross-entropy
            loss = preference_loss(objective, policy[where], reference[where], nll, *self.totals[i], self.deltas[i])
            sums = sums + F.one_hot(torch.tensor(i), jobs).to(device) * loss
        return sums


def row_sums(p: Pass, terms: torch.Tensor) -> torch.Tensor:
    """Each row's summed log-probability [rows] from its learned tokens' cross-entropies terms [N]."""
    in_row = upload(F.one_hot(p.rows, len(p.row_jobs)).T.float(), terms.device)  # [rows, N]
    return -(in_row @ terms)


def pair_rows(p: Pass, running: list[Running]) -> dict[int, torch.Tensor]:
    """Each preference job's pairs in the pass: job -> its rows' places [P, 2] (chosen, rejected)."""
    out = {}
    for i, r in enumerate(running):
        if isinstance(r.job.objective, Preference):
            sides = [
                [k for k, (j, side) in enumerate(zip(p.row_jobs, p.sides)) if j == i and side == s] for s in (0, 1)
            ]
            if sides[0]:
                out[i] = upload(sides, p.ids.device).T  # [P, 2]
    return out
