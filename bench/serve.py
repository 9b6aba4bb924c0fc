"""Serving benchmark: `vlstack serve` vs a baseline server built on transformers + peft generate (one
request at a time, what a user would otherwise run), on the same model, adapters and workload, in one run.

The workload: N chat requests with an image each (random sizes, so 1 to 13 tiles), spread round-robin
over 4 LoRA adapters, arriving as a Poisson process; greedy decoding, streamed. Each server runs in its
own process; the client records, per request, the time to the first token and the time per output
token after it. Both servers encode prompts with vlstack's processor (the baseline's own would be
slower), and both answer greedily, so their answers are compared too. With --rounds, both servers stay
up and are driven in turn, each round with new images and the order alternating, so that a shared
machine's drift falls on both; the headline is the median of the rounds' ratios.

    python bench/serve.py                       # tiny model, 48 requests, CPU
    python bench/serve.py --rounds 3            # three workloads in turn: the median ratio and its range
    python bench/serve.py --model DIR --requests 64 --rate 8 --device cuda
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from PIL import Image

from vlstack.parallel.serving import free_port

ADAPTERS = ("finance", "legal", "support", "science")
QUESTIONS = ("What is the total amount?", "Summarise this page.", "Which value is the largest?", "Who signed it?")


# the workload ----------------------------------------------------------------------------------------


def make_adapters(model: str, root: Path) -> dict[str, str]:
    """Four PEFT adapters with random (trained-looking) weights on q, k, v, o, gate, up, down."""
    import vlstack
    from vlstack.adapters import save_adapter
    from vlstack.layers.lora import LoRASpec, add_adapter

    vlm = vlstack.load(model, device="cpu")
    spec, out = LoRASpec(rank=16, alpha=32), {}
    for i, name in enumerate(ADAPTERS):
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in add_adapter(vlm.model, name, spec, seed=i):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        out[name] = str(save_adapter(vlm.model, name, root / name, spec))
    return out


def make_workload(n: int, rate: float, max_tokens: int, pages: int | None = None, seed: int = 0) -> list[dict]:
    """n requests: arrival offset (s), adapter, a data-URL image, a question, max_tokens. With pages < n,
    the requests ask about `pages` distinct images, four consecutive requests (four questions, four
    adapters) about each page."""
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, n)) if rate > 0 else np.zeros(n)
    urls = []
    for _ in range(min(pages or n, n)):
        w, h = (int(x) for x in rng.integers(160, 900, 2))
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    work = []
    for i in range(n):
        url = urls[(i // 4) % len(urls)] if len(urls) < n else urls[i]  # a page's 4 questions arrive together
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTIONS[i % 4]}]
        work.append({"at": float(arrivals[i]), "model": ADAPTERS[i % len(ADAPTERS)], "content": content,
                     "max_tokens": max_tokens})  # fmt: skip
    return work


# the baseline server ---------------------------------------------------------------------------------


def baseline_app(model: str, adapters: dict[str, str], device: str, dtype: str = "float32"):
    """OpenAI-style streaming chat over transformers' InternVL + peft, one generate at a time."""
    from peft import PeftModel
    from transformers import InternVLForConditionalGeneration

    import vlstack

    ours = vlstack.load(model, device="cpu")  # its processor (tokenizer, template, tiling) and eos ids only
    processor, eos = ours.processor, sorted(ours.eos)
    hf = InternVLForConditionalGeneration.from_pretrained(ours.directory, dtype=getattr(torch, dtype)).to(device).eval()
    names = list(adapters)
    peft_model = PeftModel.from_pretrained(hf, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(adapters[name], adapter_name=name)
    peft_model.eval()
    lock = threading.Lock()
    app = FastAPI()

    class Tokens:  # a transformers streamer handing each new token id to the event loop
        def __init__(self, loop, queue):
            self.loop, self.queue, self.first = loop, queue, True

        def put(self, value):
            if self.first:  # the first call carries the prompt
                self.first = False
                return
            for t in value.flatten().tolist():
                self.loop.call_soon_threadsafe(self.queue.put_nowait, t)

        def end(self):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, None)

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def run():
            inputs = processor(body["messages"])
            with lock, torch.inference_mode():
                peft_model.set_adapter(body["model"])
                peft_model.generate(
                    input_ids=inputs["input_ids"].to(device),
                    attention_mask=torch.ones_like(inputs["input_ids"]).to(device),
                    pixel_values=inputs["pixel_values"].to(device, hf.dtype),
                    max_new_tokens=body["max_tokens"],
                    do_sample=False,
                    eos_token_id=eos,
                    pad_token_id=eos[0],
                    streamer=Tokens(loop, queue),
                )
            return len(inputs["input_ids"][0])

        async def events():
            task = asyncio.ensure_future(asyncio.to_thread(run))
            ids, text, stopped = [], "", 0
            while (t := await queue.get()) is not None:
                if t in eos:
                    stopped = 1
                    continue
                ids.append(t)
                new = processor.decode(ids)
                yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': new[len(text) :]}}]})}\n\n"
                text = new
            prompt = await task
            usage = {"prompt_tokens": prompt, "completion_tokens": len(ids) + stopped}  # eos counts, as in vlstack
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


