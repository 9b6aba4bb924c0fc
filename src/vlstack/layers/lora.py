"""LoRA, the one home of it: many adapters on one frozen Linear at once.

The base matmul runs once over all rows of the batch; then each adapter adds `B(A(dropout(x))) * scaling`
to its own rows only (the mLoRA "BatchLoRA" idea). Which rows belong to which adapter is a `Routing`
shared by every LoRA layer of a model: a segment per run of rows (decode, a batch of tiles) or, in a
packed batch of sequences back to back, per run of tokens (training: one per job; the server's
prefill: one per adapter). In training, each row's LoRA dropout mask is drawn from a generator seeded by
the row's key (its example, set by the training step; a tile's: its place in its example), the layer and
the adapter, so a row gets the same mask however a step's rows are split into passes or processes, alone
or fused, resumed or recomputed. `replay` lets gradient checkpointing recompute a layer with its forward's routing.
Parameter names follow PEFT's in-memory names (`q_proj.lora_A.<adapter>.weight`), and the base weight keeps
its own name (`q_proj.weight`), so checkpoints are unaffected.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .step import upload

MAX_RANK = 1024  # the largest LoRA rank vlstack trains or loads
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-:]{0,63}")  # adapter names: a module key and a URL path segment


def check_name(name: object) -> str:
    """An adapter's name, checked: 1-64 letters, digits, '_', '-' or ':', starting with a letter or digit."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ConfigError(f"adapter name {name!r}: use 1-64 letters, digits, '_', '-' or ':' (no '.' or '/')")
    return name


LLM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PARTS = {  # where each part's Linear layers live (our module names)
    "language": re.compile(r"language_model\.layers\.\d+\.(self_attn|mlp)\.\w+"),
    "vision": re.compile(r"vision_tower\.encoder\.layer\.\d+\.(attention|mlp)\.\w+"),
    "projector": re.compile(r"multi_modal_projector\.linear_[12]"),
}


MODULES = ("vision_tower", "multi_modal_projector", "language_model", "lm_head")  # the model's top level


def under(name: str, prefix: str) -> bool:
    """Whether the weight `name` is `prefix` or inside the module `prefix` (dotted names)."""
    return name == prefix or name.startswith(prefix + ".")


def part_of(name: str) -> str:
    """The part a parameter of the model belongs to, by its name: vision, projector or language (the rest)."""
    if name.startswith("vision_tower."):
        return "vision"
    return "projector" if name.startswith("multi_modal_projector.") else "language"


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
        aliases = getattr(model, "lora_aliases", {})  # a family's own names for its LLM's layers (Phi-3's qkv_proj)
        llm_targets = {aliases.get(t, t) for t in self.targets}
        names = [
            name
            for name, mod in model.named_modules()
            if isinstance(mod, nn.Linear)
            and any(PARTS[p].fullmatch(name) for p in self.parts)
            and name.rsplit(".", 1)[-1] in (llm_targets if PARTS["language"].fullmatch(name) else self.targets)
        ]
        if not names:
            raise ConfigError(f"LoRA targets {list(self.targets)} match no Linear layer in parts {list(self.parts)}")
        return names


