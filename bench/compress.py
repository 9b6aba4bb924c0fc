"""Compression benchmark (`vlstack compress`), one run:

1. InternVL3-1B shapes (random weights): the bytes of each compressed variant against the bf16 checkpoint the
   releases ship, and batch-1 decode tokens/s against the uncompressed model as vlstack runs it on the device
   (CPU: float32 against the int8 W8A8 kernel; GPU: bf16 against the int8 weight-only kernel);
2. with --chart-model DIR --chart-data FILE (the tiny model trained on `vlstack synth` charts, examples/learn):
   the score of each variant on the held-out charts against the uncompressed model's (`vlstack eval chartqa`).

Prints a table and writes JSON. Usage:
    python bench/compress.py [--device cpu|cuda] [--chart-model DIR --chart-data test.jsonl]
                             [--out bench/results/compress.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from foundation import INTERNVL3_1B

from vlstack.compress.prune import PruneConfig, prune
from vlstack.compress.quantize import quantize_model
from vlstack.compress.report import decode_tok_s, weight_bytes
from vlstack.layers.quant import QuantConfig

# name -> (prune targets or None, quantisation or None); the vision tower stays full precision unless named
VARIANTS = {
    "int8 LLM": (None, dict(bits=8)),
    "int4 LLM (g128)": (None, dict(bits=4, group_size=128)),
    "prune MLP/2 + int4 LLM": (dict(mlp=0.5), dict(bits=4, group_size=128)),
    "int4 LLM + vision (g128)": (None, dict(bits=4, group_size=128, modules=".*", full_precision=["lm_head"])),
    "prune MLP/2 + int4 LLM + vision": (dict(mlp=0.5), dict(bits=4, group_size=128, modules=".*",
                                                           full_precision=["lm_head"])),
}  # fmt: skip


def build_1b(device: str, dtype: torch.dtype):
    from transformers import InternVLConfig

    from vlstack.api import VLM, build_model
    from vlstack.chat import DEFAULT_TEMPLATE, Processor, read_tokenizer
    from vlstack.models.config_json import parse_config
    from vlstack.tiny import ASSETS, init_weights

    cfg = parse_config(InternVLConfig(**INTERNVL3_1B).to_dict())
    with torch.device("meta"):
        from vlstack.models.internvl import InternVL

        shapes = InternVL(cfg).state_dict()
    state = {k: torch.empty(v.shape, dtype=dtype, device=device) for k, v in shapes.items()}
    model = build_model(cfg, state, torch.device(device), dtype)
    init_weights(model)
    processor = Processor(read_tokenizer(ASSETS), cfg, DEFAULT_TEMPLATE)
    return VLM(model, processor, set(), None, "1b")


def bench_1b(device: str, prompt_len: int, new_tokens: int, repeat: int) -> dict:
    base_dtype = torch.float32 if device == "cpu" else torch.bfloat16
    kernel = "fast"  # (int8 on CUDA: the weight-only matmul kernel whatever the setting)
    vlm = build_1b(device, base_dtype)
    release = weight_bytes(vlm.model, float_width=2)  # the bf16 checkpoint
    results = {"release_bf16_bytes": release, "variants": {}}
    base_speed = decode_tok_s(vlm, new_tokens, repeat, prompt_len)
    results["decode_tok_s_uncompressed"] = base_speed
    for name, (targets, quant) in VARIANTS.items():
        v = build_1b(device, base_dtype)
        if targets is not None:
            scores = fake_importance(v)
            prune(v, PruneConfig(**targets), scores)
        quantize_model(v.model, QuantConfig(**quant, kernel=kernel).check())
        size = weight_bytes(v.model, float_width=2)
        row = {"bytes": size, "fraction_of_bf16": size / release}
        if device == "cpu" or quant["bits"] == 8:  # (int4 on a GPU: the reference path so far)
            row["decode_tok_s"] = decode_tok_s(v, new_tokens, repeat, prompt_len)
            row["decode_speedup"] = row["decode_tok_s"] / base_speed
        results["variants"][name] = row
        print(name, row, flush=True)
        del v
    return results


def fake_importance(vlm) -> dict:
    """Importance scores for the byte count of a pruned random model (which neurons go does not change sizes)."""
    t = vlm.cfg.text
    layers = t.num_hidden_layers
    return {"mlp": torch.rand(layers, t.intermediate_size), "layers": torch.rand(layers),
            "groups": torch.rand(layers, t.num_key_value_heads), "hidden": torch.rand(t.hidden_size)}  # fmt: skip


def bench_chart(model: str, data: str, device: str) -> dict:
    """The held-out chart score of the uncompressed model and of each compression, as `vlstack eval` scores it."""
    configs = {
        "uncompressed": None,
        "int8 LLM": {"stages": [{"quantize": {"bits": 8}}]},
        "int8 LLM (W8A8 kernel)": {"stages": [{"quantize": {"bits": 8, "kernel": "fast"}}]} if device == "cpu"
        else None,
        "int4 LLM (g64)": {"stages": [{"quantize": {"bits": 4, "group_size": 64}}]},
        "int4 LLM + vision (g128), fast kernel": {"stages": [{"quantize": {
            "bits": 4, "group_size": 128, "modules": ".*", "full_precision": ["lm_head"], "kernel": "fast"}}]},
        "prune MLP/2 + distil + int8": {"stages": [
            {"prune": {"mlp": 0.5, "data": data.replace("test.jsonl", "train.jsonl"), "samples": 64}},
            {"distill": {"data": data.replace("test.jsonl", "train.jsonl"), "steps": 200, "batch_size": 16,
                         "lr": 3e-4, "warmup_steps": 20}},
            {"quantize": {"bits": 8}}]},
    }  # fmt: skip
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, stages in configs.items():
            if name != "uncompressed" and stages is None:
                continue
            directory = model
            if stages is not None:
                cfg = Path(tmp) / f"{len(out)}.yaml"
                cfg.write_text(json.dumps(stages))
                directory = str(Path(tmp) / f"m{len(out)}")
                run(["compress", "--model", model, "--config", str(cfg), "--output", directory])
            ev = Path(tmp) / f"eval{len(out)}"
            run(["eval", "chartqa", "--data", data, "--model", directory, "--out", str(ev), "--batch", "64",
                 "--max-new-tokens", "8", "--device", device])  # fmt: skip
            summary = json.loads((ev / "summary.json").read_text())
            out[name] = {"score": summary["score"], "categories": summary.get("categories")}
            print(name, out[name], flush=True)
    base = out["uncompressed"]["score"]
    for row in out.values():
        row["fraction_of_uncompressed"] = row["score"] / base if base else None
    return out


def run(args: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "vlstack.cli", *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"vlstack {' '.join(args)} failed:\n{done.stderr[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--chart-model", default=None, help="the tiny model trained on synthetic charts")
    ap.add_argument("--chart-data", default=None, help="its held-out test.jsonl")
    ap.add_argument("--skip-1b", action="store_true")
    ap.add_argument("--out", default="bench/results/compress.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    results = {"device": args.device, "torch": torch.__version__}
    if not args.skip_1b:
        results["internvl3_1b_shapes"] = bench_1b(args.device, args.prompt_len, args.new_tokens, args.repeat)
    if args.chart_model:
        results["charts"] = bench_chart(args.chart_model, args.chart_data, args.device)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
