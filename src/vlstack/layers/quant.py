"""Quantised Linear layers and their configuration: weight-only quantisation of the language model's Linear
layers, int8 with a scale per output channel, or int4 with a scale and a zero point per group of `group_size`
inputs. The vision tower, the projector and the LM head stay in full precision (as InternVL's own quantised
releases keep them).

`QuantLinear` holds the integers and their scales; its forward is `x @ dequant(W).T + b` (the reference: exact
to the dequantised weights), or with `kernel="fast"` the device's quantised kernel, near the reference but not
bit-equal: on a CPU, int8 through fbgemm's W8A8 (activations quantised per token on the fly) and int4 through
PyTorch's int4 matmul with bfloat16 activations; on a GPU int8 always runs PyTorch's weight-only int8 matmul.
A LoRA adapter wraps a QuantLinear as it wraps a Linear (layers/lora.py).

A quantised checkpoint is an ordinary one whose quantised layers are stored as `<name>.qweight` (int8; int4 two
to a byte), `<name>.scales` (and `<name>.zeros` for int4), with a `quantization_config` in config.json saying
exactly what was done; `vlstack.load` reads it back (quantized_layout). Making one (calibration, AWQ) is
compress/quantize.py's.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_fields
from ..errors import ConfigError

METHOD = "vlstack"
SKIP = ("vision_tower", "multi_modal_projector", "lm_head")  # kept in full precision by default


@dataclass
class QuantConfig:
    bits: int = 8  # 8: per output channel; 4: per group
    group_size: int = 128  # (int4) inputs sharing a scale and zero point
    kernel: str = "reference"  # "reference": x @ dequant(W).T; "fast": the device's quantised kernel
    modules: str = "language"  # which Linear layers: a part of the model's (language, vision, projector), or a regex
    # over their names (whole name)
    full_precision: tuple[str, ...] = SKIP  # name prefixes never quantised (set [] and modules: .* for all)
    awq: bool = False  # activation-aware scaling (AWQ-style) from the calibration examples of `data`
    data: str | None = None  # calibration JSONL (the training format), for awq
    samples: int = 16  # calibration examples used

    def check(self) -> QuantConfig:
        check_fields(self, "quantize")
        if self.bits not in (4, 8):
            raise ConfigError(f"quantisation bits must be 4 or 8 (got {self.bits})")
        if self.bits == 4 and (self.group_size < 2 or self.group_size % 2):
            raise ConfigError(f"int4 group_size must be an even number >= 2 (got {self.group_size})")
        if self.kernel not in ("reference", "fast"):
            raise ConfigError(f"quantisation kernel must be reference or fast (got {self.kernel!r})")
        if self.kernel == "fast" and self.bits == 4 and self.group_size not in (32, 64, 128, 256):
            raise ConfigError("the fast int4 kernel takes group_size 32, 64, 128 or 256")
        self.full_precision = tuple(self.full_precision)
        if self.awq and (self.data is None or not Path(self.data).is_file()):
            raise ConfigError(f"awq needs calibration data: data: a JSONL file (got {self.data!r})")
        if self.samples < 1:
            raise ConfigError(f"quantize samples must be >= 1 (got {self.samples})")
        try:
            re.compile(self.modules)
        except re.error as e:
            raise ConfigError(f"quantize modules {self.modules!r} is not a valid regex: {e}") from None
        return self

    def check_device(self, device: torch.device) -> QuantConfig:
        """A clear error, before any work, for a kernel this device cannot run."""
        if self.kernel == "fast" and device.type == "cpu":
            if self.bits == 8 and "fbgemm" not in cpu_engines():
                raise ConfigError(
                    "the fast int8 kernel on a CPU needs PyTorch's fbgemm engine (x86); use kernel: reference"
                )
            if self.bits == 4 and not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
                raise ConfigError("this PyTorch has no CPU int4 kernel; use kernel: reference")
        return self

    def to_json(self) -> dict:
        return {"quant_method": METHOD, **asdict(self), "full_precision": list(self.full_precision)}

    @staticmethod
    def from_json(raw: dict) -> QuantConfig:
        if raw.get("quant_method") != METHOD:
            raise ConfigError(
                f"quantization_config quant_method {raw.get('quant_method')!r} is not supported "
                f"(vlstack reads its own, {METHOD!r})"
            )
        fields = {k: raw[k] for k in ("bits", "group_size", "kernel", "modules", "awq") if k in raw}
        return QuantConfig(**fields, full_precision=tuple(raw.get("full_precision", SKIP)), data=None).check_stored()

    def check_stored(self) -> QuantConfig:
        """A stored config's check (its calibration data was used when it was made: not needed to load it)."""
        awq, self.awq = self.awq, False
        self.check()
        self.awq = awq
        return self


