"""Tensor parallelism (Megatron-style) over torch.distributed: every decoder layer split across the ranks.

q/k/v and gate/up are column-parallel (each rank computes its heads and its MLP neurons), o and down are
row-parallel (each rank's partial sum, then one all-reduce each); the KV heads are split too (replicated
when there are fewer KV heads than ranks: each rank keeps the one its query heads read); the embedding and the
LM head are vocab-parallel (a masked lookup summed across the ranks; each rank's logits gathered). The vision
tower and the projector are replicated: at InternVL scales they are small beside the LLM, and each rank then
encodes its images with no collective at all.

`plan(model, tp)` shrinks a (meta) model's layers in place and returns which rows or columns of each full
weight a rank keeps; `shard(tensor, cut)` cuts a checkpoint tensor, or an adapter's LoRA matrix, by it. A LoRA
adapter is split with its base layer: B by the rows of a column-parallel layer (A whole), A by the columns of a
row-parallel one (B whole), so the partial sums of the base and of the adapter are reduced together.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field, replace
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig
from ..errors import ConfigError

TIMEOUT = float(os.environ.get("VLSTACK_DIST_TIMEOUT", "300"))  # seconds a collective waits for the other ranks


@dataclass
class TP:
    """This process's place in the tensor-parallel group, and the cuts of the model's weights it holds."""

    rank: int
    size: int
    cuts: dict[str, tuple[int, torch.Tensor]] = field(default_factory=dict)  # weight name -> (dim, kept indices)

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of every rank's x (in place)."""
        dist.all_reduce(x)
        return x

    def gather(self, x: torch.Tensor, total: int) -> torch.Tensor:
        """x [..., n] (this rank's part of the last axis) -> [..., total]: every rank's parts in rank order."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)[..., :total]


def init(size: int, device: torch.device) -> TP | None:
    """Join (or check) the process group of `size` ranks started by torchrun (or `vlstack serve --tp`): NCCL on
    GPUs, gloo on CPUs. Python's `random` is seeded alike on every rank (requests' sampling seeds come from it),
    so that the ranks' identical steps stay identical. size 1: None."""
    if size < 1:
        raise ConfigError(f"tp must be 1 or more, not {size}")
    if size == 1:
        return None
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ConfigError(
                f"tp={size} runs one process per device: start them with `torchrun --nproc-per-node "
                f"{size} ...` (or `vlstack serve --tp {size}`)"
            )
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=TIMEOUT))
    if dist.get_world_size() != size:
        raise ConfigError(f"tp={size}, but {dist.get_world_size()} processes were started (they must match)")
    seed = torch.tensor([random.getrandbits(62)])
    dist.broadcast(seed, 0)
    random.seed(int(seed))
    return TP(dist.get_rank(), size)


