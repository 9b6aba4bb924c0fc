"""LoRA, the one home of it: many adapters on one frozen Linear at once.

The base matmul runs once over all rows of the batch; then each adapter adds `B(A(dropout(x))) * scaling`
to its own rows only (the mLoRA "BatchLoRA" idea). Which rows belong to which adapter is a `Routing`
shared by every LoRA layer of a model: training sets one segment per job, serving one per group of
requests. Parameter names follow PEFT's in-memory names (`q_proj.lora_A.<adapter>.weight`), and the
base weight keeps its own name (`q_proj.weight`), so checkpoints are unaffected.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError

LLM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PARTS = {  # where each part's Linear layers live (our module names)
    "language": re.compile(r"language_model\.layers\.\d+\.(self_attn|mlp)\.\w+"),
    "vision": re.compile(r"vision_tower\.encoder\.layer\.\d+\.(attention|mlp)\.\w+"),
    "projector": re.compile(r"multi_modal_projector\.linear_[12]"),
}


@dataclass
class LoRASpec:
    """One adapter's shape: rank, alpha, dropout, rsLoRA, and which Linear layers it adapts."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    rslora: bool = False
    targets: tuple[str, ...] = LLM_TARGETS  # last names of the Linear layers to adapt
    parts: tuple[str, ...] = ("language",)  # of: language, vision, projector
    alphas: dict[str, float] = field(default_factory=dict)  # per-module alpha (PEFT's alpha_pattern), by name

    def scaling(self, rank: int, module: str = "") -> float:
        alpha = self.alphas.get(module, self.alpha)
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank

    def modules(self, model: nn.Module) -> list[str]:
        """Names of the Linear layers of model this spec adapts."""
        unknown = set(self.parts) - set(PARTS)
        if unknown:
            raise ConfigError(f"unknown LoRA parts {sorted(unknown)}; choose from {sorted(PARTS)}")
        names = [
            name
            for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear)
            and name.rsplit(".", 1)[-1] in self.targets
            and any(PARTS[p].fullmatch(name) for p in self.parts)
        ]
        if not names:
            raise ConfigError(f"LoRA targets {list(self.targets)} match no Linear layer in parts {list(self.parts)}")
        return names


class Routing:
    """Which rows of the current batch each adapter owns: [(adapter, first row, end row), ...]."""

    def __init__(self) -> None:
        self.segments: list[tuple[str, int, int]] = []
        # in a right-padded batch, each adapter's own sequence length: dropout draws its masks at this
        # length, so they do not depend on how far other rows pad the batch
        self.lengths: dict[str, int] = {}


class LoRALinear(nn.Linear):
    """An nn.Linear (sharing the base weight and bias) with any number of named LoRA adapters."""

    def __init__(self, base: nn.Linear, routing: Routing):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.routing = routing
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, tuple[float, torch.Generator | None]] = {}

    def add(
        self,
        name: str,
        rank: int,
        scaling: float,
        dropout: float = 0.0,
        init: torch.Generator | None = None,
        drop: torch.Generator | None = None,
    ) -> None:
        """A new adapter initialised like PEFT: A Kaiming-uniform, B zeros (so it starts as a no-op)."""
        a = nn.Linear(self.in_features, rank, bias=False, device=self.weight.device, dtype=self.weight.dtype)
        b = nn.Linear(rank, self.out_features, bias=False, device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            bound = 1 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) on a [rank, in] matrix
            a.weight.copy_(torch.rand(a.weight.shape, generator=init) * 2 * bound - bound)
            b.weight.zero_()
        self.lora_A[name], self.lora_B[name] = a, b
        self.scaling[name] = scaling
        self.dropout[name] = (dropout, drop)

    def remove(self, name: str) -> None:
        del self.lora_A[name], self.lora_B[name], self.scaling[name], self.dropout[name]

    def delta(self, name: str) -> torch.Tensor:
        """The adapter's weight update B @ A * scaling: [out, in]."""
        return self.lora_B[name].weight @ self.lora_A[name].weight * self.scaling[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)  # [B, ..., out]: the base matmul, once for all rows
        if not torch.is_grad_enabled():  # no autograd: each update is added into its rows in place
            for name, start, end in self.routing.segments:
                if name in self.lora_A:
                    h = self.lora_A[name](x[start:end]).reshape(-1, self.lora_A[name].out_features)  # [rows*T, r]
                    ys = y[start:end].view(-1, self.out_features)  # [rows*T, out], a view of y
                    ys.addmm_(h, self.lora_B[name].weight.t(), alpha=self.scaling[name])
            return y
        pieces, row = [], 0  # the adapters' updates, row by row, zeros where no adapter applies
        for name, start, end in self.routing.segments:
            if name not in self.lora_A:
                continue
            xs = x[start:end]
            p, gen = self.dropout[name]
            if p and self.training:  # the adapter's own generator: the same masks fused or alone
                xs = xs * dropout_mask(xs.shape, self.routing.lengths.get(name), p, gen, xs.device)
            if start > row:
                pieces.append(y.new_zeros((start - row, *y.shape[1:])))
            pieces.append(self.lora_B[name](self.lora_A[name](xs)) * self.scaling[name])
            row = end
        if not pieces:
            return y
        if row < y.shape[0]:
            pieces.append(y.new_zeros((y.shape[0] - row, *y.shape[1:])))
        return y + torch.cat(pieces)  # one add: its backward is cheap slicing, not a copy per adapter


