"""Multi-LoRA training benchmark: 4 adapters, the same steps and data, trained
- fused in vlstack (one base forward/backward over every job's rows per step),
- sequentially in vlstack (the same code, one job at a time),
- sequentially with peft on transformers (what a user would otherwise run),
plus one single-adapter vlstack run as the memory reference. Each mode runs in its own process, so
its peak memory (its own RSS high-water mark, VmHWM, or CUDA max allocated) is its own. Prints a table and writes JSON.

    python bench/multi_lora_train.py                         # tiny, 40 steps: long enough to pass peft's start-up
    python bench/multi_lora_train.py --images --max-tokens 1024   # steps in passes of at most 1024 tokens
    python bench/multi_lora_train.py --model internvl3-1b --steps 3      # random weights, InternVL3-1B shapes
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

JOBS = 4
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_data(root: Path, n: int, images: bool) -> list[Path]:
    """4 datasets of n examples (a small image in every other one when images is set)."""
    rng = np.random.default_rng(0)
    paths = []
    for j in range(JOBS):
        lines = []
        for i in range(n):
            row = {
                "conversations": [
                    {"from": "human", "value": f"Department {j}, ticket {i}: what is the status of the request?"},
                    {
                        "from": "gpt",
                        "value": f"The request {i} of department {j} is approved and will ship in {i + 2} days.",
                    },
                ]
            }
            if images and i % 2 == 0:
                name = f"{j}-{i}.png"
                Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(root / name)
                row["image"] = name
            lines.append(json.dumps(row))
        path = root / f"job{j}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        paths.append(path)
    return paths


def write_model(kind: str, root: Path) -> str:
    if kind == "tiny":
        return "tiny"
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    sys.path.insert(0, str(Path(__file__).parent))
    from foundation import INTERNVL3_1B

    from vlstack.tiny import ASSETS

    torch.manual_seed(0)
    model = InternVLForConditionalGeneration(InternVLConfig(**INTERNVL3_1B))
    model.save_pretrained(root / "model")
    for f in ("tokenizer.json", "tokenizer_config.json"):  # the tiny BPE: ids stay below the big vocab
        (root / "model" / f).write_bytes((ASSETS / f).read_bytes())
    cfg = json.loads((root / "model" / "config.json").read_text())
    cfg["image_token_id"] = 5  # <IMG_CONTEXT> of that tokenizer
    (root / "model" / "config.json").write_text(json.dumps(cfg))
    return str(root / "model")


def jobs(data: list[Path], out: Path, steps: int, batch: int):
    from vlstack.train.jobs import Job

    return [
        Job.of(
            f"job{j}",
            p,
            out / f"job{j}",
            rank=16,
            alpha=32,
            targets=TARGETS,
            batch_size=batch,
            steps=steps,
            lr=1e-4,
            seed=j,
            max_len=1024,
        )
        for j, p in enumerate(data)
    ]


def run_vlstack(
    model: str,
    mode: str,
    data: list[Path],
    out: Path,
    steps: int,
    batch: int,
    device: str,
    recompute: bool,
    max_tokens: int | None,
    dtype: str,
) -> dict:
    import vlstack
    from vlstack.train.multi import train

    vlm = vlstack.load(model, device=device, dtype=dtype)  # (the adapters float32 whatever the base)
    todo = jobs(data, out, steps, batch)
    log_every = steps  # the losses read back once a job, as a user would log on a GPU
    options = {"verbose": False, "gradient_checkpointing": recompute, "max_tokens": max_tokens, "log_every": log_every}
    t = time.perf_counter()
    if mode == "fused":
        done = train(vlm, todo, max_rows=batch * JOBS, **options)
    elif mode == "single":
        done = train(vlm, todo[:1], max_rows=batch, **options)
    else:
        done = {}
        for job in todo:
            done.update(train(vlm, [job], max_rows=batch, **options))
    return {"seconds": time.perf_counter() - t, "tokens": sum(r.tokens for r in done.values())}


def run_peft(
    model: str, data: list[Path], out: Path, steps: int, batch: int, device: str, recompute: bool, dtype: str
) -> dict:
    """transformers + peft, one adapter after another, on the same batches (vlstack's encoder)."""
    from peft import LoraConfig, get_peft_model
    from transformers import InternVLForConditionalGeneration

    import vlstack
    from vlstack.train.data import IGNORE, Stream, encode_example, read_dataset

    ours = vlstack.load(model, device="cpu")  # for its processor and directory only
    processor, path = ours.processor, ours.directory
    del ours
    base = InternVLForConditionalGeneration.from_pretrained(path, dtype=getattr(torch, dtype)).to(device)
    if recompute:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tokens, t = 0, time.perf_counter()
    for job in jobs(data, out, steps, batch):
        config = LoraConfig(
            r=job.lora.rank,
            lora_alpha=job.lora.alpha,
            target_modules=r".*language_model.*\.(" + "|".join(TARGETS) + ")",
        )
        peft_model = get_peft_model(base, config)
        peft_model.train()
        opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=job.lr)
        stream = Stream(read_dataset(job.data), job.batch_size, job.seed)
        for _ in range(job.steps):
            rows = [encode_example(processor, ex, job.max_len) for ex in stream.next()]
            longest = max(len(r["input_ids"]) for r in rows)
            ids = torch.zeros(len(rows), longest, dtype=torch.long)
            labels = torch.full((len(rows), longest), IGNORE)
            mask = torch.zeros(len(rows), longest, dtype=torch.long)
            for i, r in enumerate(rows):
                n = len(r["input_ids"])
                ids[i, :n], labels[i, :n], mask[i, :n] = r["input_ids"], r["labels"], 1
            tiles = [r["pixel_values"] for r in rows if "pixel_values" in r]
            extra = {"pixel_values": torch.cat(tiles).to(device)} if tiles else {}
            loss = peft_model(
                input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device), **extra
            ).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in peft_model.parameters() if p.requires_grad], 1.0)
            opt.step()
            opt.zero_grad()
            tokens += int(mask.sum())
        base = peft_model.unload()
    return {"seconds": time.perf_counter() - t, "tokens": tokens}