def local_device(device: torch.device) -> torch.device:
    """Under torchrun, "cuda" is this rank's GPU (LOCAL_RANK)."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device


def _rows(units: list[int], width: int, offset: int = 0) -> torch.Tensor:
    """The rows of these units (heads, neurons) of `width` rows each, from `offset`."""
    return torch.cat([torch.arange(offset + u * width, offset + (u + 1) * width) for u in units])


def heads(t: TextConfig, tp: TP) -> tuple[list[int], list[int]]:
    """The query heads and the KV heads this rank computes."""
    h, kv, n = t.num_attention_heads, t.num_key_value_heads, tp.size
    if h % n:
        raise ConfigError(f"tp={n} does not divide the {h} attention heads")
    q = list(range(tp.rank * h // n, (tp.rank + 1) * h // n))
    if kv % n == 0:
        return q, list(range(tp.rank * kv // n, (tp.rank + 1) * kv // n))
    if n % kv == 0:  # fewer KV heads than ranks: each kept whole by the ranks whose query heads read it
        return q, [tp.rank * kv // n]
    raise ConfigError(f"tp={n} and the {kv} KV heads: one must divide the other")


def qkv_rows(t: TextConfig, tp: TP) -> dict[str, torch.Tensor]:
    """The rows of the full q/k/v weights this rank keeps, by layer name and layout."""
    q, kv = heads(t, tp)
    d, h, hkv = t.head_dim, t.num_attention_heads, t.num_key_value_heads
    if t.qkv_layout == "separate":
        return {"q_proj": _rows(q, d), "k_proj": _rows(kv, d), "v_proj": _rows(kv, d)}
    if t.qkv_layout == "stacked":  # [Q; K; V]
        return {"qkv_proj": torch.cat([_rows(q, d), _rows(kv, d, h * d), _rows(kv, d, (h + hkv) * d)])}
    per = h // hkv  # grouped: per KV head, its query heads, then its key, then its value
    group = (per + 2) * d
    parts = []
    for g in kv:
        mine = [x - g * per for x in q if g * per <= x < (g + 1) * per]
        parts += [_rows(mine, d, g * group), _rows([per, per + 1], d, g * group)]
    return {"qkv_proj": torch.cat(parts)}


def _cut(layer: nn.Linear, dim: int, index: torch.Tensor, keep_bias: bool) -> None:
    """Shrink a Linear layer to these rows (dim 0) or columns (dim 1) of its weight."""
    layer.weight = nn.Parameter(layer.weight.index_select(dim, index), requires_grad=False)
    if layer.bias is not None:
        bias = layer.bias.index_select(0, index) if dim == 0 else layer.bias
        layer.bias = nn.Parameter(bias, requires_grad=False) if keep_bias else None
    layer.out_features, layer.in_features = layer.weight.shape


def plan(model: nn.Module, tp: TP) -> None:
    """Shrink model's decoder layers, embedding and LM head to this rank's part (the model on the meta device,
    before its weights are loaded), recording each cut in tp.cuts."""
    t: TextConfig = model.cfg.text
    if t.intermediate_size % tp.size:
        raise ConfigError(f"tp={tp.size} does not divide the MLP's {t.intermediate_size} neurons")
    n = t.intermediate_size // tp.size
    mlp = torch.arange(tp.rank * n, (tp.rank + 1) * n)
    q, kv = heads(t, tp)
    columns = {"o_proj": _rows(q, t.head_dim), "down_proj": mlp}  # row-parallel: their inputs' part
    gate_up = torch.cat([mlp, t.intermediate_size + mlp])  # [gate; up]: this rank's neurons of each
    rows = {**qkv_rows(t, tp), "gate_proj": mlp, "up_proj": mlp, "gate_up_proj": gate_up}
    for name, layer in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if not name.startswith("language_model.layers.") or last not in rows.keys() | columns.keys():
            continue
        dim, index = (0, rows[last]) if last in rows else (1, columns[last])
        _cut(layer, dim, index, keep_bias=dim == 0 or tp.rank == 0)  # a row-parallel bias: added once
        tp.cuts[name + ".weight"] = (dim, index)
        if dim == 0 and layer.bias is not None:
            tp.cuts[name + ".bias"] = (0, index)
    for layer in model.language_model.layers:
        layer.self_attn.n_heads, layer.self_attn.n_kv, layer.self_attn.tp = len(q), len(kv), tp
        layer.mlp.tp = tp
    vocab = -(-t.vocab_size // tp.size)  # rows per rank (the last rank's padded with zeros)
    rows_v = torch.arange(tp.rank * vocab, (tp.rank + 1) * vocab)
    embed = VocabEmbedding(vocab, t.hidden_size, tp.rank * vocab, tp)
    model.language_model.embed_tokens = embed
    model.lm_head = nn.Linear(t.hidden_size, vocab, bias=False, device="meta")
    if t.tie_word_embeddings:
        model.lm_head.weight = embed.weight
    tp.cuts["language_model.embed_tokens.weight"] = tp.cuts["lm_head.weight"] = (0, rows_v)
    model.tp = tp


def shard(x: torch.Tensor, cut: tuple[int, torch.Tensor] | None) -> torch.Tensor:
    """A full tensor -> this rank's part of it (indices past its end: zero rows, the vocabulary's padding)."""
    if cut is None:
        return x
    dim, index = cut
    size = x.shape[dim]
    if int(index[-1]) < size:
        return x.index_select(dim, index)
    kept = x.index_select(dim, index[index < size])
    pad = list(kept.shape)
    pad[dim] = int((index >= size).sum())
    return torch.cat([kept, kept.new_zeros(pad)], dim)


def shard_lora(tp: TP | None, module: str, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An adapter's A [r, in] and B [out, r] on `module` -> this rank's: B's rows of a column-parallel layer, A's
    columns of a row-parallel one."""
    cut = None if tp is None else tp.cuts.get(module + ".weight")
    if cut is None:
        return a, b
    return (a, shard(b, cut)) if cut[0] == 0 else (shard(a, (1, cut[1])), b)


def cache_config(t: TextConfig, tp: TP | None) -> TextConfig:
    """The text config as this rank's KV cache holds it: its KV heads only."""
    return t if tp is None else replace(t, num_key_value_heads=len(heads(t, tp)[1]))


class VocabEmbedding(nn.Embedding):
    """This rank's rows [start, start + n) of the embedding table: a token outside them looks up zeros, and the
    ranks' lookups are summed."""

    def __init__(self, n: int, width: int, start: int, tp: TP):
        super().__init__(n, width, device="meta")
        self.start, self.tp = start, tp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        inside = (local >= 0) & (local < self.num_embeddings)  # [T]
        x = F.embedding(local.clamp(0, self.num_embeddings - 1), self.weight) * inside[..., None]  # [T, C]
        return self.tp.reduce(x)