# driving a server ------------------------------------------------------------------------------------


def note(message: str) -> None:
    """Progress on stderr, with the seconds since the start: a run cut short still says how far it got."""
    print(f"[{time.perf_counter() - STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)


STARTED = time.perf_counter()


def tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else ""


def start(cmd: list[str], port: int, log: Path) -> subprocess.Popen:
    """The server's process, its output to a log file (a pipe nobody reads fills up and stops the server)."""
    import httpx

    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{cmd} failed:\n{tail(log)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"{cmd} did not start")


async def chunks(response) -> AsyncIterator[dict]:
    """The JSON chunks of a server-sent-events chat stream (without the final [DONE])."""
    async for line in response.aiter_lines():
        if line.startswith("data: {"):
            yield json.loads(line[6:])


async def one(client, url: str, item: dict, t0: float) -> dict:
    await asyncio.sleep(max(0.0, t0 + item["at"] - time.perf_counter()))
    body = {"model": item["model"], "messages": [{"role": "user", "content": item["content"]}],
            "max_tokens": item["max_tokens"], "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    sent, first, text, usage = time.perf_counter(), None, "", None
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:  # (why, for the summary: the server's message)
            return {"ok": False, "status": r.status_code, "error": (await r.aread()).decode(errors="replace")[:200]}
        async for chunk in chunks(r):
            usage = chunk.get("usage") or usage
            for c in chunk["choices"]:
                piece = c.get("delta", {}).get("content")
                if piece:
                    first = first or time.perf_counter()
                    text += piece
    end = time.perf_counter()
    tokens = usage["completion_tokens"] if usage else 0
    return {"ok": True, "sent": sent, "first": first or end, "end": end, "tokens": tokens, "text": text}


async def drive(base: str, work: list[dict]) -> list[dict]:
    import httpx

    limits = httpx.Limits(max_connections=len(work))
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800), limits=limits) as client:
        t0 = time.perf_counter()
        return await asyncio.gather(*(one(client, base + "/v1/chat/completions", w, t0) for w in work))


