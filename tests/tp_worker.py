"""What tests/test_tp.py runs on each rank under torchrun (`python -m torch.distributed.run ... tp_worker.py ROOT
TP OUT`), and in its own process with tp=1 for the reference: for every checkpoint under ROOT, with its two
adapters (one on the LLM, one on the vision tower, projector and LLM), the logits of a batch mixing them and the
base (the stacked LoRA path, as the server's steps) and of each adapter alone (the per-segment path), then
greedy tokens from the engine (dynamic and static decode steps) with a mix of adapters, and again after an
adapter is hot-loaded into the running engine. Each rank writes what it got to OUT/rank<r>.pt."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch


def run(root: Path, tp: int) -> dict:
    from conftest import greedy_ids, image

    import vlstack
    from vlstack.chat import question_messages
    from vlstack.layers.lora import route
    from vlstack.layers.step import packed_step

    out = {}
    for d in sorted(p for p in root.iterdir() if (p / "base").is_dir()):
        vlm = vlstack.load(d / "base", tp=tp)
        vlm.load_adapter("text", d / "text")
        vlm.load_adapter("vision", d / "vision")
        questions = ["What does the chart show?", "Which bar is the tallest?", "Describe it."]
        encoded = [vlm.processor(question_messages(q, 1), [image(60 + 40 * i, 60, i)]) for i, q in enumerate(questions)]
        ids = encoded[0]["input_ids"]  # [1, T]
        mixed = ["text", None, "vision"]
        with torch.inference_mode():
            t = ids.shape[1]
            batch = ids.repeat(3, 1).flatten()
            pixels = torch.cat([encoded[0]["pixel_values"]] * 3)
            step = packed_step([t] * 3, vlm.model.device)
            step.lora = route(vlm.model, mixed, counts=[t] * 3)  # every adapter at once (the stacks)
            logits = vlm.model(batch, step, pixels).view(3, t, -1)
            alone = torch.stack([vlm(ids, encoded[0]["pixel_values"], adapter=a)[0] for a in mixed])  # per segment
        result = {"mixed": logits, "alone": alone}
        for static in (False, True):
            engine = vlm.engine(4, max_len=256, image_cache_mb=0, background=False, static=static)
            result[f"greedy_static{static}"] = greedy_ids(vlm, encoded, 6, mixed, engine)
            if static:  # a hot-load into the running engine, then a batch using it beside the others
                vlm.load_adapter("late", d / "late")
                engine.adapter_changed("late")
                result["greedy_late"] = greedy_ids(vlm, encoded, 6, ["late", "text", None], engine)
        out[d.name] = result
    return out


if __name__ == "__main__":
    root, tp, dest = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    got = run(root, tp)
    torch.save(got, dest / f"rank{os.environ.get('RANK', '0')}.pt")
