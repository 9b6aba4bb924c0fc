"""Tensor parallelism: two gloo processes under torchrun give the logits and greedy tokens of one process, with a
mix of adapters (LLM and vision) and an adapter hot-loaded into a running engine, on each way the decoder packs
q/k/v (separate, stacked, grouped per KV head) and with fewer KV heads than ranks (replicated)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import rel_err, to_original_layout, write_hf_checkpoint
from test_lora import randomise_adapter

import vlstack
from vlstack.adapters import save_adapter
from vlstack.errors import ConfigError
from vlstack.layers.lora import LoRASpec, add_adapter

SHAPES = {  # name -> shape: one per q/k/v layout, and KV heads fewer than the ranks
    "qwen2": dict(tile=56, heads=4, kv_heads=2),
    "qwen2-kv1-untied": dict(tile=56, heads=4, kv_heads=1, tied=False),
    "phi3": dict(tile=56, text=dict(model_type="phi3", pad_token_id=0)),
    "internlm2": dict(tile=56, heads=4, kv_heads=1, tied=False, layers=2, text=dict(model_type="llama")),
}
VISION = LoRASpec(rank=4, alpha=8, targets=("q_proj", "v_proj", "fc1", "linear_1", "linear_2", "down_proj"),
                  parts=("language", "vision", "projector"))  # fmt: skip


def write_adapter(base: Path, out: Path, spec: LoRASpec, seed: int) -> None:
    vlm = vlstack.load(base)
    randomise_adapter(add_adapter(vlm.model, "a", spec, seed=seed), seed=seed)
    save_adapter(vlm.model, "a", out, spec)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tp")
    for i, (name, shape) in enumerate(SHAPES.items()):
        d = root / name
        if name == "internlm2":  # the original layout, q/k/v packed per KV head
            write_hf_checkpoint(root / "llama", seed=i, **shape)
            to_original_layout(root / "llama", d / "base", internlm2=True)
        else:
            write_hf_checkpoint(d / "base", seed=i, **shape)
        write_adapter(d / "base", d / "text", LoRASpec(rank=4, alpha=8), seed=10 + i)
        write_adapter(d / "base", d / "vision", VISION, seed=20 + i)
        write_adapter(d / "base", d / "late", LoRASpec(rank=8, alpha=8, targets=("o_proj", "up_proj")), seed=30 + i)
    return root


def torchrun(*args: str, processes: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout)


def test_tp2_equals_one_process(checkpoints, tmp_path):
    from tp_worker import run

    done = torchrun(str(Path(__file__).parent / "tp_worker.py"), str(checkpoints), "2", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    one = run(checkpoints, 1)
    assert set(one) == set(SHAPES)
    for name, want in one.items():
        for got in ranks:  # every rank gets every answer
            for key in ("mixed", "alone"):
                assert got[name][key].shape == want[key].shape
                assert rel_err(got[name][key], want[key]) <= 1e-5, (name, key)
            for key in ("greedy_staticFalse", "greedy_staticTrue", "greedy_late"):
                assert got[name][key] == want[key], (name, key)
        mixed = want["mixed"]
        assert rel_err(mixed[0], mixed[1]) > 1e-2 and rel_err(mixed[2], mixed[1]) > 1e-2  # (the adapters do act)
        assert rel_err(mixed, want["alone"]) <= 1e-5  # (stacked and per-segment LoRA agree)
        assert want["greedy_late"][0] != want["greedy_late"][2] or want["greedy_late"][1] != want["greedy_late"][2]


def test_tp_needs_its_processes_and_a_divisible_model(checkpoints):
    with pytest.raises(ConfigError, match="torchrun --nproc-per-node 2"):
        vlstack.load(checkpoints / "qwen2" / "base", tp=2)
    with pytest.raises(ConfigError, match="tp must be 1 or more"):
        vlstack.load(checkpoints / "qwen2" / "base", tp=0)
    from vlstack.config import read_config
    from vlstack.parallel.tp import TP, heads

    t = read_config(checkpoints / "qwen2" / "base").text  # 4 heads, 2 KV heads
    assert heads(t, TP(1, 2)) == ([2, 3], [1])
    assert heads(t, TP(3, 4)) == ([3], [1])  # KV heads replicated: the one its query head reads
    with pytest.raises(ConfigError, match="does not divide the 4 attention heads"):
        heads(t, TP(0, 3))
