"""LoRA: many adapters on one frozen Linear layer at once.

The base matmul runs once over all rows of the batch; then each adapter adds `B(A(dropout(x))) * scaling`
to its own rows only (the mLoRA "BatchLoRA" idea). Which rows are whose is the forward's route (lora_routing.py,
carried by the step). A layer runs its adapters one of two ways, with or without autograd alike: by segments (a
pair of matmuls per adapter over its rows: a CPU's way, where the cost is arithmetic) or by slots (every adapter
in one pair of matmuls over weights stacked by slot, each token keeping its own slot's ranks: tensors only, so a
captured decode step serves any mix of adapters, and a GPU's training step launches one pair, not one per job).
Each row's LoRA dropout mask comes from its key, the layer and the adapter (lora_routing.Route.dropout_mask).
Parameter names follow PEFT's in-memory names (`q_proj.lora_A.<adapter>.weight`), and the base weight keeps
its own name (`q_proj.weight`), so checkpoints are unaffected.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .lora_routing import Route, active, segments, slot_onehot, token_slots
from .step import upload

MAX_RANK = 1024  # the largest LoRA rank vlstack trains or loads
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-:]{0,63}")  # adapter names: a module key and a URL path segment


def check_name(name: object) -> str:
    """An adapter's name, checked: 1-64 letters, digits, '_', '-' or ':', starting with a letter or digit."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ConfigError(f"adapter name {name!r}: use 1-64 letters, digits, '_', '-' or ':' (no '.' or '/')")
    return name


LLM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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
        parts = model.parts  # the model's table of parts (models/internvl.py)
        unknown = set(self.parts) - set(parts)
        if unknown:
            raise ConfigError(f"unknown LoRA parts {sorted(unknown)}; choose from {sorted(parts)}")
        aliases = getattr(model, "lora_aliases", {})  # a family's own names for its LLM's layers (Phi-3's qkv_proj)
        llm_targets = {aliases.get(t, t) for t in self.targets}
        names = [
            name
            for name, mod in model.named_modules()
            if isinstance(mod, (nn.Linear, LoRALinear))
            and any(parts[p].fullmatch(name) for p in self.parts)
            and name.rsplit(".", 1)[-1] in (llm_targets if parts["language"].fullmatch(name) else self.targets)
        ]
        if not names:
            raise ConfigError(f"LoRA targets {list(self.targets)} match no Linear layer in parts {list(self.parts)}")
        return names


class Slots:
    """A model's adapters and their slots in every LoRA layer's stacked weights (the by-slot way): which slot each
    adapter holds, how many slots and ranks per slot the stacks have, and the model's LoRA layers."""

    def __init__(self) -> None:
        self.layers: dict[str, int] = {}  # adapter -> how many of the model's layers hold it
        self.slots: dict[str, int] = {}  # adapter -> its slot in every layer's stacked weights
        self.capacity, self.rank = 0, 0  # the stacks' slots, and ranks per slot (the largest adapter's)
        self.members: list[LoRALinear] = []  # every LoRA layer of the model
        self.fixed = False  # reserve(): the stacks keep their size
        self.version = 0  # counts adapters added, loaded and removed (a static step re-reads the stacks after one)
        # training: every job's LoRA by slots (None: on a GPU, where a step's cost is its kernel launches; a CPU's
        # is arithmetic, which the pair per job saves)
        self.fused: bool | None = None

    def reserve(self, slots: int, rank: int) -> None:
        """Fix the stacks at `slots` adapters of rank up to `rank` (the server's --max-adapters and
        --max-lora-rank): they never grow, so a hot-loaded adapter only writes into a free slot."""
        if len(self.slots) > slots or self.rank > rank:
            raise ConfigError(
                f"{len(self.slots)} adapters of rank up to {self.rank} are loaded already: over "
                f"{slots} adapters of rank {rank}"
            )
        self.capacity, self.rank, self.fixed = slots, rank, True

    def check(self, name: str, rank: int) -> None:
        """Refuse, before any layer takes it, an adapter the fixed stacks cannot hold."""
        if not self.fixed or name in self.slots:
            return
        if len(self.slots) >= self.capacity:
            raise ConfigError(f"all {self.capacity} adapter slots are taken (--max-adapters); unload one first")
        if rank > self.rank:
            raise ConfigError(
                f"the adapter's rank {rank} is over the largest this server holds, {self.rank} (--max-lora-rank)"
            )

    def assign(self, name: str, rank: int) -> None:
        """Give a new adapter a free slot; the stacks grow (doubling their slots) when there is none, or when
        its rank is over theirs. A layer's stack follows the next time it runs an inference step."""
        self.check(name, rank)
        if name not in self.slots:
            taken = set(self.slots.values())
            self.slots[name] = next(s for s in range(len(taken) + 1) if s not in taken)
        self.capacity = max(self.capacity, 1)
        while self.slots[name] >= self.capacity:
            self.capacity *= 2
        self.rank = max(self.rank, rank)

    def prepare(self, like: torch.Tensor) -> None:
        """Before inference steps by slot: every LoRA layer's stack holds the adapters' current weights (like: the
        base's dtype and device)."""
        for layer in self.members:
            layer.prepare(like)

    def onehot(self, segs: list[tuple[str, int, int]], rows: int, device: torch.device) -> torch.Tensor:
        """[rows, capacity * rank] on device: each token's slot, by the segments (tokens of no adapter: zeros)."""
        return slot_onehot(upload(token_slots(segs, self.slots, rows), device), self.capacity, self.rank)


