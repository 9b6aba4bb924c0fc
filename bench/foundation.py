"""Foundation benchmark: vlstack vs transformers on a random checkpoint with InternVL3-1B shapes.

Measures, in one run and on the same inputs:
- prefill tokens/s (one text prompt) and decode tokens/s (greedy, batch 1) of vlstack and transformers;
  with --compiled (the default on CUDA) also transformers' fastest decode: a static KV cache and
  `torch.compile(mode="reduce-overhead")` (CUDA graphs), compiled before it is timed;
- decode against the memory-bandwidth floor: max tokens/s = copy bandwidth / weight bytes read per token;
- image preprocessing of a 3840x2160 image: vlstack's tiling vs transformers' GotOcr2 PIL processor.

Prints a table and writes JSON. Usage:
    python bench/foundation.py [--device cpu|cuda] [--dtype float32|bfloat16] [--compiled|--no-compiled]
                               [--out bench/results/foundation.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

INTERNVL3_1B = dict(
    vision_config=dict(
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        image_size=448,
        patch_size=14,
        attention_bias=True,
    ),
    text_config=dict(
        model_type="qwen2",
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
        vocab_size=151674,
        tie_word_embeddings=True,
        rope_theta=1e6,
        max_position_embeddings=32768,
    ),
    image_token_id=151667,
    tie_word_embeddings=True,
)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeat: int) -> float:
    """Median wall time of fn() over repeat runs, after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def copy_bandwidth(device: str, nbytes: int = 2**30) -> float:
    """Bytes moved per second by a large tensor copy (read + write)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    return 2 * nbytes / timed(lambda: dst.copy_(src), device, 5)


def build(device: str, dtype: torch.dtype):
    """A random transformers model with InternVL3-1B shapes and vlstack's model on the same weights."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    from vlstack.api import build_model
    from vlstack.checkpoint import to_ours
    from vlstack.models.config_json import parse_config

    torch.manual_seed(0)
    hf = InternVLForConditionalGeneration(InternVLConfig(**INTERNVL3_1B)).to(device=device, dtype=dtype).eval()
    cfg = parse_config(hf.config.to_dict())
    state = {}
    for key, t in hf.state_dict().items():
        state.update(to_ours(key, t, cfg.vision.hidden_size))
    ours = build_model(cfg, state, torch.device(device), dtype)  # shares the tensors: no second copy
    return hf, ours


class Stamps:
    """A transformers streamer that records when each new token arrives."""

    def __init__(self):
        self.times, self.calls = [], 0

    def put(self, value):
        self.calls += 1
        if self.calls > 1:  # the first call carries the prompt
            self.times.append(time.perf_counter())

    def end(self):
        pass


def bench_llm(
    hf, ours, device: str, prompt_len: int, new_tokens: int, repeat: int, compiled: bool, profile: bool = False
) -> dict:
    from vlstack.api import VLM
    from vlstack.chat import Processor, read_tokenizer
    from vlstack.layers.kv_cache import KVCache
    from vlstack.layers.step import packed_step
    from vlstack.sampling import SamplingParams
    from vlstack.tiny import tiny_dir

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 151000, (1, prompt_len), generator=gen).to(device)

    def hf_prefill():
        with torch.inference_mode():
            hf(input_ids=ids, logits_to_keep=1)

    def our_prefill():
        with torch.inference_mode():
            cache = KVCache(ours.cfg.text.kv_shape(1, prompt_len), ours.dtype, torch.device(device))
            step = packed_step([prompt_len], torch.device(device), slots=[0], max_len=prompt_len, logits="last")
            ours(ids[0], step, cache=cache)

    t_hf_prefill = timed(hf_prefill, device, max(repeat, 5))  # (a prefill is short: one run of it is noise)
    t_our_prefill = timed(our_prefill, device, max(repeat, 5))

    short = ids[:, :32]

    def hf_decode(**static) -> float:
        s = Stamps()
        with torch.inference_mode():
            hf.generate(
                input_ids=short,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                streamer=s,
                **static,
            )
        sync(device)
        return (len(s.times) - 1) / (s.times[-1] - s.times[0])

    def hf_compiled_decode() -> float:
        """A static cache: on CUDA, generate compiles the forward with compile_config (CUDA graphs)."""
        from transformers import CompileConfig

        return hf_decode(cache_implementation="static", compile_config=CompileConfig(mode="reduce-overhead"))

    vlm = VLM(ours, Processor(read_tokenizer(tiny_dir()), ours.cfg), set(), None, "bench")  # no EOS: every token

    engine = vlm.engine(1, max_len=short.shape[1] + new_tokens, image_cache_mb=0, background=False)

    def our_decode() -> float:
        """The engine's steps, as VLM.chat runs them (one engine kept, its graphs captured in the warm-up): the
        first prefills (its token read back: the clock starts), the later ones decode, each launched before the
        one before's token is read back (no synchronisation between them: that would undo the overlap)."""
        req = engine.submit({"input_ids": short.cpu()}, None, SamplingParams(max_new_tokens=new_tokens))
        engine.step()
        start = time.perf_counter()
        while engine.running or not engine.waiting.empty():
            engine.step()
        sync(device)
        return (req.generated - 1) / (time.perf_counter() - start)

    def our_step() -> float:
        """The decode step alone (on a GPU its graph replayed, greedy), no engine around it: the GPU's share."""
        row, token = torch.zeros(1, dtype=torch.long, device=device), short[0, -1:]  # [1], [1]
        for i in range(new_tokens):  # each token fed on the device (as the engine's pending ones are)
            token = engine.decoder([0], [short.shape[1] + i], [0], [None], (row, token)).argmax(-1)
            if i == 0:
                sync(device)
                start = time.perf_counter()
        sync(device)
        return (new_tokens - 1) / (time.perf_counter() - start)

    fns = {"vlstack": our_decode, "vlstack step alone": our_step, "transformers": hf_decode}
    if compiled:
        fns["transformers compiled"] = hf_compiled_decode
        hf_compiled_decode()  # compiling (and capturing) takes its time here, not in the runs
    for fn in fns.values():  # warm-up
        fn()
    runs = [{name: fn() for name, fn in fns.items()} for _ in range(repeat)]  # interleaved: drift hits all alike
    if profile:  # where the step alone's time goes: its kernels by total device time
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiler

        kinds = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profiler(activities=kinds) as prof:
            our_step()
        key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))
    return {
        "prompt_tokens": prompt_len,
        "prefill_tok_s": {"vlstack": prompt_len / t_our_prefill, "transformers": prompt_len / t_hf_prefill},
        "decode_tok_s": {name: statistics.median(r[name] for r in runs) for name in fns},
    }