def cpu_engines() -> list[str]:
    """PyTorch's quantized engines on this machine (fbgemm on x86)."""
    return list(torch.backends.quantized.supported_engines)


def quantize_weight(w: torch.Tensor, cfg: QuantConfig) -> dict[str, torch.Tensor]:
    """A float weight [out, in] -> its stored tensors: qweight, scales (and zeros for int4)."""
    w = w.detach().float()
    if cfg.bits == 8:  # symmetric, per output channel
        scales = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)  # [out]
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        return {"qweight": q, "scales": scales}
    out, n = w.shape
    if n % cfg.group_size:
        raise ConfigError(f"int4 group_size {cfg.group_size} does not divide the layer's {n} inputs")
    g = w.view(out, n // cfg.group_size, cfg.group_size)  # [out, groups, size]
    low, high = g.amin(dim=2), g.amax(dim=2)  # asymmetric: 0..15 spans each group's range
    scales = ((high - low) / 15).clamp(min=1e-12)  # [out, groups]
    zeros = torch.round(-low / scales).clamp(0, 15)
    q = (torch.round(g / scales[..., None]) + zeros[..., None]).clamp(0, 15).to(torch.uint8).view(out, n)
    return {"qweight": q[:, 0::2] | (q[:, 1::2] << 4), "scales": scales, "zeros": zeros}  # two a byte


def dequantize(t: dict[str, torch.Tensor], bits: int, group_size: int) -> torch.Tensor:
    """Stored tensors -> the float weight [out, in] they stand for."""
    if bits == 8:
        return t["qweight"].float() * t["scales"].float()[:, None]
    q = t["qweight"]
    q = torch.stack([q & 15, q >> 4], dim=2).view(q.shape[0], -1).float()  # [out, in]
    out, n = q.shape
    g = q.view(out, n // group_size, group_size) - t["zeros"].float()[..., None]
    return (g * t["scales"].float()[..., None]).view(out, n)


class QuantLinear(nn.Linear):
    """A Linear whose weight is stored quantised (no float weight is kept)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, cfg: QuantConfig, device=None, dtype=None):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.quant = in_features, out_features, cfg
        kw = dict(device=device)
        if cfg.bits == 8:
            self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, **kw))
            self.register_buffer("scales", torch.empty(out_features, dtype=dtype, **kw))
        else:
            groups = in_features // cfg.group_size
            self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, **kw))
            self.register_buffer("scales", torch.empty(out_features, groups, dtype=dtype, **kw))
            self.register_buffer("zeros", torch.empty(out_features, groups, dtype=dtype, **kw))
        if cfg.awq:  # x * input_scale meets the weight quantised with its columns divided by it
            self.register_buffer("input_scale", torch.ones(in_features, dtype=dtype, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, **kw), requires_grad=False) if bias else None
        self.packed = None  # the fast kernel's prepacked weight (built on first use)

    @staticmethod
    def of(linear: nn.Linear, cfg: QuantConfig, scale: torch.Tensor | None = None) -> QuantLinear:
        """Quantise a Linear layer; with cfg.awq, its weight's columns multiplied by scale [in] first (AWQ's, from
        calibration inputs: compress/quantize.py) and its inputs divided by it."""
        w = linear.weight
        q = QuantLinear(linear.in_features, linear.out_features, linear.bias is not None, cfg, w.device, w.dtype)
        if cfg.awq and scale is None:
            raise ConfigError("an AWQ layer needs its input scale (compress.quantize.awq_scale)")
        for name, t in quantize_weight(w if scale is None else w * scale, cfg).items():
            getattr(q, name).copy_(t)
        if scale is not None:
            q.input_scale.copy_(1 / scale)
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach())
        return q

    def dequantized(self) -> torch.Tensor:
        return dequantized(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(self, x)


def dequantized(layer: QuantLinear, raw: bool = False) -> torch.Tensor:
    """The float weight [out, in] a quantised layer's integers stand for, in its scales' dtype (with AWQ's input
    scale folded in, unless raw)."""
    tensors = {n: b for n, b in layer.named_buffers(recurse=False)}
    w = dequantize(tensors, layer.quant.bits, layer.quant.group_size)
    if layer.quant.awq and not raw:
        w = w * layer.input_scale.float()
    return w.to(layer.scales.dtype)


def quantized_linear(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """x [..., in] -> [..., out] through a quantised layer."""
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    fast = (layer.quant.bits == 8 and x.is_cuda) or (layer.quant.kernel == "fast" and x.device.type == "cpu")
    if not fast:
        return F.linear(x, dequantized(layer).to(x.dtype), bias)
    rows = x.reshape(-1, layer.in_features)
    if layer.quant.awq:
        rows = rows * layer.input_scale.to(x.dtype)
    if layer.quant.bits == 8 and x.is_cuda:  # the int8 weight-only matmul kernel (no float weight made)
        y = torch._weight_int8pack_mm(rows, layer.qweight, layer.scales.to(x.dtype))
    else:
        y = (_w8a8 if layer.quant.bits == 8 else _int4)(layer, rows).to(x.dtype)
    y = y.view(*x.shape[:-1], layer.out_features)
    return y if bias is None else y + bias


def _w8a8(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """x [N, in] -> [N, out]: fbgemm's int8 x int8 kernel, the activations quantised per token on the fly."""
    if layer.packed is None:
        zero = torch.zeros(layer.out_features, dtype=torch.long)
        with warnings.catch_warnings():  # (PyTorch marks its quantized tensors deprecated; the kernel stays)
            warnings.simplefilter("ignore")
            w = torch.quantize_per_channel(
                dequantized(layer, raw=True).float(), layer.scales.float(), zero, 0, torch.qint8
            )
        layer.packed = torch.ops.quantized.linear_prepack(w, None)
    # reduce_range: activations in 7 bits, as torch's own dynamic quantisation takes them for fbgemm: on a CPU
    # without VNNI, pairs of 8-bit products overflow the int16 sums of its AVX2 kernel
    return torch.ops.quantized.linear_dynamic(x.float(), layer.packed, reduce_range=True)


def _int4(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """x [N, in] -> [N, out]: PyTorch's CPU int4 matmul, bfloat16 activations. Its weight: w = (q - 8) s + m per
    group, so m = (8 - zero) s."""
    if layer.packed is None:
        q = layer.qweight
        q = torch.stack([q & 15, q >> 4], dim=2).view(q.shape[0], -1).to(torch.int32)  # [out, in]
        scales, zeros = layer.scales.float().t(), layer.zeros.float().t()  # [groups, out]
        pairs = torch.stack([scales, (8 - zeros) * scales], dim=2).to(torch.bfloat16).contiguous()  # [groups, out, 2]
        layer.packed = (torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), pairs)
    weight, pairs = layer.packed
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), weight, layer.quant.group_size, pairs)