def child(args) -> None:
    data = [Path(p) for p in args.data]
    out = Path(args.work) / args.mode
    if args.mode == "peft":
        result = run_peft(
            args.model_dir, data, out, args.steps, args.batch, args.device, args.gradient_checkpointing, args.dtype
        )
    else:
        result = run_vlstack(
            args.model_dir,
            args.mode,
            data,
            out,
            args.steps,
            args.batch,
            args.device,
            args.gradient_checkpointing,
            args.max_tokens,
            args.dtype,
        )
    if args.device == "cuda":
        result["peak_bytes"] = torch.cuda.max_memory_allocated()
    else:  # the high-water mark of this process's own memory (ru_maxrss would carry the parent's across exec)
        status = Path("/proc/self/status").read_text()
        result["peak_bytes"] = int(next(x for x in status.splitlines() if x.startswith("VmHWM:")).split()[1]) * 1024
    print("RESULT " + json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny", choices=["tiny", "internvl3-1b"])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--images", action="store_true", help="a small image in every other example")
    ap.add_argument(
        "--gradient-checkpointing", action="store_true", help="every mode recomputes layers in backward (less memory)"
    )
    ap.add_argument(
        "--max-tokens", type=int, default=None, help="vlstack's steps go through the base in passes of this many tokens"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "bfloat16"],
        help="the frozen base's, both sides (default: bfloat16 on CUDA, float32 on a CPU)",
    )
    ap.add_argument("--out", default=None)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--data", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.mode:
        return child(args)

    work = Path(tempfile.mkdtemp(prefix="vlstack-bench-"))
    data = make_data(work, args.examples, args.images)
    model_dir = write_model(args.model, work)
    results = {}
    for mode in ("single", "fused", "sequential", "peft"):
        cmd = [
            sys.executable,
            __file__,
            "--mode",
            mode,
            "--model-dir",
            model_dir,
            "--work",
            str(work),
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
            "--device",
            args.device,
            "--dtype",
            args.dtype,
            "--data",
            *map(str, data),
            *(["--gradient-checkpointing"] if args.gradient_checkpointing else []),
            *(["--max-tokens", str(args.max_tokens)] if args.max_tokens else []),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not line:
            raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
        results[mode] = json.loads(line[0][len("RESULT ") :])
        results[mode]["tok_s"] = results[mode]["tokens"] / results[mode]["seconds"]
        print(f"{mode}: {results[mode]['tok_s']:.1f} tokens/s", file=sys.stderr, flush=True)  # progress
    fused = results["fused"]
    print(
        f"model {args.model}, {args.device}, {args.dtype} base, {JOBS} adapters x {args.steps} steps "
        f"x batch {args.batch}, "
        f"rank 16 on q,k,v,o,gate,up,down{', with images' if args.images else ''}"
        f"{', gradient checkpointing' if args.gradient_checkpointing else ''}"
        f"{f', passes of at most {args.max_tokens} tokens' if args.max_tokens else ''}"
    )
    print(f"{'':26}{'tokens/s':>10}{'peak GB':>10}{'fused speed-up':>16}")
    for mode, label in (
        ("fused", "vlstack fused (4 jobs)"),
        ("sequential", "vlstack sequential"),
        ("peft", "peft sequential"),
        ("single", "vlstack one adapter"),
    ):
        r = results[mode]
        print(f"{label:26}{r['tok_s']:10.1f}{r['peak_bytes'] / 1e9:10.2f}{fused['tok_s'] / r['tok_s']:15.2f}x")
    print(f"fused peak memory / one-adapter run: {fused['peak_bytes'] / results['single']['peak_bytes']:.2f}x")
    suffix = ("_images" if args.images else "") + ("_gc" if args.gradient_checkpointing else "")
    suffix += f"_pass{args.max_tokens}" if args.max_tokens else ""
    out = Path(args.out or f"bench/results/multi_lora_train_{args.model}{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
