#!/usr/bin/env bash
# The chart-trained tiny base's own answers as training data (mpo.sh and best_of.sh): 600 new charts drawn from
# the test set's templates (another seed: none of its images; as a benchmark's training split is to its test
# split), 8 answers sampled to each of their questions, each judged by ChartQA's rule: a question's right and
# wrong answers paired (preferences.jsonl, for MPO), every judged answer an outcome label (critic.jsonl, for a
# critic). One command (after charts.sh): bash examples/learn/pairs.sh
set -euo pipefail
cd "$(dirname "$0")"
[ -d runs/tiny-charts ] || bash charts.sh
[ -d runs/pool ] || vlstack synth charts --n 600 --size 224 --questions visual --test-fraction 0.99 --seed 1 \
    --out runs/pool
[ -d runs/preferences ] || vlstack synth preferences --model runs/tiny-charts --data runs/pool/test.jsonl \
    --bench chartqa --samples 8 --temperature 1.0 --max-new-tokens 8 --batch 64 --out runs/preferences
