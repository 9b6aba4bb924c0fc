#!/usr/bin/env bash
# Best-of-8 with a critic the model trained on its own judged answers (pairs.sh, critic.yaml): the held-out
# charts answered greedily, then by 8 samples each and the critic's pick.
# One command (after charts.sh): bash examples/learn/best_of.sh
set -euo pipefail
cd "$(dirname "$0")"
bash pairs.sh
vlstack train critic.yaml
[ -d runs/eval-charts ] || vlstack eval chartqa --data runs/charts/test.jsonl --model runs/tiny-charts \
    --out runs/eval-charts --batch 64 --max-new-tokens 8
vlstack eval chartqa --data runs/charts/test.jsonl --model runs/tiny-charts --out runs/eval-best-of-8 \
    --best-of 8 --critic runs/adapters/critic --temperature 1.0 --batch 64 --max-new-tokens 8
cat runs/eval-charts/summary.md runs/eval-best-of-8/summary.md
