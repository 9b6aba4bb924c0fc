"""Threads on a shared machine: `vlstack eval` on the tiny model while other processes keep some cores busy,
with torch's default intra-op threads (one per core) against OMP_NUM_THREADS set to the cores left free, in one
run. torch's threads wait for each other at the end of every parallel region: one of them descheduled by
another process holds up the others, so on a busy machine more threads can be much slower than fewer.

    python bench/threads.py                  # 1 core kept busy (of this machine's), 40 charts, 2 rounds
    python bench/threads.py --busy 0         # an idle machine: the same comparison
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


def busy_loop() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def timed_eval(data: Path, out: Path, threads: int | None) -> tuple[float, float]:
    """(wall seconds, pages/s as eval reports them) of one `vlstack eval chartqa` on the tiny model."""
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "vlstack.cli", "eval", "chartqa", "--data", str(data), "--out", str(out),
           "--max-new-tokens", "8"]  # fmt: skip
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - start
    return wall, json.loads((out / "summary.json").read_text())["pages_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--busy", type=int, default=1, help="cores kept busy by other processes")
    ap.add_argument("--n", type=int, default=40, help="charts drawn (about 4 test questions each at 20%)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    free = max(1, cores - args.busy)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        subprocess.run([sys.executable, "-m", "vlstack.cli", "synth", "charts", "--n", str(args.n), "--out",
                        str(root / "charts"), "--size", "224"], check=True, capture_output=True)  # fmt: skip
        data = root / "charts" / "test.jsonl"
        loops = [busy_loop() for _ in range(args.busy)]
        rows = []
        try:
            for r in range(args.rounds):  # alternating, so that drift falls on both
                for threads in (None, free) if r % 2 == 0 else (free, None):
                    wall, rate = timed_eval(data, root / f"run-{r}-{threads}", threads)
                    rows.append({"round": r, "threads": threads or f"default ({cores})", "seconds": wall,
                                 "pages_per_s": rate})  # fmt: skip
                    print(f"round {r}: threads {rows[-1]['threads']}: {wall:.1f} s, {rate:.2f} pages/s", flush=True)
        finally:
            for p in loops:
                p.kill()
    default = statistics.median(x["pages_per_s"] for x in rows if x["threads"] != free)
    chosen = statistics.median(x["pages_per_s"] for x in rows if x["threads"] == free)
    ratio = chosen / default
    print(f"\n{args.busy} of {cores} cores busy: OMP_NUM_THREADS={free} gives {ratio:.2f}x the default's pages/s "
          f"(medians: {chosen:.2f} vs {default:.2f})")  # fmt: skip
    print(json.dumps({"busy": args.busy, "cores": cores, "rows": rows, "ratio": ratio}))


if __name__ == "__main__":
    main()
