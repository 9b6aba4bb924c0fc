"""Safetensors checkpoints: read single-file or sharded, map key names between layouts, write atomically.

Our module names are transformers' InternVL names without the `model.` wrapper:
`vision_tower.*`, `multi_modal_projector.*`, `language_model.*` (the Qwen2 body), `lm_head`.
On disk we meet three spellings of them:
- what transformers' save_pretrained writes (and the -hf releases hold): `language_model.model.*`,
  `language_model.lm_head.weight`, `vision_tower.*`, `multi_modal_projector.*`;
- transformers' in-memory names: `model.language_model.*`, `model.vision_tower.*`, `lm_head.weight`;
- the original OpenGVLab layout: `vision_model.*` (fused `attn.qkv`), `mlp1.{0,1,3}`,
  `language_model.model.*`, `language_model.lm_head.weight`.
We write the first, so that transformers and vLLM load what vlstack writes.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import ConfigError
from .files import write_files

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
SHARD, SHARD_RE = "model-{:05d}-of-{:05d}.safetensors", r"model-\d{5}-of-\d{5}\.safetensors"

_ORIGINAL_VISION = [  # original OpenGVLab InternViT names -> ours (applied in order)
    (r"^vision_model\.", "vision_tower."),
    (r"\.encoder\.layers\.", ".encoder.layer."),
    (r"embeddings\.class_embedding$", "embeddings.cls_token"),
    (r"embeddings\.position_embedding$", "embeddings.position_embeddings"),
    (r"embeddings\.patch_embedding\.", "embeddings.patch_embeddings.projection."),
    (r"\.ls(\d)$", r".lambda_\1"),
    (r"\.attn\.proj\.", ".attention.projection_layer."),
    (r"\.attn\.", ".attention."),
    (r"\.norm1\.", ".layernorm_before."),
    (r"\.norm2\.", ".layernorm_after."),
]
_ORIGINAL_PROJECTOR = {"0": "layer_norm", "1": "linear_1", "3": "linear_2"}


def shard_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint: those named by the index, or the single file."""
    if (directory / INDEX).is_file():
        try:
            weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ConfigError(f"{directory / INDEX} is malformed: {e}") from None
        files = [directory / f for f in dict.fromkeys(weight_map.values())]
    elif (directory / SINGLE).is_file():
        files = [directory / SINGLE]
    else:
        raise ConfigError(f"{directory} holds neither {SINGLE} nor {INDEX}")
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ConfigError(f"{directory} is missing shard files: {', '.join(missing)}")
    return files


def read_tensors(directory: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for path in shard_files(directory):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def to_ours(
    key: str, tensor: torch.Tensor, vision_width: int, rename: Callable[[str], str] = str
) -> list[tuple[str, torch.Tensor]]:
    """One on-disk tensor -> our (name, tensor) pairs (a fused qkv becomes three); rename: the LLM family's
    original names -> ours (models.our_name)."""
    if key.startswith("model."):  # transformers in-memory names
        key = key[len("model.") :]
    if key.startswith("language_model.model."):
        return [(rename("language_model." + key[len("language_model.model.") :]), tensor)]
    if key.startswith("language_model.lm_head."):
        return [(key[len("language_model.") :], tensor)]
    if key.startswith("language_model."):
        return [(rename(key), tensor)]
    if key.startswith("mlp1."):
        _, idx, rest = key.split(".", 2)
        return [(f"multi_modal_projector.{_ORIGINAL_PROJECTOR[idx]}.{rest}", tensor)]
    if key.startswith("vision_model."):
        for pattern, repl in _ORIGINAL_VISION:
            key = re.sub(pattern, repl, key)
        if ".attention.qkv." in key:  # fused [3C, C] in q, k, v order
            q, k, v = tensor.split(vision_width, dim=0)
            return [(key.replace(".qkv.", f".{n}_proj."), t) for n, t in zip("qkv", (q, k, v))]
    return [(key, tensor)]


def load_state_dict(
    directory: str | Path, vision_width: int, rename: Callable[[str], str] = str
) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory under our names."""
    state: dict[str, torch.Tensor] = {}
    for key, tensor in read_tensors(Path(directory)):
        for name, t in to_ours(key, tensor, vision_width, rename):
            state[name] = t
    return state


def to_native(name: str) -> str:
    """Our name -> the name transformers' save_pretrained writes."""
    if name.startswith("language_model."):
        return "language_model.model." + name[len("language_model.") :]
    if name.startswith("lm_head."):
        return "language_model." + name
    return name


def save_checkpoint(
    directory: str | Path,
    state: dict[str, torch.Tensor],
    config: dict,
    extra_files: dict[str, Path] | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write config.json and safetensors shards (with an index when more than one) in the native layout.

    Each file is written to a temporary name and renamed into place (files.write_files): other files of the
    directory stay; the weights of an earlier save in the other layout (or with more shards) are removed."""
    target = Path(directory)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][to_native(name)] = t.detach().contiguous().cpu()
        size += nbytes
    names = [SINGLE] if len(shards) == 1 else [SHARD.format(i + 1, len(shards)) for i in range(len(shards))]
    files = {n: _safetensors(shard) for n, shard in zip(names, shards)}
    if len(shards) > 1:
        weight_map = {k: n for n, shard in zip(names, shards) for k in shard}
        total = sum(t.numel() * t.element_size() for shard in shards for t in shard.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        files[INDEX] = _text(json.dumps(index, indent=2))
    for name, src in (extra_files or {}).items():
        files[name] = lambda path, src=src: shutil.copyfile(src, path)
    files["config.json"] = _text(json.dumps(config, indent=2))
    old_shards = [p.name for p in target.glob("model-*-of-*.safetensors") if re.fullmatch(SHARD_RE, p.name)]
    return write_files(target, files, stale=[SINGLE, INDEX, *old_shards])


def _safetensors(tensors: dict[str, torch.Tensor]) -> Callable[[Path], None]:
    return lambda path: save_file(tensors, str(path), metadata={"format": "pt"})


def _text(text: str) -> Callable[[Path], None]:
    return lambda path: path.write_text(text)
