"""Structured pruning of the language model, Minitron-style (arXiv 2407.14679): the importance of each MLP neuron,
each KV-head group (a KV head with its query heads, so grouped-query attention stays whole), each embedding channel
and each layer, measured from activations on a calibration set; then the least important cut away to a target.
The result is an ordinary, smaller model (a smaller config) that vlstack and transformers both load.

Importance, summed over the calibration tokens' mean:
- MLP neuron: |act(gate) * up|, the down projection's input;
- KV group: the L2 norm of each query head's output (the o projection's input), summed over the group's heads;
- embedding channel: |RMSNorm output| over every norm of the decoder (its layers' two and the final one);
- layer: 1 - the cosine similarity of the layer's input and output (a layer that changes little matters little).

Targets (`PruneConfig`): the fraction of MLP neurons, of KV groups and of embedding channels kept, and the number
of layers kept; 1.0 (and all layers) keeps the model exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_fields
from ..errors import ConfigError
from ..layers.norm import RMSNorm
from ..layers.step import packed_step
from ..models.internvl import layer_of


@dataclass
class PruneConfig:
    mlp: float = 1.0  # fraction of each layer's MLP neurons kept
    heads: float = 1.0  # fraction of each layer's KV groups kept
    hidden: float = 1.0  # fraction of the embedding channels kept
    layers: int | None = None  # layers kept (None: all)
    data: str | None = None  # calibration JSONL (the training format); None: the stage needs examples given
    samples: int = 32  # calibration examples used

    def check(self) -> PruneConfig:
        check_fields(self, "prune")
        for name in ("mlp", "heads", "hidden"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ConfigError(f"prune {name} must be a fraction in (0, 1] of what is kept (got {value!r})")
        if self.layers is not None and (not isinstance(self.layers, int) or self.layers < 1):
            raise ConfigError(f"prune layers must be a number of layers kept, >= 1 (got {self.layers!r})")
        if self.samples < 1:
            raise ConfigError("prune samples must be >= 1")
        if self.data is not None and not Path(self.data).is_file():
            raise ConfigError(f"prune data {self.data} is not a file")
        return self

    def targets(self, t) -> tuple[int, int, int, int]:
        """(layers, MLP neurons, KV groups, embedding channels) kept of the text config t; a clear error for a
        target the model cannot meet."""
        layers = self.layers if self.layers is not None else t.num_hidden_layers
        if layers > t.num_hidden_layers:
            raise ConfigError(f"prune layers {layers}: the model has {t.num_hidden_layers}")
        return (
            layers,
            kept(t.intermediate_size, self.mlp, "the MLP"),
            kept(t.num_key_value_heads, self.heads, "the KV heads"),
            kept(t.hidden_size, self.hidden, "the embedding channels"),
        )


def pruned_width(t, kept: tuple[int, int, int, int]) -> Callable[[str, int], int]:
    """A linear layer's inputs once pruned to kept (targets()) -> a function of (its name, its inputs now)."""
    _, mlp, groups, hidden = kept
    heads = groups * (t.num_attention_heads // t.num_key_value_heads) * t.head_dim

    def width(name: str, in_features: int) -> int:
        if not name.startswith("language_model."):  # (the vision tower and projector are not pruned)
            return in_features
        if name.endswith("o_proj"):
            return heads
        if name.endswith("down_proj"):
            return mlp
        return hidden if in_features == t.hidden_size else in_features

    return width


def kept(n: int, fraction: float, what: str) -> int:
    k = round(n * fraction)
    if k < 1:
        raise ConfigError(f"pruning {what} to {fraction} of {n} leaves nothing")
    return k


@torch.no_grad()
def importance(vlm, examples: list[dict]) -> dict[str, torch.Tensor]:
    """Importance scores from the encoded examples (input_ids [T], pixel_values): mlp [L, I], groups [L, Hkv],
    hidden [C], layers [L]."""
    model, t = vlm.model, vlm.cfg.text
    lm = model.language_model
    n_layers, q_per_kv = t.num_hidden_layers, t.num_attention_heads // t.num_key_value_heads
    sums = {
        "mlp": torch.zeros(n_layers, t.intermediate_size),
        "groups": torch.zeros(n_layers, t.num_key_value_heads),
        "hidden": torch.zeros(t.hidden_size),
        "layers": torch.zeros(n_layers),
    }
    hooks = []

    def on(module: nn.Module, fn, pre: bool = False) -> None:
        hooks.append(module.register_forward_pre_hook(fn) if pre else module.register_forward_hook(fn))

    def add(name: str, i: int | None, value: torch.Tensor) -> None:  # (a hook returns nothing: outputs stay)
        (sums[name] if i is None else sums[name][i]).add_(value.cpu())

    for i, layer in enumerate(lm.layers):
        on(layer.mlp.down_proj, lambda m, a, i=i: add("mlp", i, a[0].float().abs().mean(0)), pre=True)

        def heads(m, a, i=i):
            y = a[0].float().view(a[0].shape[0], t.num_key_value_heads, q_per_kv, t.head_dim)  # [T, Hkv, q, D]
            add("groups", i, y.norm(dim=-1).mean(0).sum(-1))

        on(layer.self_attn.o_proj, heads, pre=True)
        on(layer, lambda m, a, out, i=i: add("layers", i, 1 - F.cosine_similarity(a[0].float(), out.float()).mean()))
    for norm in [m for m in lm.modules() if isinstance(m, RMSNorm) and m.weight.shape[0] == t.hidden_size]:
        on(norm, lambda m, a, out: add("hidden", None, out.float().abs().mean(0)))
    try:
        for x in examples:
            ids = x["input_ids"].to(model.device)
            pixels = x.get("pixel_values")
            model(ids, packed_step([len(ids)], model.device), None if pixels is None else pixels.to(model.device))
    finally:
        for h in hooks:
            h.remove()
    return {k: v / len(examples) for k, v in sums.items()}


def top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of the k largest scores, in their original order."""
    return scores.topk(k).indices.sort().values


@torch.no_grad()
def prune(vlm, cfg: PruneConfig, scores: dict[str, torch.Tensor]) -> None:
    """Cut vlm's language model to cfg's targets by the scores (importance()); vlm.model and vlm.cfg are replaced
    by the smaller model and its config."""
    from ..api import build_model  # (a model built from a state dict: the same path as loading)

    t = vlm.cfg.text
    n_layers, neurons, groups, width = cfg.targets(t)
    layers = top(scores["layers"], n_layers).tolist()
    channels = top(scores["hidden"], width)
    q_per_kv, d = t.num_attention_heads // t.num_key_value_heads, t.head_dim
    state = {k: v for k, v in vlm.model.state_dict().items() if ".lora_" not in k}
    out = {}
    for name, w in state.items():
        i = layer_of(name)
        if i is None:  # (not in a decoder layer)
            out[name] = w
            continue
        rest = name.split(".", 3)[3]
        if i not in layers:
            continue
        keep_n, keep_g = top(scores["mlp"][i], neurons), top(scores["groups"][i], groups)
        rows_kv = (keep_g[:, None] * d + torch.arange(d)).flatten()  # [g*D] of the k/v rows
        heads = (keep_g[:, None] * q_per_kv + torch.arange(q_per_kv)).flatten()
        rows_q = (heads[:, None] * d + torch.arange(d)).flatten()  # [g*q*D] of the q rows
        part = rest.rsplit(".", 1)[0]
        if part == "self_attn.qkv_proj":  # fused: [Q; K; V] (Phi-3), or per KV group its q heads, k, v (InternLM2)
            if t.qkv_layout == "stacked":
                q_rows, kv_rows = t.num_attention_heads * d, t.num_key_value_heads * d
                w = w[torch.cat([rows_q, q_rows + rows_kv, q_rows + kv_rows + rows_kv])]
            else:
                w = w[(keep_g[:, None] * (q_per_kv + 2) * d + torch.arange((q_per_kv + 2) * d)).flatten()]
        elif part == "mlp.gate_up_proj":  # fused: [gate; up]
            w = w[torch.cat([keep_n, t.intermediate_size + keep_n])]
        elif part in ("mlp.gate_proj", "mlp.up_proj"):
            w = w[keep_n]
        elif part == "mlp.down_proj":
            w = w[:, keep_n]
        elif part == "self_attn.q_proj":
            w = w[rows_q]
        elif part in ("self_attn.k_proj", "self_attn.v_proj"):
            w = w[rows_kv]
        elif part == "self_attn.o_proj" and w.dim() == 2:
            w = w[:, rows_q]
        out[f"language_model.layers.{layers.index(i)}.{rest}"] = w
    for name, w in out.items():  # the embedding channels, wherever the hidden size is an axis
        out[name] = _channels(name, w, channels)
    vlm.cfg.text = replace(
        t,
        num_hidden_layers=n_layers,
        intermediate_size=neurons,
        num_key_value_heads=groups,
        num_attention_heads=groups * q_per_kv,
        hidden_size=len(channels),
        head_dim=d,
    )
    if t.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    vlm.swap_model(build_model(vlm.cfg, out, vlm.model.device, vlm.model.dtype))


def calibration(vlm, cfg) -> list[dict]:
    """The first cfg.samples examples of cfg.data (a prune or quantize stage's options), encoded."""
    from ..train.data import encode_example, read_dataset

    if cfg.data is None:
        raise ConfigError("this stage needs calibration data: data: a JSONL of examples (the training format)")
    return [encode_example(vlm.processor, ex, 8192) for ex in read_dataset(cfg.data)[: cfg.samples]]


# where the LLM's hidden size is an axis: which axes of which weights (by the module's last name)
INPUTS = {
    "q_proj",
    "k_proj",
    "v_proj",
    "qkv_proj",
    "gate_proj",
    "up_proj",
    "gate_up_proj",
    "embed_tokens",
    "lm_head",
    "linear_2",
}  # columns
OUTPUTS = {"o_proj", "down_proj", "linear_1", "linear_2", "input_layernorm", "post_attention_layernorm", "norm"}


def _channels(name: str, w: torch.Tensor, channels: torch.Tensor) -> torch.Tensor:
    """w with only the kept embedding channels, along each axis that is the LLM's hidden size."""
    if not name.startswith(("language_model.", "lm_head", "multi_modal_projector.")):
        return w
    module, kind = name.rsplit(".", 2)[-2:]
    if module in OUTPUTS:  # its output (rows; a norm's or a bias' only axis)
        w = w[channels]
    if module in INPUTS and kind == "weight":  # its input (columns; the embeddings' width)
        w = w[:, channels]
    return w
