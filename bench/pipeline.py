"""Pipelined multi-adapter training: each stage's idle share of its steps (the bubble), measured, beside GPipe's for
passes of equal cost, as the number of jobs (passes a step) grows: `vlstack train` with `parallel: pipeline`
under torchrun, one stage a process, on the CPU with gloo (or one GPU a stage with NCCL).

    python bench/pipeline.py --model tiny --stages 2 --jobs 1 --jobs 2 --jobs 4
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny", help="tiny, internvl3-1b (random, its shapes) or a directory")
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--jobs", type=int, action="append", help="jobs trained at once (default: 1, 2 and 4)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--out", default="bench/results/pipeline.json")
    args = ap.parse_args()
    from multi_lora_train import make_data, write_model

    work = Path(tempfile.mkdtemp(prefix="vlstack-pipeline-bench-"))
    model = write_model(args.model, work)
    data = make_data(work, 4 * args.batch, images=True)
    results = {}
    for n in args.jobs or [1, 2, 4]:
        jobs = "".join(
            f"  - {{name: j{i}, data: {data[i % len(data)]}, output: {work / f'out{n}' / f'j{i}'}, rank: 8, "
            f"batch_size: {args.batch}, steps: {args.steps}, lr: 1e-3}}\n"
            for i in range(n)
        )
        plan = work / f"jobs{n}.yaml"
        plan.write_text(f"model: {model}\nparallel: pipeline\njobs:\n{jobs}")
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(args.stages), "-m", "vlstack.cli", "train", str(plan)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
        line = next((x for x in done.stderr.splitlines() if x.startswith("pipeline:")), None)
        if done.returncode or line is None:
            raise SystemExit(done.stderr[-3000:])
        idle = [int(x) / 100 for x in re.search(r"idle ([\d%, ]+) of", line).group(1).replace("%", "").split(", ")]
        gpipe = int(re.search(r"equal passes: (\d+)%", line).group(1)) / 100
        results[n] = {"idle": idle, "gpipe": gpipe}
        print(f"{n} job(s): {line}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "jobs": results}, indent=2))


if __name__ == "__main__":
    main()
