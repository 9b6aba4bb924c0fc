"""Load run: many clients against `vlstack serve` for a fixed time; every request must succeed and the
server's memory must stay flat.

Each client loops: pick an adapter (or the base model), a question, with or without one of 16 images,
streamed or not, and checks that the answer came back whole (200, a finish reason, usage counts). The
server's resident memory is sampled every second; after the first quarter (caches and allocator pools
warm by then) its trend is fitted by least squares (MB per minute) and the mean of the second quarter
is compared with the mean of the last.

    python bench/load.py                       # tiny model, 64 clients, 60 s
    python bench/load.py --clients 64 --seconds 60 --out bench/results/load_tiny.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from serve import ADAPTERS, QUESTIONS, chunks, free_port, make_adapters, make_workload, serve_ours  # noqa: E402


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def client(http, url: str, images: list[str], stop_at: float, seed: int, stats: dict) -> None:
    rng = random.Random(seed)
    while time.perf_counter() < stop_at:
        model = rng.choice(["tiny", *ADAPTERS])
        content: list[dict] = [{"type": "text", "text": rng.choice(QUESTIONS)}]
        if rng.random() < 0.5:
            content.insert(0, {"type": "image_url", "image_url": {"url": rng.choice(images)}})
        stream = rng.random() < 0.5
        body = {"model": model, "messages": [{"role": "user", "content": content}], "stream": stream,
                "max_tokens": rng.randint(4, 32)}  # fmt: skip
        if stream:
            body["stream_options"] = {"include_usage": True}
        ok = False
        try:
            if stream:
                finish, usage = None, None
                async with http.stream("POST", url, json=body) as r:
                    async for chunk in chunks(r):
                        usage = chunk.get("usage") or usage
                        finish = next((c["finish_reason"] for c in chunk["choices"] if c["finish_reason"]), finish)
                    ok = r.status_code == 200 and finish is not None and usage is not None
            else:
                r = await http.post(url, json=body)
                ok = r.status_code == 200 and r.json()["choices"][0]["finish_reason"] is not None
        except Exception as e:  # a failed request, whatever the reason, is counted and reported
            stats["errors"].append(repr(e)[:200])
        stats["ok" if ok else "failed"] += 1


async def run(base: str, clients: int, seconds: float, images: list[str], pid: int) -> dict:
    import httpx

    stats: dict = {"ok": 0, "failed": 0, "errors": []}
    memory: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    stop_at = t0 + seconds

    async def sample():
        while time.perf_counter() < stop_at:
            memory.append((time.perf_counter() - t0, rss_bytes(pid)))
            await asyncio.sleep(1)

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300), limits=limits) as http:
        url = base + "/v1/chat/completions"
        await asyncio.gather(sample(), *(client(http, url, images, stop_at, i, stats) for i in range(clients)))
    warm = np.array([(t, m / 2**20) for t, m in memory if t >= seconds / 4])  # [n, 2]: seconds, MB
    q2, q4 = warm[warm[:, 0] < seconds / 2, 1], warm[warm[:, 0] >= 3 * seconds / 4, 1]
    return {
        **stats,
        "seconds": time.perf_counter() - t0,
        "rss_start_mb": memory[0][1] / 2**20,
        "rss_q2_mean_mb": float(q2.mean()),
        "rss_q4_mean_mb": float(q4.mean()),
        "rss_max_mb": max(m for _, m in memory) / 2**20,
        "rss_trend_mb_per_min": float(np.polyfit(warm[:, 0], warm[:, 1], 1)[0] * 60),
        "memory": memory,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    adapters = make_adapters(args.model, Path(tempfile.mkdtemp(prefix="vlstack-load-")))
    images = [w["content"][0]["image_url"]["url"] for w in make_workload(16, 0, 1)]
    port = free_port()
    proc = serve_ours(args.model, adapters, port, args.device, args.max_batch)
    try:
        result = asyncio.run(run(f"http://127.0.0.1:{port}", args.clients, args.seconds, images, proc.pid))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    print(f"{args.clients} clients for {args.seconds:.0f} s against `vlstack serve --model {args.model}`: "
          f"{result['ok']} requests answered, {result['failed']} failed "
          f"({result['ok'] / result['seconds']:.1f} req/s)")  # fmt: skip
    print(f"server RSS: {result['rss_start_mb']:.0f} MB idle; mean {result['rss_q2_mean_mb']:.0f} MB in the second "
          f"quarter, {result['rss_q4_mean_mb']:.0f} MB in the last; trend after warm-up "
          f"{result['rss_trend_mb_per_min']:+.0f} MB/min; max {result['rss_max_mb']:.0f} MB")  # fmt: skip
    for e in sorted(set(result["errors"]))[:5]:
        print("error:", e)
    out = Path(args.out or f"bench/results/load_{Path(args.model).name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "result": result}, indent=1))
    sys.exit(1 if result["failed"] else 0)


if __name__ == "__main__":
    main()
