#!/usr/bin/env bash
# The tiny architecture (a few million parameters) trained from scratch on synthetic charts, then scored on
# charts of templates it never saw, question kind by kind and template by template. One command, 22-29
# minutes on 2 CPU cores (BENCHMARKS.md):
#   bash examples/learn/charts.sh
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p runs
[ -d runs/charts ] || vlstack synth charts --n 3000 --size 224 --questions visual --conversations --decorate \
    --seed 0 --out runs/charts
vlstack train charts.yaml
vlstack eval chartqa --data runs/charts/test.jsonl --model runs/tiny-charts --out runs/eval-charts --batch 64 \
    --max-new-tokens 8
cat runs/eval-charts/summary.md
