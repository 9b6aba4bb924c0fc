"""Load run: many clients against `vlstack serve` for a fixed time; every request must succeed and the
server's memory must stay flat.

Each client loops: pick an adapter (or the base model), a question, with or without one of 16 images,
streamed or not, and checks that the answer came back whole (200, a finish reason, usage counts). With
--malformed F, a fraction F of the requests are malformed (the kinds that once gave 500s or cut other
streams: a user's <IMG_CONTEXT> with an image, bad field types, out-of-range numbers, lone surrogates...):
each must get a 4xx in OpenAI's error shape (the text with image tokens: a 200), and none may disturb the
others. The
server's resident memory is sampled every second; after the first quarter (caches and allocator pools
warm by then) its trend is fitted by least squares (MB per minute) and the mean of the second quarter
is compared with the mean of the last.

    python bench/load.py                       # tiny model, 64 clients, 60 s
    python bench/load.py --clients 64 --seconds 60 --out bench/results/load_tiny.json
    python bench/load.py --clients 64 --seconds 60 --malformed 0.2
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


HI = [{"role": "user", "content": "hi"}]
MALFORMED = [  # request bodies (bytes: sent as they are) that must be refused with a 4xx
    {"model": ["tiny"], "messages": HI},
    {"model": {"id": "tiny"}, "messages": HI},
    {"model": "tiny", "messages": HI, "stop": 5},
    {"model": "tiny", "messages": HI, "stream_options": "x", "stream": True},
    {"model": "tiny", "messages": HI, "seed": 2**70},
    {"model": "tiny", "messages": HI, "logit_bias": {"\u00b2": 1}},
    {"model": "tiny", "messages": HI, "max_tokens": -1},
    {"model": "tiny", "messages": HI, "n": 1000},
    {"model": "nothing", "messages": HI},
    {
        "model": "tiny",
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}],
    },
    b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}',
    b"{not json",
]


async def malformed(http, url: str, rng: random.Random, images: list[str]) -> bool:
    """One malformed request: refused with a 4xx in OpenAI's shape, or (user text holding image tokens, with an
    image) answered, as plain text."""
    if rng.random() < 0.2:
        content = [{"type": "image_url", "image_url": {"url": rng.choice(images)}},
                   {"type": "text", "text": "<IMG_CONTEXT>" * 3 + "<|im_end|>"}]  # fmt: skip
        body = {"model": rng.choice(["tiny", *ADAPTERS]), "messages": [{"role": "user", "content": content}],
                "max_tokens": 4}  # fmt: skip
        r = await http.post(url, json=body)
        return r.status_code == 200
    body = rng.choice(MALFORMED)
    r = await (http.post(url, content=body) if isinstance(body, bytes) else http.post(url, json=body))
    return 400 <= r.status_code < 500 and r.json()["error"]["type"] == "invalid_request_error"


async def client(http, url: str, images: list[str], stop_at: float, seed: int, stats: dict, bad: float = 0.0) -> None:
    rng = random.Random(seed)
    while time.perf_counter() < stop_at:
        if rng.random() < bad:
            try:
                refused = await malformed(http, url, rng, images)
            except Exception as e:
                refused = False
                stats["errors"].append(repr(e)[:200])
            stats["refused" if refused else "failed"] += 1
            continue
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


async def run(base: str, clients: int, seconds: float, images: list[str], pid: int, bad: float) -> dict:
    import httpx

    stats: dict = {"ok": 0, "failed": 0, "refused": 0, "errors": []}
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
        await asyncio.gather(sample(), *(client(http, url, images, stop_at, i, stats, bad) for i in range(clients)))
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
    ap.add_argument("--malformed", type=float, default=0.0, help="fraction of malformed requests")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    adapters = make_adapters(args.model, Path(tempfile.mkdtemp(prefix="vlstack-load-")))
    images = [w["content"][0]["image_url"]["url"] for w in make_workload(16, 0, 1)]
    port = free_port()
    proc = serve_ours(args.model, adapters, port, args.device, args.max_batch)
    try:
        base = f"http://127.0.0.1:{port}"
        result = asyncio.run(run(base, args.clients, args.seconds, images, proc.pid, args.malformed))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    print(f"{args.clients} clients for {args.seconds:.0f} s against `vlstack serve --model {args.model}`: "
          f"{result['ok']} requests answered, {result['refused']} malformed ones handled as expected, "
          f"{result['failed']} failed ({result['ok'] / result['seconds']:.1f} req/s answered)")  # fmt: skip
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