class Routing:
    """Which part of the current batch each adapter owns: [(adapter, first, end), ...] along the first axis of
    the activations: the tokens of a step's sequences back to back, or the tiles of its images."""

    def __init__(self) -> None:
        self.segments: list[tuple[str, int, int]] = []
        self.rows: list[tuple[int, int]] | None = None  # training: [(key, units)] of each sequence (or tile)
        self._generators: dict[torch.device, torch.Generator] = {}
        self.layers: dict[str, int] = {}  # adapter -> how many of the model's layers hold it
        self.slots: dict[str, int] = {}  # adapter -> its slot in every layer's stacked weights (inference steps)
        self.capacity, self.rank = 0, 0  # the stacks' slots, and ranks per slot (the largest adapter's)
        self.members: list[LoRALinear] = []  # every LoRA layer of the model
        self.fixed = False  # reserve(): the stacks keep their size
        self.version = 0  # counts adapters added, loaded and removed (a static step re-reads the stacks after one)
        # the segments (and training's row keys) over the step's image tiles, worked out before the step
        # (prepare_tiles) so that the forward needs no count from the device; None: the forward works them out
        self.tiles: tuple[list[tuple[str, int, int]], list[tuple[int, int]] | None] | None = None
        # training: every job's LoRA in one pair of matmuls per layer (the onehot), not a pair per job (None: on
        # a GPU, where a step's cost is its kernel launches; a CPU's is arithmetic, which the pair per job saves)
        self.fused: bool | None = None
        # the step's tokens by slot [T, capacity * rank] (1 on the ranks of a token's adapter's slot, else 0), set
        # for a step whose tokens run every adapter at once through the stacks (prepare_lora, the decode runner)
        self.onehot: torch.Tensor | None = None

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

    def dropout_mask(self, xs: torch.Tensor, start: int, end: int, p: float, salt: int) -> torch.Tensor:
        """The dropout mask (0, or 1 / (1 - p)) of units start..end, shaped like their activations
        xs: each row's part drawn from a generator seeded by the row's key and salt alone."""
        if self.rows is None:
            raise ConfigError("LoRA dropout in training needs each row's key (route(..., rows=))")
        gen = self._generators.get(xs.device)
        if gen is None:
            gen = self._generators[xs.device] = torch.Generator(device=xs.device)
        shape, parts, at = xs.shape[1:], [], 0
        for key, n in self.rows:
            if start <= at < end:
                gen.manual_seed((key * 0x9E3779B97F4A7C15 ^ salt) % 2**64)
                parts.append(torch.rand((n, *shape), generator=gen, device=xs.device))  # [n, ...]
            at += n
        return ((torch.cat(parts) >= p) / (1 - p)).view(xs.shape).to(xs.dtype)

    def token_slots(self, rows: int) -> torch.Tensor:
        """[rows]: the slot of each token's adapter, by the segments (-1: the base alone)."""
        slots = torch.full((rows,), -1)
        for name, start, end in self.segments:
            slots[start:end] = self.slots[name]
        return slots


def slot_onehot(slots: torch.Tensor, capacity: int, rank: int) -> torch.Tensor:
    """Tokens' adapter slots [T] (-1: none) -> [T, capacity * rank]: 1 on the ranks of the token's slot."""
    columns = torch.arange(capacity * rank, device=slots.device) // rank  # [S*R] each rank's slot
    return (slots[:, None] == columns).float()


class LoRALinear(nn.Linear):
    """A Linear layer with any number of named LoRA adapters. It takes over the base layer's tensors under their
    own names (checkpoints are unaffected) and runs the base layer's own forward: an nn.Linear's, or a quantised
    layer's (layers/quant.py: its integer weights, scales and settings)."""

    def __init__(self, base: nn.Linear, routing: Routing):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        for name, p in base.named_parameters(recurse=False):
            self.register_parameter(name, p)
        for name, b in base.named_buffers(recurse=False):
            self.register_buffer(name, b)
        self.bias = base.bias
        for name in getattr(base, "settings", ()):  # a quantised layer's settings
            setattr(self, name, getattr(base, name))
        self.base_forward = type(base).forward
        self.routing = routing
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, tuple[float, int]] = {}  # adapter -> (p, salt of its masks in this layer)
        self.name = ""  # the module's name in the model (ensure_lora): part of each dropout salt
        self.stack: Stack | None = None  # every adapter's weights in its slot (inference steps)

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
        self.routing.layers[name] = self.routing.layers.get(name, 0) + 1
        self.routing.assign(name, rank)
        self.routing.version += 1

    def remove(self, name: str) -> None:
        del self.lora_A[name], self.lora_B[name], self.scaling[name], self.dropout[name]
        if self.stack is not None:
            self.stack.clear(self.routing.slots[name])  # a slot used again carries nothing of this adapter
        self.routing.layers[name] -= 1
        self.routing.version += 1
        if not self.routing.layers[name]:
            del self.routing.layers[name], self.routing.slots[name]

    def base_like(self) -> torch.Tensor:
        """The base layer's float weight (or a quantised one's scales): its dtype and device."""
        return next(t for t in (*self.parameters(recurse=False), *self.buffers(recurse=False)) if t.is_floating_point())

    def delta(self, name: str) -> torch.Tensor:
        """The adapter's weight update B @ A * scaling: [out, in]."""
        return self.lora_B[name].weight @ self.lora_A[name].weight * self.scaling[name]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(self, x)  # [T, ..., out]: the base matmul, once for all rows
        if not torch.is_grad_enabled():  # no autograd: each update is added into its rows in place
            if self.routing.onehot is not None and x.dim() == 2:  # tokens [T, in] routed by slot
                return self._stacked(x, y)
            for name, start, end in self.routing.segments:
                if name in self.lora_A:
                    a, b = self.lora_A[name].weight, self.lora_B[name].weight
                    h = x.narrow(0, start, end - start).reshape(-1, self.in_features).to(a.dtype) @ a.t()  # [n, r]
                    ys = y.narrow(0, start, end - start).view(-1, self.out_features)  # [n, out], a view of y
                    if ys.dtype == h.dtype:
                        ys.addmm_(h, b.t(), alpha=self.scaling[name])
                    else:  # a half-precision base: the update added in float32, rounded once (as PEFT)
                        ys.add_(h @ b.t() * self.scaling[name])
            return y
        if self.routing.onehot is not None and x.dim() == 2:  # every job at once (prepare_lora)
            return self._stacked_params(x, y)
        pieces, done = [], 0  # the adapters' updates, zeros where no adapter applies
        for name, start, end in self.routing.segments:
            if name not in self.lora_A:
                continue
            xs = x.narrow(0, start, end - start)
            p, salt = self.dropout[name]
            if p and self.training:
                xs = xs * self.routing.dropout_mask(xs, start, end, p, salt)
            if start > done:
                pieces.append(_zeros(y, start - done))
            pieces.append(
                self.lora_B[name](self.lora_A[name](xs.to(self.lora_A[name].weight.dtype))) * self.scaling[name]
            )
            done = end
        if not pieces:
            return y
        if done < y.shape[0]:
            pieces.append(_zeros(y, y.shape[0] - done))
        return (y + torch.cat(pieces)).to(y.dtype)  # one add (float32 over a half-precision base, as PEFT)

    def _stacked_params(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """With autograd: every adapter's LoRA over the step's tokens [T, in] as in _stacked, the slots built from
        the adapters' own parameters (each gets its gradient back), each token's dropout mask its adapter's."""
        routing, rank = self.routing, self.routing.rank
        by_slot = {routing.slots[name]: name for name in self.lora_A}
        a_parts, b_parts = [], []
        for slot in range(routing.capacity):
            name = by_slot.get(slot)
            if name is None:
                a_parts.append(x.new_zeros(rank, self.in_features, dtype=torch.float32))
                b_parts.append(x.new_zeros(rank, self.out_features, dtype=torch.float32))
                continue
            a, b = self.lora_A[name].weight, self.lora_B[name].weight  # [r, in], [out, r]
            pad = rank - a.shape[0]
            a_parts.append(F.pad(a, (0, 0, 0, pad)))
            b_parts.append(F.pad(b.t() * self.scaling[name], (0, 0, 0, pad)))
        a_all, b_all = torch.cat(a_parts), torch.cat(b_parts)  # [S*R, in], [S*R, out]
        h = (self._dropped(x).to(a_all.dtype) @ a_all.t()) * routing.onehot  # [T, S*R]
        return (y + h @ b_all).to(y.dtype)

    def _dropped(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] with each token's LoRA dropout mask (its adapter's), in training."""
        parts, done = [], 0
        for name, start, end in self.routing.segments:
            p, salt = self.dropout.get(name, (0.0, 0))
            if not (p and self.training):
                continue
            if start > done:
                parts.append(x.new_ones(start - done, x.shape[1]))
            parts.append(self.routing.dropout_mask(x.narrow(0, start, end - start), start, end, p, salt))
            done = end
        if not parts:
            return x
        if done < x.shape[0]:
            parts.append(x.new_ones(x.shape[0] - done, x.shape[1]))
        return x * torch.cat(parts)

    def _stacked(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Every adapter at once, each token through its own slot: every slot's A as one matmul, the step's
        one-hot keeping each token's own slot's ranks, every slot's B (scaling folded in) as another -- two
        matmuls whatever the mix of adapters, tensors only (a captured step serves any mix)."""
        stack = self.stack
        if stack is None or stack.shape != (self.routing.capacity, self.routing.rank):  # not prepared
            stack = self.prepare(y)
        h = x.to(stack.a.dtype) @ stack.a.view(-1, self.in_features).t()  # [T, S*R]
        h.mul_(self.routing.onehot)  # each token keeps its own slot's ranks
        if h.dtype == y.dtype:
            return y.addmm_(h, stack.b.view(-1, self.out_features))  # [T, out]
        return y.add_(h @ stack.b.view(-1, self.out_features))  # float32 over a half-precision base, rounded once

    def prepare(self, like: torch.Tensor) -> Stack:
        """Before an inference step: the adapters' current weights in their slots. Python work with version
        counters, done before the step (prepare_lora) so that the step itself is tensors only."""
        routing, stack = self.routing, self.stack
        if stack is None or stack.shape != (routing.capacity, routing.rank):  # new, or the stacks grew
            stack = self.stack = Stack(routing.capacity, routing.rank, self.in_features, self.out_features, like)
        a_mods, b_mods = self.lora_A._modules, self.lora_B._modules  # (plain dicts: this runs at every step)
        for name in a_mods:
            stack.hold(
                routing.slots[name],
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


def _zeros(y: torch.Tensor, n: int) -> torch.Tensor:
    """Zeros shaped like y with n entries along the first axis."""
    return y.new_zeros(n, *y.shape[1:])


def prepare_lora(model: nn.Module, rows: int, device: torch.device) -> None:
    """Within `route(...)` of a step of `rows` tokens running several adapters: the routing gets the tokens'
    one-hot by slot, so that every layer runs all of them in one pair of matmuls; in inference every layer's
    stack takes the adapters' current weights first (the step then runs on tensors alone). In training, only
    where that pays (Routing.fused). One adapter, or none: the rows' segments."""
    routing = routing_of(model)
    if len({n for n, _, _ in routing.segments}) < 2:
        return
    if torch.is_grad_enabled():  # training: the onehot over the parameters themselves, where that pays
        if routing.fused if routing.fused is not None else device.type == "cuda":
            routing.onehot = slot_onehot(upload(routing.token_slots(rows), device), routing.capacity, routing.rank)
        return
    like = torch.empty(0, device=device, dtype=next(model.parameters()).dtype)
    for layer in routing.members:
        layer.prepare(like)
    routing.onehot = slot_onehot(upload(routing.token_slots(rows), device), routing.capacity, routing.rank)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRA layers by module name (the routing's members: no walk over the modules)."""
    return {m.name: m for m in routing_of(model).members}


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
            mod.name = name
            routing.members.append(mod)
            setattr(model.get_submodule(parent) if parent else model, child, mod)
        out[name] = mod
    return out


def add_adapter(model: nn.Module, name: str, spec: LoRASpec, seed: int = 0) -> list[nn.Parameter]:
    """Add a fresh adapter to every module the spec names; returns its trainable parameters."""
    check_name(name)
    if name in adapter_names(model):
        raise ConfigError(f"adapter {name!r} already exists")
    routing_of(model).check(name, spec.rank)
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
    return set(routing_of(model).layers)


def segments(adapters: list[str | None], counts: list[int] | None = None) -> list[tuple[str, int, int]]:
    """Adapter names, one per row (or per counts[i] consecutive units: the tokens of a packed sequence) ->
    [(adapter, first, end)] over runs of equal names (None: base only)."""
    out: list[tuple[str, int, int]] = []
    start = 0
    for name, n in zip(adapters, counts or [1] * len(adapters)):
        if name is not None and out and out[-1][0] == name and out[-1][2] == start:
            out[-1] = (name, out[-1][1], start + n)
        elif name is not None:
            out.append((name, start, start + n))
        start += n
    return out


class route:
    """`with route(model, ["finance", "finance", None, "legal"]):` -- rows use these adapters.

    With counts, adapters[i] covers the next counts[i] tokens (sequences back to back). rows: [(key, units)] of
    each sequence, for training's dropout masks."""

    def __init__(
        self,
        model: nn.Module,
        adapters: list[str | None] | None,
        counts: list[int] | None = None,
        rows: list[tuple[int, int]] | None = None,
    ):
        self.routing = routing_of(model)
        self.new = segments(adapters or [], counts), rows
        known = adapter_names(model)
        unknown = sorted({a for a in adapters or [] if a is not None} - known)
        if unknown:
            raise ConfigError(f"unknown adapter(s) {unknown}")  # (no list of the others: they may be other tenants')

    def __enter__(self) -> Routing:
        r = self.routing
        self.old = r.segments, r.rows, r.onehot, r.tiles
        (r.segments, r.rows), r.onehot, r.tiles = self.new, None, None
        return r

    def __exit__(self, *exc) -> None:
        self.routing.segments, self.routing.rows, self.routing.onehot, self.routing.tiles = self.old


def tiles_of(routing: Routing, image_tokens: torch.Tensor, per_tile: int) -> tuple[list, list | None]:
    """The routing's segments and row keys over the tiles of the images whose tokens are image_tokens [T]."""
    rows = tile_rows(routing.rows, image_tokens, per_tile) if routing.rows is not None else None
    return regroup(routing.segments, image_tokens, per_tile), rows


def prepare_tiles(model: nn.Module, image_tokens: torch.Tensor, per_tile: int) -> None:
    """Within `route(...)`, before a step with images: the tiles' segments from the step's image tokens [T] on
    the host, so that the forward itself needs nothing back from the device."""
    routing = routing_of(model)
    if routing.segments:
        routing.tiles = tiles_of(routing, image_tokens.cpu(), per_tile)


def regroup(segs: list[tuple[str, int, int]], image_tokens: torch.Tensor, per_tile: int) -> list[tuple[str, int, int]]:
    """Segments over tokens -> segments over image tiles, given which tokens are image tokens [T]: an adapter acts
    on the tiles of its own sequences' images."""
    ends = [0, *torch.cumsum(image_tokens, 0).div(per_tile, rounding_mode="floor").tolist()]  # tiles before each token
    return [(name, ends[a], ends[b]) for name, a, b in segs if ends[b] > ends[a]]


def tile_rows(rows: list[tuple[int, int]], image_tokens: torch.Tensor, per_tile: int) -> list[tuple[int, int]]:
    """Rows [(key, tokens)] of a packed batch and its image tokens (a mask [T]) -> a row per tile [(key, 1)], the
    key naming the tile's row and the place of its first token there (a tile's dropout masks follow from it)."""
    firsts = image_tokens.nonzero()[::per_tile, 0].tolist()  # the first token of each tile
    out, i, start = [], 0, 0
    for first in firsts:
        while first >= start + rows[i][1]:
            start += rows[i][1]
            i += 1
        out.append(((rows[i][0] << 24) + first - start, 1))
    return out


def replay(model: nn.Module) -> Callable[[], tuple[AbstractContextManager, AbstractContextManager]]:
    """`context_fn` for torch.utils.checkpoint: a layer recomputed in backward sees the LoRA routing of its
    forward (the `with route(...)` block has ended by then), and so draws the same dropout masks."""
    routing = routing_of(model)

    def context_fn() -> tuple[AbstractContextManager, AbstractContextManager]:
        forward = routing.segments, routing.rows, routing.onehot, routing.tiles

        @contextmanager
        def again() -> Iterator[None]:
            now = routing.segments, routing.rows, routing.onehot, routing.tiles
            routing.segments, routing.rows, routing.onehot, routing.tiles = forward
            try:
                yield
            finally:
                routing.segments, routing.rows, routing.onehot, routing.tiles = now

        return nullcontext(), again()

    return context_fn