class LoRALinear(nn.Module):
    """A Linear layer with any number of named LoRA adapters. It holds its base layer (an nn.Linear, or a
    quantised one: layers/quant.py) and runs the base's own forward; the base's tensors are its own under their
    own names (the same dicts: moving, sharding or loading the model moves the base's), so checkpoints are
    unaffected."""

    def __init__(self, base: nn.Module, slots: Slots):
        super().__init__()
        self.__dict__["base"] = base  # (not a child: its tensors are this layer's own, below)
        self._parameters, self._buffers = base._parameters, base._buffers
        self._non_persistent_buffers_set = base._non_persistent_buffers_set
        self.in_features, self.out_features = base.in_features, base.out_features
        self.slots = slots
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, tuple[float, int]] = {}  # adapter -> (p, salt of its masks in this layer)
        self.name = ""  # the module's name in the model (ensure_lora): part of each dropout salt
        self.stack: Stack | None = None  # every adapter's weights in its slot (inference steps by slot)

    def add(
        self,
        name: str,
        rank: int,
        scaling: float,
        dropout: float = 0.0,
        init: torch.Generator | None = None,
        seed: int = 0,
    ) -> None:
        """A new adapter initialised like PEFT: A Kaiming-uniform, B zeros (so it starts as a no-op); in float32
        over a half-precision base (as PEFT's autocast_adapter_dtype: trained weights and their optimizer state
        keep full precision)."""
        like = self.base_like()
        dtype = torch.promote_types(like.dtype, torch.float32)
        a = nn.Linear(self.in_features, rank, bias=False, device=like.device, dtype=dtype)
        b = nn.Linear(rank, self.out_features, bias=False, device=like.device, dtype=dtype)
        with torch.no_grad():
            bound = 1 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) on a [rank, in] matrix
            a.weight.copy_(torch.rand(a.weight.shape, generator=init) * 2 * bound - bound)
            b.weight.zero_()
        self.lora_A[name], self.lora_B[name] = a, b
        self.scaling[name] = scaling
        self.dropout[name] = (dropout, zlib.crc32(f"{self.name}/{name}/{seed}".encode()))
        self.slots.layers[name] = self.slots.layers.get(name, 0) + 1
        self.slots.assign(name, rank)
        self.slots.version += 1

    def remove(self, name: str) -> None:
        del self.lora_A[name], self.lora_B[name], self.scaling[name], self.dropout[name]
        if self.stack is not None:
            self.stack.clear(self.slots.slots[name])  # a slot used again carries nothing of this adapter
        self.slots.layers[name] -= 1
        self.slots.version += 1
        if not self.slots.layers[name]:
            del self.slots.layers[name], self.slots.slots[name]

    def base_like(self) -> torch.Tensor:
        """The base layer's float weight (or a quantised one's scales): its dtype and device."""
        return next(t for t in (*self._parameters.values(), *self._buffers.values()) if t.is_floating_point())

    def delta(self, name: str) -> torch.Tensor:
        """The adapter's weight update B @ A * scaling: [out, in]."""
        return self.lora_B[name].weight @ self.lora_A[name].weight * self.scaling[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # [T, ..., out]: the base matmul, once for all rows
        route = active()
        if route is None or not self.lora_A:
            return y
        if route.onehot is not None and x.dim() == 2:  # tokens [T, in], every adapter at once by slot
            a, b = self.by_slot()  # [S*R, in], [S*R, out] (scaling folded into b)
            h = (self.dropped(x, route).to(a.dtype) @ a.t()) * route.onehot  # [T, S*R]: each its own slot's ranks
            return y.addmm_(h, b) if h.dtype == y.dtype else y.add_(h @ b)  # (float32 over half: rounded once)
        pieces, done = [], 0  # by segments: each adapter's update on its own rows, zeros where none applies
        for name, start, end in route.segments:
            if name in self.lora_A:
                a, b = self.lora_A[name].weight, self.lora_B[name].weight  # [r, in], [out, r]
                xs = self.dropped(x.narrow(0, start, end - start), route, name, start)
                h = xs.to(a.dtype) @ a.t()  # [n, ..., r]
                if start > done:
                    pieces.append(y.new_zeros(start - done, *y.shape[1:], dtype=h.dtype))
                pieces.append(h @ b.t() * self.scaling[name])  # (as PEFT: over a half-precision base, rounded once)
                done = end
        if not pieces:
            return y
        if done < y.shape[0]:
            pieces.append(y.new_zeros(y.shape[0] - done, *y.shape[1:], dtype=pieces[0].dtype))
        return y.add_(pieces[0] if len(pieces) == 1 else torch.cat(pieces))  # one add, in place (no view: no copy)

    def dropped(self, x: torch.Tensor, route: Route, name: str | None = None, start: int = 0) -> torch.Tensor:
        """x (the step's rows from `start` on, all of adapter `name`'s; or, name None, every row) with each row's
        LoRA dropout mask (its adapter's) in training; x itself otherwise."""
        if not self.training:
            return x
        if name is not None:
            p, salt = self.dropout[name]
            return x * route.dropout_mask(x, start, start + x.shape[0], p, salt) if p else x
        mask = None
        for adapter, first, end in route.segments:
            p, salt = self.dropout.get(adapter, (0.0, 0))
            if p:
                mask = torch.ones_like(x) if mask is None else mask
                mask[first:end] = route.dropout_mask(x.narrow(0, first, end - first), first, end, p, salt)
        return x if mask is None else x * mask

    def by_slot(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every slot's A [S*R, in] and B^T * scaling [S*R, out]: in inference the stack (written before the step,
        so that the step is tensors only); with autograd, built from the adapters' own parameters (each gets its
        gradient back)."""
        if not torch.is_grad_enabled():
            stack = self.stack
            if stack is None or stack.shape != (self.slots.capacity, self.slots.rank):  # not prepared
                stack = self.prepare(self.base_like())
            return stack.a.view(-1, self.in_features), stack.b.view(-1, self.out_features)
        slots, rank = self.slots, self.slots.rank
        by_slot = {slots.slots[name]: name for name in self.lora_A}
        a_parts, b_parts = [], []
        like = self.base_like()
        for slot in range(slots.capacity):
            name = by_slot.get(slot)
            if name is None:
                a_parts.append(like.new_zeros(rank, self.in_features, dtype=torch.float32))
                b_parts.append(like.new_zeros(rank, self.out_features, dtype=torch.float32))
                continue
            a, b = self.lora_A[name].weight, self.lora_B[name].weight  # [r, in], [out, r]
            pad = rank - a.shape[0]
            a_parts.append(F.pad(a, (0, 0, 0, pad)))
            b_parts.append(F.pad(b.t() * self.scaling[name], (0, 0, 0, pad)))
        return torch.cat(a_parts), torch.cat(b_parts)

    def prepare(self, like: torch.Tensor) -> Stack:
        """Before an inference step by slot: the adapters' current weights in their slots. Python work with version
        counters, done before the step (route) so that the step itself is tensors only."""
        slots, stack = self.slots, self.stack
        if stack is None or stack.shape != (slots.capacity, slots.rank):  # new, or the stacks grew
            stack = self.stack = Stack(slots.capacity, slots.rank, self.in_features, self.out_features, like)
        a_mods, b_mods = self.lora_A._modules, self.lora_B._modules  # (plain dicts: this runs at every step)
        for name in a_mods:
            stack.hold(
                slots.slots[name],
                a_mods[name]._parameters["weight"],
                b_mods[name]._parameters["weight"],
                self.scaling[name],
            )
        return stack


class Stack:
    """A layer's adapters in slots, for inference steps: A [S, R, in] and B^T * scaling [S, R, out], each adapter's
    ranks in its slot (zeros past them); written from the adapters' weights when those are new or changed. In
    float32 over a half-precision base, as the adapters themselves (in bfloat16 the updates' rounding doubled a
    random model's distance from its float32 logits)."""

    def __init__(self, slots: int, rank: int, n_in: int, n_out: int, like: torch.Tensor):
        self.shape = (slots, rank)
        dtype = torch.promote_types(like.dtype, torch.float32)
        self.a = like.new_zeros(slots, rank, n_in, dtype=dtype)
        self.b = like.new_zeros(slots, rank, n_out, dtype=dtype)
        self.held: dict[int, tuple] = {}  # slot -> (A, B, their version counters, scaling) written there

    def hold(self, slot: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        """Write an adapter's weights (A [r, in], B [out, r]) into its slot unless they are there already."""
        versions = None if a.is_inference() or b.is_inference() else (a._version, b._version)
        held = self.held.get(slot)
        if held and versions is not None and held[0] is a and held[1] is b and held[2:] == (versions, scaling):
            return
        self.clear(slot)
        r = a.shape[0]
        self.a[slot, :r] = a
        self.b[slot, :r] = b.t() * scaling
        self.held[slot] = (a, b, versions, scaling)

    def clear(self, slot: int) -> None:
        if slot >= self.shape[0]:  # an adapter added since this stack was made (it is remade before use)
            return
        with torch.inference_mode(self.a.is_inference()):  # (written in inference steps, cleared outside them)
            self.a[slot].zero_()
            self.b[slot].zero_()
        self.held.pop(slot, None)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRA layers by module name (its slots' members: no walk over the modules)."""
    return {m.name: m for m in slots_of(model).members}


def slots_of(model: nn.Module) -> Slots:
    """The model's adapter slots, created on first use."""
    if "lora_slots" not in model.__dict__:
        model.__dict__["lora_slots"] = Slots()
    return model.__dict__["lora_slots"]


def ensure_lora(model: nn.Module, names: list[str]) -> dict[str, LoRALinear]:
    """Turn these Linear layers of model into LoRALinear layers (keeping their weights); return them."""
    slots = slots_of(model)
    out = {}
    for name in names:
        mod = model.get_submodule(name)
        if not isinstance(mod, LoRALinear):
            parent, _, child = name.rpartition(".")
            mod = LoRALinear(mod, slots)
            mod.name = name
            slots.members.append(mod)
            setattr(model.get_submodule(parent) if parent else model, child, mod)
        out[name] = mod
    return out


def add_adapter(model: nn.Module, name: str, spec: LoRASpec, seed: int = 0) -> list[nn.Parameter]:
    """Add a fresh adapter to every module the spec names; returns its trainable parameters."""
    check_name(name)
    if name in adapter_names(model):
        raise ConfigError(f"adapter {name!r} already exists")
    slots_of(model).check(name, spec.rank)
    init = torch.Generator().manual_seed(seed)
    params = []
    for module_name, layer in ensure_lora(model, spec.modules(model)).items():
        layer.add(name, spec.rank, spec.scaling(spec.rank, module_name), spec.dropout, init, seed)
        params += [layer.lora_A[name].weight, layer.lora_B[name].weight]
    return params


def remove_adapter(model: nn.Module, name: str) -> None:
    for layer in lora_layers(model).values():
        if name in layer.lora_A:
            layer.remove(name)


def adapter_names(model: nn.Module) -> set[str]:
    """The adapters loaded on model (kept by its layers as they add and remove them: no walk over the modules,
    which route() would otherwise pay at every decode step)."""
    return set(slots_of(model).layers)


def route(
    model: nn.Module,
    adapters: list[str | None] | None,
    counts: list[int] | None = None,
    keys: list[tuple[int, int]] | None = None,
    tiles: tuple[torch.Tensor, int] | None = None,
    device: torch.device | None = None,
) -> Route:
    """The route of a step whose rows use these adapters (`route(model, ["finance", "finance", None, "legal"])`),
    for its `Step.lora`. With counts, adapters[i] covers the next counts[i] tokens (sequences back to back); keys:
    [(key, units)] of each sequence, for training's dropout masks; tiles: (the step's image tokens [T] on the host,
    tokens per tile), to work out the route over its tiles now rather than in the forward (no count from the
    device). Several adapters: in inference every layer's stack takes their current weights and the route gets
    the tokens' slots, so each layer runs them all in one pair of matmuls and the step is tensors only; in
    training, the same where that pays (Slots.fused). Python work, done before the step."""
    slots = slots_of(model)
    unknown = sorted({a for a in adapters or [] if a is not None} - set(slots.layers))
    if unknown:
        raise ConfigError(f"unknown adapter(s) {unknown}")  # (no list of the others: they may be other tenants')
    r = Route(segments(adapters or [], counts), keys)
    device = device or next(model.parameters()).device
    if len({n for n, _, _ in r.segments}) >= 2:
        rows = sum(counts) if counts else len(adapters or [])
        if not torch.is_grad_enabled():
            slots.prepare(torch.empty(0, device=device, dtype=next(model.parameters()).dtype))
            r.onehot = slots.onehot(r.segments, rows, device)
        elif slots.fused if slots.fused is not None else device.type == "cuda":
            r.onehot = slots.onehot(r.segments, rows, device)
    if tiles is not None and r.segments:
        r.tiles = r.over_tiles(*tiles)
    return r
