"""`vlstack plan`: what a model needs before anything is bought: the weights (from the config, counted on the
meta device: nothing is loaded), the KV cache per token and at a context and concurrency, the activation peak of
training at a batch size, and the smallest tensor-parallel degree that serves it on the GPUs named.

    vlstack plan --model DIR --gpus 2xA100-80GB [--quantize int4] [--context 8192] [--concurrency 64]

The rules (the figures a test checks by hand):
- weights: bf16 (2 bytes) per parameter; `--quantize int8|int4` stores the LLM's decoder layers at 1 or 0.5 bytes
  per weight plus a bf16 scale per output channel (int8) or a bf16 scale and zero per 128 weights (int4), as
  `vlstack compress` does; the vision tower, projector, embeddings and LM head stay bf16;
- KV cache: 2 (K and V) x layers x KV heads x head_dim x 2 bytes per token;
- tensor parallelism over N GPUs splits the LLM's weights and KV heads N ways (KV heads replicated when fewer than
  N) and replicates the vision tower and projector; N must divide the attention heads; a GPU keeps 10% of its
  memory free for the framework and the activations of a step;
- training activations (gradient checkpointing, LoRA): each layer's input kept (tokens x hidden x 2 bytes a
  layer), plus the layer being recomputed (tokens x (4 hidden + 3 intermediate) x 2 bytes, twice: its
  activations and their gradients), plus one chunk of logits (16 MB of float32: vlstack's chunking). An estimate,
  not a measurement.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .config import VLMConfig
from .errors import ConfigError

GPUS = {
    "A10": 24,
    "A100-40GB": 40,
    "A100-80GB": 80,
    "H100-80GB": 80,
    "H100": 80,
    "H200": 141,
    "L40S": 48,
    "RTX4090": 24,
    "B200": 192,
}  # fmt: skip  (GB of memory)
BF16 = 2
FREE = 0.10  # of each GPU's memory kept for the framework and a step's activations


@dataclass
class Weights:
    vision: int  # parameters: vision tower + projector (replicated under TP)
    embeddings: int  # the token embeddings and the LM head (once when tied)
    layers: int  # the LLM's decoder layers (split under TP)

    def bytes(self, quantize: str | None, cfg: VLMConfig) -> dict[str, int]:
        t = cfg.text
        if quantize is None:
            layer_bytes = self.layers * BF16
        else:
            linear = t.num_hidden_layers * _linear_weights(cfg)
            rest = self.layers - linear  # norms and biases stay bf16
            if quantize == "int8":
                outs = t.num_hidden_layers * _linear_outputs(cfg)
                layer_bytes = linear + outs * BF16 + rest * BF16
            else:
                layer_bytes = linear // 2 + (linear // 128) * 2 * BF16 + rest * BF16
        return {"vision": self.vision * BF16, "embeddings": self.embeddings * BF16, "layers": layer_bytes}


def _linear_weights(cfg: VLMConfig) -> int:
    """The weights of one decoder layer's linear layers."""
    t = cfg.text
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    return t.hidden_size * (q + 2 * kv) + q * t.hidden_size + 3 * t.hidden_size * t.intermediate_size


def _linear_outputs(cfg: VLMConfig) -> int:
    t = cfg.text
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    return q + 2 * kv + t.hidden_size + 2 * t.intermediate_size + t.hidden_size


def count(cfg: VLMConfig) -> Weights:
    """Parameters by part, from the model built on the meta device (nothing allocated)."""
    from .models.internvl import InternVL

    with torch.device("meta"):
        model = InternVL(cfg)
    vision = sum(p.numel() for p in model.vision_tower.parameters())
    vision += sum(p.numel() for p in model.multi_modal_projector.parameters())
    lm = model.language_model
    layers = sum(p.numel() for p in lm.layers.parameters())
    embeddings = sum(p.numel() for p in lm.embed_tokens.parameters()) + sum(p.numel() for p in lm.norm.parameters())
    if not cfg.text.tie_word_embeddings:
        embeddings += model.lm_head.weight.numel()
    return Weights(vision, embeddings, layers)


def kv_per_token(cfg: VLMConfig) -> int:
    t = cfg.text
    return 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * BF16


