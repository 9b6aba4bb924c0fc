"""`vlstack compress`: prune -> distil -> quantise (P-KD-Q), one file per stage, each also usable alone.

The stages come from a YAML file, in the order they run:

    stages:
      - prune: {mlp: 0.5, heads: 0.5, hidden: 0.75, layers: 20, data: calib.jsonl, samples: 32}
      - distill: {data: train.jsonl, steps: 500, batch_size: 8, lr: 1.0e-4, temperature: 1.0}  # full: false: LoRA
      - quantize: {bits: 8}              # or bits: 4, group_size: 128; kernel: fast (the device's quantised kernel)
    report: {benchmark: chartqa, data: test.jsonl, limit: 200}   # optional: a score after each stage

After the input and each stage the report (report.py) measures the weights' bytes, the parameters, batch-1
decode tokens/s and with an eval set the score: `compress.md`, `compress.json`, `compress.png` in the output.

Every stage's options are checked before any work, and the output is written to a temporary directory beside
the destination and renamed into place at the end: a run that fails leaves no half-written output.
"""

from __future__ import annotations

import shutil
import sys
import time
from dataclasses import fields
from pathlib import Path

from ..errors import ConfigError
from ..files import new_directory, read_yaml
from ..layers.quant import QuantConfig
from ..layers.quant import targets as quant_targets
from .distill import DistillConfig, distill
from .prune import PruneConfig, calibration, importance, prune, pruned_width
from .quantize import quantize_model
from .report import ReportConfig, measure, write_report

STAGES = {"prune": PruneConfig, "distill": DistillConfig, "quantize": QuantConfig}  # in the order they run


def say(line: str) -> None:
    """A progress line on stderr (stdout gets the report)."""
    print(f"compress: {line}", file=sys.stderr, flush=True)


def measured(vlm, stage: str, report: ReportConfig | None) -> dict:
    """measure(), said before and after (a score over an eval set takes a while)."""
    started = time.perf_counter()
    say(
        f"measuring the {'input' if stage == 'input' else 'model after ' + stage}"
        + (f" (and its score on {report.data})" if report is not None and report.data else "")
    )
    row = measure(vlm, stage, report)
    score = f", score {row['score']:.1f}" if "score" in row else ""
    seconds = time.perf_counter() - started
    say(f"{row['parameters']:,} parameters, {row['bytes'] / 2**20:.1f} MiB{score} ({seconds:.1f} s)")
    return row


def read_stages(path: str | Path) -> list[tuple[str, object]]:
    """The compress file -> [(stage, its checked options)], in order; a clear error for anything wrong."""
    raw = read_yaml(path, "compress config")
    stages = raw.get("stages") if isinstance(raw, dict) else None
    if not isinstance(stages, list) or not stages:
        raise ConfigError(f"{path}: expected 'stages:', a list of stages ({', '.join(STAGES)})")
    out: list[tuple[str, object]] = []
    for i, entry in enumerate(stages, 1):
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ConfigError(f"{path}: stage {i} must be one name with its options, e.g. '- quantize: {{bits: 8}}'")
        ((name, options),) = entry.items()
        if name not in STAGES:
            raise ConfigError(f"{path}: unknown stage {name!r} (stages: {', '.join(STAGES)})")
        options = options or {}
        if not isinstance(options, dict):
            raise ConfigError(f"{path}: stage {i} ({name}) takes a mapping of options, e.g. '- quantize: {{bits: 8}}'")
        known = {f.name for f in fields(STAGES[name])}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"{path}: stage {i} ({name}): unknown options {unknown} (known: {sorted(known)})")
        out.append((name, STAGES[name](**options).check()))
    if [n for n, _ in out] != sorted((n for n, _ in out), key=list(STAGES).index):
        raise ConfigError(f"{path}: stages run in the order {' -> '.join(STAGES)}")
    unknown = sorted(set(raw) - {"stages", "report"})
    if unknown:
        raise ConfigError(f"{path}: unknown top-level fields {unknown} (stages, report)")
    return out


def read_report(path: str | Path) -> ReportConfig:
    """The compress file's report section (a default one without: bytes, parameters and decode, no score)."""
    raw = (read_yaml(path, "compress config") or {}).get("report") or {}
    known = {f.name for f in fields(ReportConfig)}
    if not isinstance(raw, dict) or set(raw) - known:
        raise ConfigError(f"{path}: report takes {sorted(known)}")
    return ReportConfig(**raw).check()


def compress(
    vlm, stages: list[tuple[str, object]], output: str | Path, resume: bool = False, report: ReportConfig | None = None
) -> Path:
    """Run the stages on vlm (its model changed in place) and write the result to output, a new directory, with
    the report of each stage (report: what it measures; None: bytes and parameters only). A distillation's work
    (checkpoints, metrics) stays in `<output>.distill*` until the end: resume continues it."""
    output = Path(output)
    if output.exists():
        raise ConfigError(f"{output} exists; compress writes a new directory")
    names = [name for name, _ in stages]
    width = None  # a layer's inputs after the pruning (if any)
    for name, options in stages:  # what the model or the device cannot meet, before any work
        if name == "prune":
            width = pruned_width(vlm.cfg.text, options.targets(vlm.cfg.text))
        if name == "quantize":
            options.check_device(vlm.model.device)
            quant_targets(vlm.model, options, width)
        if name == "distill" and options.teacher is None and "prune" not in names:
            raise ConfigError("distill needs a teacher: a prune stage before it (the unpruned model), or teacher: DIR")
    work = output.with_name(output.name + ".distill")
    works = (work, work.with_name(work.name + ".train")) if "distill" in names else ()  # (removed at the end)
    for w in works if not resume else ():
        if w.exists():
            raise ConfigError(
                f"{w} exists and compress did not make it in this run: remove it, or pass --resume to "
                "continue the distillation it holds"
            )
    teacher, rows = None, [measured(vlm, "input", report)]
    for k, (name, options) in enumerate(stages, 1):
        started = time.perf_counter()
        say(f"stage {k}/{len(stages)}: {name}" + ("" if name != "distill" else f" ({options.steps} steps)"))
        if name == "prune":
            teacher = vlm.model  # (pruning builds a new model: this one stays as it was)
            prune(vlm, options, importance(vlm, calibration(vlm, options)))
        elif name == "distill":
            distill(vlm, options, options.teacher or teacher, work, resume)
        elif name == "quantize":
            examples = calibration(vlm, options) if options.awq else None
            layers = quantize_model(vlm.model, options, examples)
            vlm.cfg.quantization = options.to_json()
            say(f"{len(layers)} linear layers to int{options.bits}")
        say(f"stage {k}/{len(stages)}: {name} done in {time.perf_counter() - started:.1f} s")
        rows.append(measured(vlm, name, report))
    with new_directory(output) as tmp:
        vlm.save(tmp)
        write_report(rows, tmp)
        curve = work.with_name(work.name + ".train") / "loss.png"
        if works and curve.is_file():
            shutil.copyfile(curve, tmp / "distill-loss.png")
    for done in works:
        shutil.rmtree(done, ignore_errors=True)
    return output
