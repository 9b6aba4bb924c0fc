"""The gated MLP of Llama-style decoders: down(act(gate(x)) * up(x)), gate and up as two Linear layers or as
one `gate_up_proj` [gate; up] (Phi-3)."""

from __future__ import annotations

import torch
from torch import nn

from .activations import ACTIVATIONS


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, act: str, fused: bool = False, bias: bool = False):
        super().__init__()
        if fused:
            self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=bias)
        else:
            self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
            self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.act = ACTIVATIONS[act]
        self.fused = fused
        self.tp = None  # tensor parallelism (parallel/tp.py): this rank's neurons only, down_proj's sums reduced

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        y = self.down_proj(self.act(gate) * up)
        return y if self.tp is None else self.tp.reduce(y)