def parse_gpus(spec: str) -> tuple[int, float, str]:
    """ "2xA100-80GB", "4xH100", "8x24GB" -> (count, GB each, name)."""
    m = re.fullmatch(r"(\d+)\s*x\s*(.+)", spec.strip(), re.IGNORECASE)
    if not m:
        raise ConfigError(f"--gpus {spec!r}: write COUNTxKIND, e.g. 2xA100-80GB, 4xH100 or 8x24GB")
    n, kind = int(m.group(1)), m.group(2)
    size = re.fullmatch(r"(\d+(?:\.\d+)?)\s*GB", kind, re.IGNORECASE)
    known = {k.upper(): v for k, v in GPUS.items()}
    if size:
        gb = float(size.group(1))
    elif kind.upper() in known:
        gb = known[kind.upper()]
    else:
        raise ConfigError(f"--gpus: unknown GPU {kind!r}; known: {', '.join(GPUS)} (or give its memory: 8x80GB)")
    if not 1 <= n <= 4096:
        raise ConfigError(f"--gpus {spec!r}: from 1 to 4096 GPUs")
    if not 0 < gb <= 100_000:
        raise ConfigError(f"--gpus {spec!r}: a GPU's memory must be more than 0 GB")
    return n, gb, kind


def training_activations(cfg: VLMConfig, tokens: int) -> int:
    """The activation peak of a LoRA training step over `tokens` tokens with gradient checkpointing (the rule
    above)."""
    t = cfg.text
    kept = t.num_hidden_layers * tokens * t.hidden_size * BF16
    layer = 2 * tokens * (4 * t.hidden_size + 3 * t.intermediate_size) * BF16
    return kept + layer + (16 << 20)


def plan(cfg: VLMConfig, gpus: str, quantize: str | None, context: int, concurrency: int, train_tokens: int) -> dict:
    if quantize not in (None, "int8", "int4"):
        raise ConfigError(f"--quantize {quantize!r}: int8 or int4")
    if context < 1 or concurrency < 1 or train_tokens < 1:
        raise ConfigError("--context, --concurrency and --train-tokens must be >= 1")
    n, gb, kind = parse_gpus(gpus)
    w = count(cfg)
    parts = w.bytes(quantize, cfg)
    per_token = kv_per_token(cfg)
    kv = per_token * context * concurrency
    usable = gb * 1e9 * (1 - FREE)
    fits = {}
    t = cfg.text
    for tp in (1, 2, 4, 8, 16):
        if t.num_attention_heads % tp:
            continue
        kv_split = tp if t.num_key_value_heads >= tp else t.num_key_value_heads  # (replicated beyond)
        per_gpu = parts["vision"] + (parts["embeddings"] + parts["layers"]) / tp + kv / kv_split
        fits[tp] = per_gpu
    smallest = next((tp for tp, need in fits.items() if need <= usable), None)
    return {
        "parameters": {
            "vision+projector": w.vision,
            "embeddings": w.embeddings,
            "decoder layers": w.layers,
            "total": w.vision + w.embeddings + w.layers,
        },
        "weight_bytes": {**parts, "total": sum(parts.values())},
        "kv_bytes_per_token": per_token,
        "kv_bytes": kv,
        "training_activation_bytes": training_activations(cfg, train_tokens),
        "per_gpu_bytes": fits,
        "gpu": {"count": n, "gb": gb, "kind": kind, "usable_bytes": usable},
        "smallest_tp": smallest,
        "fits_on_these": smallest is not None and smallest <= n,
    }


def describe(p: dict, context: int, concurrency: int, train_tokens: int) -> str:
    gib, n = 2**30, p["parameters"]
    w, g = p["weight_bytes"], p["gpu"]
    lines = [
        f"parameters        {n['total'] / 1e9:.2f} B (vision + projector {n['vision+projector'] / 1e9:.2f} B, "
        f"LLM layers {n['decoder layers'] / 1e9:.2f} B, embeddings {n['embeddings'] / 1e9:.2f} B)",
        f"weights           {w['total'] / gib:.1f} GiB (vision {w['vision'] / gib:.1f}, "
        f"layers {w['layers'] / gib:.1f}, embeddings {w['embeddings'] / gib:.1f})",
        f"KV cache          {p['kv_bytes_per_token'] / 1024:.0f} KiB a token; {p['kv_bytes'] / gib:.1f} GiB for "
        f"{concurrency} x {context} tokens",
        f"training          {p['training_activation_bytes'] / gib:.1f} GiB of activations for {train_tokens} tokens "
        "a step (LoRA, gradient checkpointing)",
    ]
    for tp, need in p["per_gpu_bytes"].items():
        ok = "fits" if need <= g["usable_bytes"] else "does not fit"
        lines.append(f"TP {tp:<2}             {need / gib:.1f} GiB a GPU: {ok} in {g['gb']:g} GB (90% usable)")
    if p["smallest_tp"] is None:
        lines.append(f"serving           does not fit on {g['kind']} at TP <= 16: quantise, or shorten the context")
    else:
        have = "you have" if p["fits_on_these"] else "more than the"
        lines.append(f"serving           needs TP {p['smallest_tp']} ({have} {g['count']} x {g['kind']})")
    return "\n".join(lines)
