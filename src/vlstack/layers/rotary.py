"""Rotary position embeddings (RoPE), the half-split layout of Llama and its descendants, with the scalings the
InternVL families' configs name:

- default (and `dynamic`, which changes nothing up to max_position_embeddings, the longest a sequence gets);
- linear: positions divided by `factor`;
- llama3: low frequencies divided by `factor`, high ones kept, a smooth ramp between;
- longrope (Phi-3): each frequency divided by its `short_factor`, or by its `long_factor` for a sequence longer
  than original_max_position_embeddings (judged by the sequence's last position in the step, as transformers
  judges it by the longest), and cos/sin scaled by an attention factor even for short sequences.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .step import Step

KINDS = ("default", "dynamic", "linear", "llama3", "longrope")


def inverse_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """[D/2]: theta^(-2i/D)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def _llama3(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    factor, low, high = float(p["factor"]), float(p["low_freq_factor"]), float(p["high_freq_factor"])
    old = float(p["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)  # long waves: slowed down
    smooth = (old / wavelen - low) / (high - low)
    between = (1 - smooth) * scaled / factor + smooth * scaled
    middle = (wavelen >= old / high) & (wavelen <= old / low)
    return torch.where(middle, between, scaled)


class Rotary(nn.Module):
    def __init__(self, head_dim: int, theta: float, scaling: dict | None = None, max_positions: int = 0):
        super().__init__()
        p = dict(scaling or {})
        self.kind = p.get("rope_type", p.get("type", "default"))
        inv_freq = inverse_frequencies(head_dim, theta)  # [D/2]
        self.scale, self.threshold = 1.0, 0
        if self.kind == "linear":
            inv_freq = inv_freq / float(p["factor"])
        elif self.kind == "llama3":
            inv_freq = _llama3(inv_freq, p)
        elif self.kind == "longrope":
            self.threshold = int(p["original_max_position_embeddings"])
            factor = p.get("factor") or max_positions / self.threshold
            self.scale = p.get("attention_factor") or (
                1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(self.threshold))
            )
            long = inv_freq / torch.tensor(p["long_factor"], dtype=torch.float32)
            self.register_buffer("long_inv_freq", long, persistent=False)
            inv_freq = inv_freq / torch.tensor(p["short_factor"], dtype=torch.float32)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [D/2]

    def forward(self, step: Step, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's tokens' angles -> cos, sin [T, 1, D] (broadcast over the heads)."""
        inv_freq = self.inv_freq[None]  # [1, D/2]
        if self.threshold:  # longrope: the long factors for the tokens of a sequence past the threshold
            extent = step.positions + 1 if step.extent is None else step.extent  # [T]
            inv_freq = torch.where((extent > self.threshold)[:, None], self.long_inv_freq, inv_freq)  # [T, D/2]
        positions = step.positions if step.rope is None else step.rope  # (V2PE: fractional in images)
        freqs = positions[:, None].float() * inv_freq  # [T, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [T, 1, D]
        if self.scale != 1.0:
            return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] rotated by its tokens' angles."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin
