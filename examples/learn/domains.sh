#!/usr/bin/env bash
# On the chart-trained tiny base (charts.sh), one LoRA adapter per document domain (forms and receipts;
# invoices and tables), both trained at once by the fused trainer, then each domain's held-out set scored by
# the base and by every adapter. One command (after charts.sh): bash examples/learn/domains.sh
set -euo pipefail
cd "$(dirname "$0")"
[ -d runs/tiny-charts ] || bash charts.sh
[ -d runs/forms ] || vlstack synth documents --only form,receipt --questions visual --conversations --n 1500 \
    --size 224 --seed 1 --out runs/forms
[ -d runs/invoices ] || vlstack synth documents --only invoice,table --questions visual --conversations --n 1500 \
    --size 224 --seed 2 --out runs/invoices
vlstack train domains.yaml
for domain in forms invoices; do
    vlstack eval chartqa --data runs/$domain/test.jsonl --model runs/tiny-charts --out runs/eval-$domain \
        --adapter base --adapter forms=runs/adapters/forms --adapter invoices=runs/adapters/invoices \
        --batch 64 --max-new-tokens 8
done