def summarise(records: list[dict]) -> dict:
    ok = [r for r in records if r["ok"]]
    errors = sorted({f"{r['status']}: {r['error']}" for r in records if not r["ok"]})
    if not ok:
        raise SystemExit(f"every request failed: {errors}")
    ttft = sorted(r["first"] - r["sent"] for r in ok)
    tpot = sorted((r["end"] - r["first"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1)
    span = max(r["end"] for r in ok) - min(r["sent"] for r in ok)
    tokens = sum(r["tokens"] for r in ok)

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    return {
        "requests": len(records),
        "failed": len(records) - len(ok),
        "seconds": span,
        "completion_tokens": tokens,
        "tokens_per_s": tokens / span,
        "requests_per_s": len(ok) / span,
        "ttft_p50": statistics.median(ttft),
        "ttft_p99": pct(ttft, 0.99),
        "tpot_p50": statistics.median(tpot) if tpot else float("nan"),
        "tpot_p99": pct(tpot, 0.99),
        "errors": errors,
    }


def serve_ours(
    model: str,
    adapters: dict[str, str],
    port: int,
    device: str,
    max_batch: int,
    dtype: str,
    max_len: int | None,
    log: Path,
    tp: int = 1,
) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vlstack.cli", "serve", "--model", model, "--port", str(port), "--device", device,
           "--max-batch", str(max_batch), "--dtype", dtype, "--served-name", "base", "--tp", str(tp)]  # fmt: skip
    if max_len:
        cmd += ["--max-model-len", str(max_len)]
    for name, path in adapters.items():
        cmd += ["--adapter", f"{name}={path}"]
    return start(cmd, port, log)


def serve_baseline(
    model: str, adapters: dict[str, str], port: int, device: str, dtype: str, log: Path
) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--baseline-server", json.dumps(adapters), "--model", model, "--port", str(port),
           "--device", device, "--dtype", dtype]  # fmt: skip
    return start(cmd, port, log)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny", help="tiny, internvl3-1b (random weights, written here) or a directory")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--baseline-requests", type=int, default=None,
                    help="drive the baseline with the first N requests only (it answers one at a time)")  # fmt: skip
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--rate", type=float, default=16.0, help="mean arrivals per second (Poisson)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--pages", type=int, default=None, help="distinct images (default: one per request)")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=None, help="the server's (bounds its KV cache)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=1, help="workloads driven in turn (new images each)")
    ap.add_argument("--adapter-cost", action="store_true",
                    help="also drive vlstack with every request on the base model: what the adapters cost")  # fmt: skip
    ap.add_argument("--tp", type=int, default=1, help="vlstack's tensor parallelism (one process per GPU)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--baseline-server", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    if args.baseline_server:  # the child process of the baseline server
        import uvicorn

        app = baseline_app(args.model, json.loads(args.baseline_server), args.device, args.dtype)
        uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
        return

    signal.signal(signal.SIGTERM, lambda *_: sys.exit("serve.py: terminated"))  # (the servers are stopped below)
    work_dir = Path(tempfile.mkdtemp(prefix="vlstack-serve-bench-"))
    if args.model == "internvl3-1b":
        from multi_lora_train import write_model

        args.model = write_model("internvl3-1b", work_dir)
    adapters = make_adapters(args.model, work_dir)
    note(f"model and adapters written to {work_dir}")
    procs, bases, logs = {}, {}, {name: work_dir / f"{name}.log" for name in ("vlstack", "baseline")}
    try:
        for name in ("vlstack", "baseline"):  # both up for the whole run; one is driven at a time
            port = free_port()
            if name == "vlstack":
                procs[name] = serve_ours(args.model, adapters, port, args.device, args.max_batch, args.dtype,
                                         args.max_model_len, logs[name], args.tp)  # fmt: skip
            else:
                procs[name] = serve_baseline(args.model, adapters, port, args.device, args.dtype, logs[name])
            bases[name] = f"http://127.0.0.1:{port}"
            note(f"{name} server up")
            asyncio.run(drive(bases[name], make_workload(2, 0, args.max_tokens, seed=10**6)))  # warm-up
            note(f"{name} server warmed up")
        rounds = []
        for i in range(args.rounds):  # new images each round (no cache hits across rounds); the order alternates
            work = make_workload(args.requests, args.rate, args.max_tokens, args.pages, seed=i)
            order = ("vlstack", "baseline") if i % 2 == 0 else ("baseline", "vlstack")
            drives = [(n, bases[n], work[: args.baseline_requests] if n == "baseline" else work) for n in order]
            if args.adapter_cost:  # requests of the same shapes on the base model (new images: no cache hits)
                fresh = make_workload(args.requests, args.rate, args.max_tokens, args.pages, seed=i + 10**5)
                drives.append(("vlstack, base", bases["vlstack"], [dict(w, model="base") for w in fresh]))
            records, summaries = {}, {}
            for name, base, requests in drives:  # each one's figures in the progress line at once: a run cut short
                records[name] = asyncio.run(drive(base, requests))  # still has them
                r = summaries[name] = summarise(records[name])
                note(f"round {i + 1}: {name} done: {r['tokens_per_s']:.1f} tok/s, {r['failed']} failed, "
                     f"TTFT p50 {r['ttft_p50']:.2f} s")  # fmt: skip
            same = sum(a.get("text") == b.get("text") for a, b in zip(records["vlstack"], records["baseline"]))
            rounds.append(summaries)
            rounds[-1]["ratio"] = rounds[-1]["vlstack"]["tokens_per_s"] / rounds[-1]["baseline"]["tokens_per_s"]
            rounds[-1]["identical_answers"] = same
            note(
                f"round {i + 1}: "
                + ", ".join(f"{n} {r['tokens_per_s']:.1f} tok/s" for n, r in rounds[-1].items() if isinstance(r, dict))
                + f", ratio {rounds[-1]['ratio']:.2f}x"
            )
    except BaseException:  # what the servers said, for a run that failed or was cut short
        for name, log in logs.items():
            print(f"--- the end of {name}'s log:\n{tail(log)}", file=sys.stderr)
        raise
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(timeout=60)
    print(f"model {args.model} on {args.device} ({args.dtype}): {args.requests} streamed requests with an image each "
          f"({args.pages or args.requests} distinct) over "
          f"{len(ADAPTERS)} adapters, Poisson arrivals at {args.rate}/s, greedy, max {args.max_tokens} tokens, "
          f"{os.cpu_count()} CPUs, {args.rounds} round(s)")  # fmt: skip
    heads = ("tok/s", "req/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "failed")
    print(f"{'':24}" + "".join(f"{h:>10}" for h in heads))
    for i, rnd in enumerate(rounds):
        for name in [n for n in ("vlstack", "baseline", "vlstack, base") if n in rnd]:
            r = rnd[name]
            print(f"{f'{name}, round {i + 1}':24}{r['tokens_per_s']:10.1f}{r['requests_per_s']:10.2f}"
                  f"{r['ttft_p50']:10.3f}{r['ttft_p99']:10.3f}{r['tpot_p50']:10.4f}{r['tpot_p99']:10.4f}"
                  f"{r['failed']:10d}")  # fmt: skip
            for error in r["errors"]:
                print(f"{'':24}failed with {error}")
        compared = args.baseline_requests or args.requests
        print(f"{'':24}vlstack / baseline: {rnd['ratio']:.2f}x; "
              f"identical greedy answers: {rnd['identical_answers']}/{compared}")  # fmt: skip
        if "vlstack, base" in rnd:
            cost = 1 - rnd["vlstack"]["tokens_per_s"] / rnd["vlstack, base"]["tokens_per_s"]
            print(f"{'':24}{len(ADAPTERS)} adapters cost {100 * cost:.1f}% of the base model's throughput")
    ratios = sorted(r["ratio"] for r in rounds)
    print(f"throughput vlstack / baseline, median of {len(rounds)} round(s): {statistics.median(ratios):.2f}x "
          f"(range {ratios[0]:.2f}-{ratios[-1]:.2f}x)")  # fmt: skip
    out = Path(args.out or f"bench/results/serve_{Path(args.model).name}_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rounds": rounds}, indent=2))


if __name__ == "__main__":
    main()
