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

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .losses import Objective


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
    policy: torch.Tensor, reference: torch.Tensor, beta: float, shift: RewardShift | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each pair's DPO loss [P], and with a reward shift (updated here by this micro-batch's rewards) its BCO
    loss [P], from the summed log-probabilities [P, 2] (chosen, rejected) of the policy and the reference."""
    ratios = policy - reference.detach()  # [P, 2]
    dpo = -F.logsigmoid(beta * (ratios[:, 0] - ratios[:, 1]))  # [P]
    if shift is None:
        return dpo, None
    rewards = beta * ratios  # [P, 2]
    delta = shift.update(float(rewards.detach().mean()))
    bco = -F.logsigmoid(rewards[:, 0] - delta) - F.logsigmoid(-(rewards[:, 1] - delta))  # [P]
    return dpo, bco


def preference_loss(
    objective: Preference,
    policy: torch.Tensor,
    reference: torch.Tensor,
    chosen_nll: torch.Tensor,
    chosen_tokens: int,
    shift: RewardShift | None,
) -> torch.Tensor:
    """A micro-batch's loss (a scalar): the weighted mean over its pairs of DPO and BCO, plus sft x the chosen
    answers' summed cross-entropy chosen_nll over their chosen_tokens."""
    dpo, bco = pair_losses(policy, reference, objective.beta, shift if objective.bco else None)
    loss = objective.dpo * dpo.mean()
    if bco is not None:
        loss = loss + objective.bco * bco.mean()
    if objective.sft:
        loss = loss + objective.sft * chosen_nll / max(1, chosen_tokens)
    return loss
