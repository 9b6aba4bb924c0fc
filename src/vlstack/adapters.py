"""LoRA adapters in PEFT's on-disk format: adapter_config.json + adapter_model.safetensors.

Keys are PEFT's for transformers' InternVLForConditionalGeneration
(`base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight`), so an adapter
written here loads with `peft.PeftModel.from_pretrained`, and one written by peft loads here.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import ConfigError
from .files import sha256_file, write_files
from .layers.lora import MAX_RANK, LoRALinear, LoRASpec, check_name, ensure_lora, lora_layers, remove_adapter, slots_of
from .models import FAMILIES, original_name, our_name
from .parallel.tp import shard_lora

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
LLM_BODY = "language_model.model."  # the original layout's LLM body (under its causal-LM wrapper)
UNSUPPORTED = {  # PEFT options vlstack does not implement: refuse rather than compute something else
    "use_dora": False,
    "fan_in_fan_out": False,
    "lora_bias": False,
    "bias": "none",
    "modules_to_save": None,
    "layer_replication": None,
    "use_qalora": False,
    "trainable_token_indices": None,
}


def hf_module_name(ours: str, model_type: str = "") -> str:
    """Our module name -> transformers' in-memory name (what PEFT keys are built from); for a family that exists
    only in the original layout (InternLM2), its LLM's modules under the original model's names."""
    fam = FAMILIES.get(model_type)
    if fam is not None and getattr(fam, "RENAMES", None) and ours.startswith(("language_model.", "lm_head")):
        name = original_name(fam, ours)  # language_model.layers.0.attention.wqkv, language_model.output (the head)
        return name if name.startswith("language_model.output") else name.replace("language_model.", LLM_BODY, 1)
    return ours if ours.startswith("lm_head") else "model." + ours


def our_module_name(hf: str, model_type: str = "") -> str:
    """transformers' module name (current or older layouts, or a family's original names) -> ours."""
    name = hf[len("model.") :] if hf.startswith("model.") else hf
    if name.startswith("language_model.model."):
        name = "language_model." + name[len("language_model.model.") :]
    elif name.startswith("language_model.lm_head"):
        name = name[len("language_model.") :]
    fam = FAMILIES.get(model_type)
    return name if fam is None else our_name(fam, name)


def _model_type(model: nn.Module) -> str:
    cfg = getattr(model, "cfg", None)
    return cfg.text.model_type if cfg is not None else ""


def save_adapter(model: nn.Module, name: str, directory: str | Path, spec: LoRASpec, base: str | None = None) -> Path:
    """Write adapter `name` of model as a PEFT adapter directory (each file atomically; other files stay)."""
    if getattr(model, "tp", None) is not None:
        raise ConfigError("a model loaded with tp > 1 holds a part of each adapter: save it from a tp=1 load")
    layers = {n: m for n, m in lora_layers(model).items() if name in m.lora_A}
    if not layers:
        raise ValueError(f"the model has no adapter named {name!r}")
    tensors, modules, kind = {}, [], _model_type(model)
    for module, layer in layers.items():
        key = PREFIX + hf_module_name(module, kind)
        tensors[key + ".lora_A.weight"] = layer.lora_A[name].weight.detach().contiguous().cpu()
        tensors[key + ".lora_B.weight"] = layer.lora_B[name].weight.detach().contiguous().cpu()
        modules.append(hf_module_name(module, kind))
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "use_rslora": spec.rslora,
        "target_modules": sorted(modules),  # exact names: peft matches `key == target`
        "rank_pattern": {},
        "alpha_pattern": {hf_module_name(m, kind): a for m, a in spec.alphas.items()},
        "init_lora_weights": True,
        "inference_mode": True,
        **UNSUPPORTED,
    }
    return write_files(
        directory,
        {
            WEIGHTS: lambda path: save_file(tensors, str(path), metadata={"format": "pt"}),
            CONFIG: lambda path: path.write_text(json.dumps(config, indent=2)),
        },
    )


def _alpha_for(module: str, config: dict) -> float:
    """PEFT's alpha_pattern: a key matches a module name as a suffix regex."""
    return float(_pattern_value(module, config.get("alpha_pattern"), config["lora_alpha"]))