def quantized_layout(model: nn.Module, cfg: QuantConfig) -> None:
    """Empty QuantLinear layers in place of the Linear layers cfg names (a model on the meta device, to load a
    quantised checkpoint into)."""
    for name in targets(model, cfg):
        lin = model.get_submodule(name)
        w = lin.weight
        swap(model, name, QuantLinear(lin.in_features, lin.out_features, lin.bias is not None, cfg, w.device, w.dtype))


def targets(model: nn.Module, cfg: QuantConfig, width: Callable[[str, int], int] | None = None) -> list[str]:
    """The Linear layers cfg quantises; int4: each one's inputs (width(name, in_features): what they will be,
    after a pruning still to come) a multiple of the group size."""
    parts = getattr(model, "parts", {})  # the model's table of parts (models/internvl.py)
    pattern = parts[cfg.modules] if cfg.modules in parts else re.compile(cfg.modules)
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and pattern.fullmatch(n)]
    names = [n for n in names if not n.startswith(tuple(cfg.full_precision))]
    if not names:
        raise ConfigError(f"quantisation modules {cfg.modules!r} match no Linear layer of the model")
    if cfg.bits == 4:
        widths = {n: (width or (lambda _, k: k))(n, model.get_submodule(n).in_features) for n in names}
        bad = [n for n in names if widths[n] % cfg.group_size]
        if bad:
            after = " after pruning" if width else ""
            raise ConfigError(
                f"int4 group_size {cfg.group_size} does not divide the {widths[bad[0]]} inputs of {bad[0]}{after}"
            )
    return names


def swap(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, layer)
