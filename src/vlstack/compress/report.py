"""The compression report: after the input and after each stage, the bytes the weights take, the parameters,
batch-1 decode tokens/s and (with an eval set) the score, written beside the compressed checkpoint as
`compress.json`, `compress.md` and `compress.png`.

In the compress file:

    report: {benchmark: chartqa, data: test.jsonl, limit: 200}   # optional: a score per stage (vlstack eval)
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import check_fields
from ..errors import ConfigError


@dataclass
class ReportConfig:
    benchmark: str = "vqa"
    data: str | None = None  # an eval set (vlstack eval's formats); None: no score
    limit: int | None = 200
    metric: str | None = None
    new_tokens: int = 16  # decode tokens timed per stage

    def check(self) -> ReportConfig:
        check_fields(self, "report")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"report limit must be >= 1 (got {self.limit})")
        if self.data is not None and not Path(self.data).is_file():
            raise ConfigError(f"report data {self.data} is not a file")
        if self.new_tokens < 2:
            raise ConfigError("report new_tokens must be >= 2")
        return self


def weight_bytes(model: nn.Module, float_width: int | None = None) -> int:
    """The bytes of the model's weights as stored (a tensor tied to another counted once); float_width: count the
    floating-point tensors at that many bytes each (a bf16 checkpoint of a float32 model)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * (float_width if float_width and t.is_floating_point() else t.element_size())
    return total


def parameters(model: nn.Module) -> int:
    """The number of weights, a quantised layer's counted as the matrix it stands for (tied ones once)."""
    seen, total = set(), 0
    for module in model.modules():
        quant = getattr(module, "quant", None)
        if quant is not None:
            total += module.in_features * module.out_features + (0 if module.bias is None else module.out_features)
            seen.update(t.data_ptr() for t in module.parameters(recurse=False))
            continue
        for p in module.parameters(recurse=False):
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel()
    return total


def decode_tok_s(vlm, new_tokens: int, repeat: int = 3, prompt_len: int = 64) -> float:
    """Batch-1 greedy decode tokens/s after a random text prompt (the engine's steps, EOS ignored)."""
    from ..sampling import SamplingParams

    vocab = min(vlm.cfg.text.vocab_size, 150_000)
    ids = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    engine = vlm.engine(1, max_len=prompt_len + new_tokens, image_cache_mb=0, background=False)
    eos, vlm.eos = vlm.eos, set()

    def run() -> float:
        req = engine.submit({"input_ids": ids}, None, SamplingParams(max_new_tokens=new_tokens))
        engine.step()  # the prefill and its token: the clock starts after it
        start = time.perf_counter()
        while engine.running or not engine.waiting.empty():
            engine.step()
        if vlm.model.device.type == "cuda":
            torch.cuda.synchronize()
        return (req.generated - 1) / (time.perf_counter() - start)

    try:
        run()  # warm-up
        return statistics.median(run() for _ in range(repeat))
    finally:
        vlm.eos = eos
        engine.close()


def measure(vlm, stage: str, cfg: ReportConfig | None) -> dict:
    """The model now: its bytes and parameters; with cfg its decode speed and (cfg.data) its score."""
    row = {"stage": stage, "bytes": weight_bytes(vlm.model), "parameters": parameters(vlm.model)}
    if cfg is not None:
        row["decode_tok_s"] = decode_tok_s(vlm, cfg.new_tokens)
        if cfg.data is not None:
            from ..eval.runner import evaluate

            with tempfile.TemporaryDirectory() as tmp:
                summary = evaluate(
                    vlm,
                    cfg.benchmark,
                    cfg.data,
                    tmp,
                    metric=cfg.metric,
                    limit=cfg.limit,
                    max_new_tokens=32,
                    progress=False,
                )
            row["score"] = summary["score"]
    return row


def write_report(rows: list[dict], directory: Path) -> None:
    """compress.json, compress.md (a table) and compress.png (each stage's bytes against the input's) in
    directory (the compressed checkpoint's, before it is renamed into place)."""
    from ..eval.plot import bar_chart

    first = rows[0]
    for row in rows:
        row["bytes_of_input"] = row["bytes"] / first["bytes"]
        if "decode_tok_s" in row:
            row["decode_vs_input"] = row["decode_tok_s"] / first["decode_tok_s"]
        if "score" in row and first.get("score"):
            row["score_of_input"] = row["score"] / first["score"]
    (directory / "compress.json").write_text(json.dumps(rows, indent=2))
    lines = ["| after | bytes | of input | parameters | decode tok/s | score |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        speed = f"{r['decode_tok_s']:.1f} ({r['decode_vs_input']:.2f}x)" if "decode_tok_s" in r else "-"
        score = f"{r['score']:.1f}" if "score" in r else "-"
        lines.append(
            f"| {r['stage']} | {r['bytes'] / 2**20:,.1f} MB | {100 * r['bytes_of_input']:.1f}% | "
            f"{r['parameters']:,} | {speed} | {score} |"
        )
    (directory / "compress.md").write_text("\n".join(lines) + "\n")
    bars = [(r["stage"], 100 * r["bytes_of_input"], _note(r)) for r in rows]
    bar_chart("weight bytes, % of the input's", bars, directory / "compress.png")


def _note(r: dict) -> str:
    parts = [f"{100 * r['bytes_of_input']:.0f}%"]
    if "decode_vs_input" in r:
        parts.append(f"{r['decode_vs_input']:.2f}x decode")
    if "score" in r:
        parts.append(f"score {r['score']:.1f}")
    return ", ".join(parts)
