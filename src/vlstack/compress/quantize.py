"""Quantising a model (`vlstack compress`'s quantize stage): its Linear layers replaced by QuantLinear
(layers/quant.py), with AWQ's activation-aware scaling from calibration examples when asked.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from ..layers.quant import QuantConfig, QuantLinear, dequantize, quantize_weight, swap, targets
from ..layers.step import packed_step


def awq_scale(w: torch.Tensor, x: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """AWQ's per-input-channel scale s [in] for a weight [out, in] and its calibration inputs x [N, in]: the
    weight's columns are quantised as W s and the inputs meet them as x / s, so channels that carry large
    activations get finer steps. s = mean|x|^a (normalised), a from a grid, the one whose quantised layer is
    nearest the float one on x."""
    w, x = w.detach().float(), x.float()
    want = x @ w.T  # [N, out]
    stat = x.abs().mean(0).clamp(min=1e-8)  # [in]
    best, best_err = torch.ones_like(stat), None
    for a in (0.0, 0.25, 0.5, 0.75, 1.0):
        s = stat**a
        s = s / (s.max() * s.min()).sqrt()
        err = ((x / s) @ dequantize(quantize_weight(w * s, cfg), cfg.bits, cfg.group_size).T - want).pow(2).mean()
        if best_err is None or err < best_err:
            best, best_err = s, err
    return best


def quantize_model(model: nn.Module, cfg: QuantConfig, examples: list[dict] | None = None) -> list[str]:
    """Replace the Linear layers cfg names (never the vision tower, projector or LM head) by QuantLinear; returns
    their names. With cfg.awq, each layer scaled for its inputs on the encoded examples (input_ids [T], pixel
    values)."""
    names = targets(model, cfg)
    inputs = layer_inputs(model, names, examples or []) if cfg.awq else {}
    for name in names:
        layer = model.get_submodule(name)
        scale = awq_scale(layer.weight, inputs[name], cfg) if cfg.awq else None  # [in]
        swap(model, name, QuantLinear.of(layer, cfg, scale))
    return names


@torch.no_grad()
def layer_inputs(model: nn.Module, names: list[str], examples: list[dict], rows: int = 512) -> dict:
    """Each named layer's inputs [<= rows, in] on the examples (the float model's, an even sample of tokens)."""
    if not examples:
        raise ConfigError("awq needs calibration examples")
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].detach().cpu()))
        for n in names
    ]
    try:
        for x in examples:
            ids, pixels = x["input_ids"].to(model.device), x.get("pixel_values")
            model(ids, packed_step([len(ids)], model.device), None if pixels is None else pixels.to(model.device))
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name, parts in seen.items():
        x = torch.cat([p.reshape(-1, p.shape[-1]) for p in parts])
        out[name] = x[torch.linspace(0, len(x) - 1, min(rows, len(x))).long()]
    return out
