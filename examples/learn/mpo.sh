#!/usr/bin/env bash
# MPO on the model's own answers: preference pairs from the chart-trained tiny base's samples (pairs.sh), an MPO
# adapter trained on them (mpo.yaml), the held-out charts scored by the base and by the adapter.
# One command (after charts.sh): bash examples/learn/mpo.sh
set -euo pipefail
cd "$(dirname "$0")"
bash pairs.sh
vlstack train mpo.yaml
vlstack eval chartqa --data runs/charts/test.jsonl --model runs/tiny-charts --out runs/eval-mpo \
    --adapter base --adapter mpo=runs/adapters/mpo --batch 64 --max-new-tokens 8
cat runs/eval-mpo/summary.md