def dropout_mask(shape, length: int | None, p: float, gen, device) -> torch.Tensor:
    """Inverted-dropout scale [rows, T, C], drawn for the first `length` positions only (1 beyond them)."""
    if length is None or len(shape) != 3 or length >= shape[1]:
        return (torch.rand(shape, generator=gen, device=device) >= p) / (1 - p)
    mask = torch.ones(shape, device=device)
    mask[:, :length] = (torch.rand((shape[0], length, shape[2]), generator=gen, device=device) >= p) / (1 - p)
    return mask


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def routing_of(model: nn.Module) -> Routing:
    """The model's routing, created on first use."""
    if not hasattr(model, "lora_routing"):
        model.lora_routing = Routing()
    return model.lora_routing


def ensure_lora(model: nn.Module, names: list[str]) -> dict[str, LoRALinear]:
    """Turn these Linear layers of model into LoRALinear layers (keeping their weights); return them."""
    routing = routing_of(model)
    out = {}
    for name in names:
        mod = model.get_submodule(name)
        if not isinstance(mod, LoRALinear):
            parent, _, child = name.rpartition(".")
            mod = LoRALinear(mod, routing)
            setattr(model.get_submodule(parent) if parent else model, child, mod)
        out[name] = mod
    return out


def add_adapter(model: nn.Module, name: str, spec: LoRASpec, seed: int = 0) -> list[nn.Parameter]:
    """Add a fresh adapter to every module the spec names; returns its trainable parameters."""
    if any(name in m.lora_A for m in lora_layers(model).values()):
        raise ConfigError(f"adapter {name!r} already exists")
    init = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    drop = torch.Generator(device=device).manual_seed(seed + 1) if spec.dropout else None
    params = []
    for module_name, layer in ensure_lora(model, spec.modules(model)).items():
        layer.add(name, spec.rank, spec.scaling(spec.rank, module_name), spec.dropout, init, drop)
        params += [layer.lora_A[name].weight, layer.lora_B[name].weight]
    return params


def remove_adapter(model: nn.Module, name: str) -> None:
    for layer in lora_layers(model).values():
        if name in layer.lora_A:
            layer.remove(name)


def adapter_names(model: nn.Module) -> set[str]:
    return {n for layer in lora_layers(model).values() for n in layer.lora_A}


def segments(adapters: list[str | None]) -> list[tuple[str, int, int]]:
    """Per-row adapter names -> [(adapter, first row, end row)] over runs of equal names (None: base only)."""
    out: list[tuple[str, int, int]] = []
    for row, name in enumerate(adapters):
        if name is None:
            continue
        if out and out[-1][0] == name and out[-1][2] == row:
            out[-1] = (name, out[-1][1], row + 1)
        else:
            out.append((name, row, row + 1))
    return out


class route:
    """`with route(model, ["finance", "finance", None, "legal"]):` -- rows use these adapters."""

    def __init__(self, model: nn.Module, adapters: list[str | None] | None, lengths: dict[str, int] | None = None):
        self.routing = routing_of(model)
        self.new = segments(adapters or [])
        self.lengths = lengths or {}
        known = adapter_names(model)
        unknown = sorted({a for a in adapters or [] if a is not None} - known)
        if unknown:
            raise ConfigError(f"unknown adapter(s) {unknown}; loaded: {sorted(known)}")

    def __enter__(self) -> Routing:
        self.old = self.routing.segments, self.routing.lengths
        self.routing.segments, self.routing.lengths = self.new, self.lengths
        return self.routing

    def __exit__(self, *exc) -> None:
        self.routing.segments, self.routing.lengths = self.old


def regroup(segs: list[tuple[str, int, int]], counts: list[int]) -> list[tuple[str, int, int]]:
    """Row segments -> segments over items when row r owns counts[r] consecutive items (tiles of its images)."""
    starts = [0]
    for c in counts:
        starts.append(starts[-1] + c)
    return [(name, starts[a], starts[b]) for name, a, b in segs if starts[b] > starts[a]]