def bench_image(repeat: int) -> dict:
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from vlstack.image import tile_image

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (2160, 3840, 3), dtype=np.uint8))
    proc = GotOcr2ImageProcessorPil(
        size={"height": 448, "width": 448},
        crop_to_patches=True,
        max_patches=12,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    ref = proc(img, return_tensors="pt")["pixel_values"]
    ours = tile_image(img, 448, 1, 12)
    assert torch.equal(ref, ours), "pixel values differ from transformers"
    t_hf = timed(lambda: proc(img, return_tensors="pt"), "cpu", repeat)
    t_ours = timed(lambda: tile_image(img, 448, 1, 12), "cpu", repeat)
    return {
        "image": "3840x2160",
        "tiles": int(ours.shape[0]),
        "ms": {"vlstack": t_ours * 1e3, "transformers": t_hf * 1e3},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=None,
                    help="also time transformers with a static cache + torch.compile (default: on CUDA)")  # fmt: skip
    ap.add_argument("--profile", action="store_true", help="print the decode step's kernels by device time")
    ap.add_argument("--out", default="bench/results/foundation.json")
    args = ap.parse_args()
    compiled = args.device == "cuda" if args.compiled is None else args.compiled
    dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "bfloat16"))

    image = bench_image(max(args.repeat, 5))
    hf, ours = build(args.device, dtype)
    llm = bench_llm(hf, ours, args.device, args.prompt_len, args.new_tokens, args.repeat, compiled, args.profile)
    lm = ours.language_model
    # bytes read per decode step: every decoder weight and the LM head (the embedding table is only indexed)
    weight_bytes = (
        sum(p.numel() for p in lm.layers.parameters()) + lm.norm.weight.numel() + ours.lm_head.weight.numel()
    ) * ours.lm_head.weight.element_size()
    bw = copy_bandwidth(args.device)
    floor = bw / weight_bytes
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{torch.get_num_threads()} threads",
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        **llm,
        "image_preprocess": image,
        "copy_bandwidth_GB_s": bw / 1e9,
        "decode_weight_bytes": weight_bytes,
        "decode_floor_tok_s": floor,
    }
    p, d, im = llm["prefill_tok_s"], llm["decode_tok_s"], image["ms"]
    rows = [
        ("prefill tok/s", p["vlstack"], p["transformers"], p["vlstack"] / p["transformers"]),
        ("decode tok/s", d["vlstack"], d["transformers"], d["vlstack"] / d["transformers"]),
        *[("decode tok/s vs compiled", d["vlstack"], d[c], d["vlstack"] / d[c]) for c in d if "compiled" in c],
        ("3840x2160 preprocess ms", im["vlstack"], im["transformers"], im["transformers"] / im["vlstack"]),
    ]
    print(f"device {result['device']}, {result['dtype']}, torch {result['torch']}")
    print(f"{'':28}{'vlstack':>12}{'transformers':>14}{'speed-up':>10}")
    for name, a, b, r in rows:
        print(f"{name:28}{a:12.1f}{b:14.1f}{r:9.2f}x")
    print(
        f"decode floor: {bw / 1e9:.1f} GB/s copy bandwidth / {weight_bytes / 1e9:.2f} GB per token = "
        f"{floor:.1f} tok/s; " + ", ".join(f"{name} reaches {tps / floor:.0%}" for name, tps in d.items())
    )
    print(f"the engine around the step keeps {d['vlstack'] / d['vlstack step alone']:.0%} of the step alone's rate")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
