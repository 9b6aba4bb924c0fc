"""The built-in tiny model: InternVL's architecture at a few million parameters, with a real byte-level
BPE tokenizer carrying InternVL's special tokens and chat template. It is the default wherever no
model is given, so the whole stack runs with no downloaded weights.

The config, tokenizer and template ship with the package (assets/tiny/); the weights are drawn from
a fixed seed the first time and cached as an ordinary checkpoint directory.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from .checkpoint import save_checkpoint
from .models.config_json import read_config, to_native
from .models.internvl import InternVL

ASSETS = Path(__file__).parent / "assets" / "tiny"
VERSION = "2"  # bump when the assets or the weight recipe change
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
]


def cache_root() -> Path:
    return Path(os.environ.get("VLSTACK_CACHE") or Path.home() / ".cache" / "vlstack")


def init_weights(model: InternVL, seed: int = 0) -> None:
    """Deterministic random weights: normal(0, 0.02) matrices, zero biases, unit norms, 0.1 layer scale, and the
    vision tower's position embeddings a 2-D sin-cos table (MAE's), so that a model trained from these weights
    knows where each patch is from the first step (learned from 0.02 noise, positions came late in training)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("position_embeddings"):  # [1, 1 + S*S, C]: the class token's row left at 0
                side = math.isqrt(p.shape[1] - 1)
                p.zero_()
                p[0, 1:] = sincos_2d(side, p.shape[2])
            elif name.endswith("bias"):
                p.zero_()
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif "lambda_" in name:
                p.fill_(0.1)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def sincos_2d(side: int, dim: int) -> torch.Tensor:
    """[side*side, dim]: each patch's row in the first half of the channels, its column in the second, as sines
    and cosines of geometrically spaced frequencies (patches row by row, as the patch embedding flattens them)."""
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # [dim/4]
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")

    def table(pos: torch.Tensor) -> torch.Tensor:  # [S*S] -> [S*S, dim/2]
        angles = pos.flatten()[:, None].double() * freqs
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([table(rows), table(cols)], dim=1).float()


def tiny_dir() -> Path:
    """The tiny model's checkpoint directory, created on first use."""
    target = cache_root() / f"tiny-v{VERSION}"
    if (target / "model.safetensors").is_file():
        return target
    cfg = read_config(ASSETS)
    model = InternVL(cfg)
    init_weights(model)
    state = model.state_dict()
    state.pop("lm_head.weight")  # tied to the embeddings
    extra = {f.name: f for f in ASSETS.iterdir() if f.name != "config.json"}
    raw = to_native(cfg)
    raw["dtype"] = "float32"
    try:
        save_checkpoint(target, state, raw, extra)
    except OSError:
        if not (target / "model.safetensors").is_file():
            raise
        # another process wrote the same directory first; the weights are the same
    return target


def train_tokenizer(corpus: str, vocab_size: int = 2048) -> None:
    """Regenerate assets/tiny/tokenizer.json (run by hand; the result ships with the package)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([corpus], trainer)
    tok.save(str(ASSETS / "tokenizer.json"))