def _pattern_value(module: str, patterns: dict | None, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern: the value of the first key that matches the module name as a suffix
    regex, else the default."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def targeted(module: str, targets: str | list[str]) -> bool:
    """Whether PEFT's target_modules select the module (transformers' name): a string is a regex matched whole
    (or "all-linear"), a list holds names matched as the name or its last parts."""
    if isinstance(targets, str):
        try:
            return targets == "all-linear" or re.fullmatch(targets, module) is not None
        except re.error as e:
            raise ConfigError(f"target_modules {targets!r} is not a valid regex: {e}") from None
    return any(module == t or module.endswith("." + t) for t in targets)


def read_adapter(
    directory: str | Path, model_type: str = ""
) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """A PEFT adapter directory -> (its config, {our module name: (A [r, in], B [out, r])}) for a base whose LLM
    is of model_type."""
    d = Path(directory)
    if not (d / CONFIG).is_file() or not (d / WEIGHTS).is_file():
        raise ConfigError(f"{d} is not a PEFT adapter directory (needs {CONFIG} and {WEIGHTS})")
    try:
        config = json.loads((d / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{d / CONFIG} is not valid JSON: {e}") from None
    if config.get("peft_type") != "LORA":
        raise ConfigError(f"{d} holds a {config.get('peft_type')!r} adapter; vlstack loads LORA adapters")
    for key, default in UNSUPPORTED.items():
        if config.get(key, default) not in (default, None, False, [], {}):
            raise ConfigError(f"{d}: the PEFT option {key}={config[key]!r} is not supported by vlstack")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= MAX_RANK:
        raise ConfigError(f"{d / CONFIG}: 'r' must be an integer in [1, {MAX_RANK}] (got {r!r})")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 < alpha < math.inf:
        raise ConfigError(f"{d / CONFIG}: 'lora_alpha' must be a positive number (got {alpha!r})")
    targets = config.get("target_modules")
    if not targets or not isinstance(targets, (str, list)) or not all(isinstance(t, str) for t in targets):
        raise ConfigError(
            f"{d / CONFIG}: 'target_modules' must be a module name, a list of them or a regex (got {targets!r})"
        )
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(d / WEIGHTS), framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or malformed files
        raise ConfigError(f"{d / WEIGHTS} cannot be read as safetensors: {e}") from None
    for key, tensor in tensors.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.\w+)?\.weight", key)
        if not m:
            raise ConfigError(f"{d / WEIGHTS}: unexpected tensor {key!r} (only lora_A / lora_B weights)")
        if tensor.ndim != 2 or not tensor.is_floating_point():
            raise ConfigError(f"{d / WEIGHTS}: {key} is not a matrix of floats")
        if not torch.isfinite(tensor).all():
            raise ConfigError(f"{d / WEIGHTS}: {key} holds NaN or infinite values; the adapter is refused")
        if not targeted(m.group(1), targets):  # (peft would not put LoRA there: the weights would be dropped)
            raise ConfigError(
                f"{d / CONFIG}: target_modules {targets!r} do not match {m.group(1)}, which the "
                "weights hold an adapter for"
            )
        pairs.setdefault(our_module_name(m.group(1), model_type), {})[m.group(2)] = tensor
        want = _pattern_value(m.group(1), config.get("rank_pattern"), r)
        if tensor.shape[0 if m.group(2) == "A" else 1] != want:
            raise ConfigError(
                f"{d}: {key} is of rank {tensor.shape[0 if m.group(2) == 'A' else 1]}, the config says r={want}"
            )
    incomplete = [k for k, v in pairs.items() if set(v) != {"A", "B"}]
    if incomplete or not pairs:
        raise ConfigError(f"{d / WEIGHTS}: lora_A/lora_B pairs are incomplete for {incomplete or 'every module'}")
    return config, {k: (v["A"], v["B"]) for k, v in pairs.items()}


def load_adapter(model: nn.Module, name: str, directory: str | Path) -> LoRASpec:
    """Attach the PEFT adapter in directory to model under `name`; returns its spec."""
    kind = _model_type(model)
    config, weights = read_adapter(directory, kind)
    available = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoRALinear))}
    missing = sorted(set(weights) - available)
    if missing:
        raise ConfigError(f"adapter {name!r} targets modules this model does not have: {', '.join(missing[:5])}")
    slots_of(model).check(name, max(a.shape[0] for a, _ in weights.values()))  # before any layer takes it
    layers = ensure_lora(model, sorted(weights))
    rslora = bool(config.get("use_rslora", False))
    spec = LoRASpec(
        rank=int(config["r"]),
        alpha=float(config["lora_alpha"]),
        rslora=rslora,
        targets=tuple(sorted({m.rsplit(".", 1)[-1] for m in weights})),
    )
    for module, (a, b) in weights.items():
        layer = layers[module]
        a, b = shard_lora(getattr(model, "tp", None), module, a, b)  # (under TP: this rank's part)
        rank = a.shape[0]
        if a.shape[1] != layer.in_features or b.shape != (layer.out_features, rank):
            raise ConfigError(f"adapter {name!r}: shapes {tuple(a.shape)}/{tuple(b.shape)} do not fit {module}")
        alpha = _alpha_for(hf_module_name(module, kind), config)
        if alpha != spec.alpha:
            spec.alphas[module] = alpha
        layer.add(name, rank, spec.scaling(rank, module))
        with torch.no_grad():
            layer.lora_A[name].weight.copy_(a)
            layer.lora_B[name].weight.copy_(b)
    slots_of(model).version += 1  # (its weights are in now: a static step's stacks take them)
    return spec


def merge_adapter(model: nn.Module, name: str) -> None:
    """Fold adapter `name` into the base weights (W += B @ A * scaling) and drop it."""
    layers = [m for m in lora_layers(model).values() if name in m.lora_A]
    if not layers:
        raise ValueError(f"the model has no adapter named {name!r}")
    if any(not isinstance(getattr(layer, "weight", None), torch.Tensor) for layer in layers):
        raise ConfigError("the base is quantised: merge the adapter into the full-precision model, then quantise")
    with torch.no_grad():
        for layer in layers:
            layer.weight += layer.delta(name).to(layer.weight.dtype)
            layer.remove(name)


class Loaded(dict):
    """The adapters attached to a model: name -> LoRASpec, with each one's weights file's sha256 (`hashes`). The
    façade and the engine load and unload through it, so both see the same adapters."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.hashes: dict[str, str] = {}

    def load(self, name: str, directory: str | Path) -> LoRASpec:
        """Attach the PEFT LoRA adapter in directory under `name`."""
        check_name(name)
        if name in self:
            raise ConfigError(f"an adapter named {name!r} is already loaded")
        self[name] = load_adapter(self.model, name, directory)
        self.hashes[name] = sha256_file(Path(directory) / WEIGHTS)
        return self[name]

    def unload(self, name: str) -> None:
        if self.pop(name, None) is None:
            raise ConfigError(f"no adapter named {name!r} is loaded")
        self.hashes.pop(name, None)
        remove_adapter(self.model, name)
