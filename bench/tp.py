"""Tensor parallelism: the decode step at TP-N against TP-1 on the same checkpoint, and what its collectives cost.

For each batch size: the decode step's time at TP-1 (this process) and at TP-N (N processes under torchrun, the
model split as `vlstack serve --tp N` splits it), and, on the TP-N ranks, the collectives of one step timed alone:
two all-reduces of [B, C] per layer (after o_proj and down_proj), one for the embedding lookup, one all-gather
of the logits [B, V/N]. With one GPU or on a CPU, TP-N shares one device: the ratio then says what splitting
costs, not what N devices gain; the collectives' share is the figure that carries over.

    python bench/tp.py --model internvl3-1b --device cpu --tp 2     # gloo, the CPU's cores split between ranks
    python bench/tp.py --model internvl3-1b --device cuda --tp 2    # NCCL, one GPU per rank (needs 2 GPUs)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def decode_time(vlm, batch: int, steps: int, prompt: int = 32) -> float:
    """Median seconds of a decode step over `batch` rows after a `prompt`-token prefill each."""
    from vlstack.engine.runner import Decoder, prefill
    from vlstack.layers.kv_cache import KVCache
    from vlstack.parallel.tp import cache_config

    model, device = vlm.model, vlm.model.device
    cache = KVCache(cache_config(vlm.cfg.text, model.tp).kv_shape(batch, prompt + steps + 8), model.dtype, device)
    ids = [torch.randint(10, 1000, (prompt,), generator=torch.Generator().manual_seed(i)) for i in range(batch)]
    decoder = Decoder(model, cache)
    times = []
    with torch.inference_mode():
        logits = prefill(model, cache, ids, list(range(batch)), [None] * batch)
        tokens = logits.argmax(-1).tolist()
        for i in range(steps):
            sync(device)
            start = time.perf_counter()
            logits = decoder(tokens, [prompt + i] * batch, list(range(batch)), [None] * batch)
            tokens = logits.argmax(-1).tolist()  # (read back: the step's whole cost)
            times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def collective_time(vlm, batch: int, repeat: int) -> float:
    """Median seconds of one decode step's collectives alone, at this batch."""
    import torch.distributed as dist

    t, device, dtype = vlm.cfg.text, vlm.model.device, vlm.model.dtype
    x = torch.zeros(batch, t.hidden_size, device=device, dtype=dtype)
    part = torch.zeros(batch, -(-t.vocab_size // vlm.model.tp.size), device=device, dtype=dtype)
    times = []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        for _ in range(2 * t.num_hidden_layers + 1):
            dist.all_reduce(x)
        vlm.model.tp.gather(part, t.vocab_size)
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def measure(model: str, device: str, tp: int, batches: list[int], steps: int) -> dict:
    import vlstack

    vlm = vlstack.load(model, device=device, dtype="float32" if device == "cpu" else "bfloat16", tp=tp)
    out = {}
    for b in batches:
        out[b] = {"step_s": decode_time(vlm, b, steps)}
        if tp > 1:
            out[b]["collectives_s"] = collective_time(vlm, b, steps)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="internvl3-1b", help="internvl3-1b (random, its shapes), tiny, or a directory")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--batch", type=int, action="append", help="decode batch sizes (default: 1 and 8)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rank-out", default=None, help=argparse.SUPPRESS)  # (set for the TP ranks)
    ap.add_argument("--out", default="bench/results/tp.json")
    args = ap.parse_args()
    batches = args.batch or [1, 8]
    if args.rank_out:  # one of the TP ranks
        got = measure(args.model, args.device, args.tp, batches, args.steps)
        if os.environ.get("RANK") == "0":
            Path(args.rank_out).write_text(json.dumps(got))
        return
    if args.device == "cuda" and torch.cuda.device_count() < args.tp:
        raise SystemExit(f"TP-{args.tp} on CUDA needs {args.tp} GPUs; this machine has {torch.cuda.device_count()}")
    work, label = Path(tempfile.mkdtemp(prefix="vlstack-tp-bench-")), args.model
    if args.model == "internvl3-1b":
        from multi_lora_train import write_model

        args.model = write_model("internvl3-1b", work)
    threads = torch.get_num_threads()
    one = measure(args.model, args.device, 1, batches, args.steps)
    rank_out = work / "tp.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // args.tp))}  # the CPU's cores split between ranks
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.tp),
               __file__, "--model", args.model, "--device", args.device, "--tp", str(args.tp), "--steps",
               str(args.steps), "--rank-out", str(rank_out), *[f"--batch={b}" for b in batches]]  # fmt: skip
    subprocess.run(command, check=True, env=env)
    many = {int(k): v for k, v in json.loads(rank_out.read_text()).items()}
    print(f"model {label} on {args.device}, TP-{args.tp} vs TP-1, decode step (median of {args.steps})")
    print(f"{'batch':>6}{'TP-1 ms':>10}{f'TP-{args.tp} ms':>10}{'speed-up':>10}{'collectives ms':>16}{'share':>8}")
    rows = {}
    for b in batches:
        a, m = one[b]["step_s"], many[b]["step_s"]
        c = many[b]["collectives_s"]
        rows[b] = {"tp1_ms": a * 1e3, "tpn_ms": m * 1e3, "speedup": a / m, "collectives_ms": c * 1e3, "share": c / m}
        print(f"{b:6d}{a * 1e3:10.1f}{m * 1e3:10.1f}{a / m:9.2f}x{c * 1e3:16.2f}{c / m:8.1%}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "threads": threads, "batches": rows}, indent=2))


if __name__ == "__main__":
    main()
