#!/usr/bin/env bash
# The GPU set in one go, meant for under 8 minutes on one H100 (DESIGN.md, "Performance method"): the CUDA
# tests, then each GPU benchmark printing its table (JSON under bench/results/). The device machine lacks the
# server's packages: carry their wheels or put them on PYTHONPATH (README). `bench/gpu.sh --dry` runs every
# step on the CPU at toy sizes: it proves the script before a GPU's minutes go into it; its figures mean nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p bench/results

step() {  # a heading, the command, and how long it took
    echo "=== $1"
    shift
    local start=$SECONDS
    "$@"
    echo "=== $((SECONDS - start)) s"
}

if [ "${1:-}" = "--dry" ]; then
    step "tests (cpu)" python -m pytest -q -x tests/test_engine.py -k "concurrent or failing or static or chunks"
    step "foundation (cpu, toy)" python bench/foundation.py --device cpu --prompt-len 16 --new-tokens 4 --repeat 1 \
        --compiled --out bench/results/foundation_dry.json
    step "serving (cpu, tiny)" python bench/serve.py --model tiny --device cpu --requests 4 --rate 0 --max-tokens 8 \
        --baseline-requests 2 --adapter-cost --out bench/results/serve_dry.json
    step "training (cpu, tiny)" python bench/multi_lora_train.py --model tiny --device cpu --steps 2 --examples 8 \
        --out bench/results/train_dry.json
    exit 0
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
step "CUDA tests: parity (fp32 and bf16), adapters, engine" env VLSTACK_TEST_DEVICE=cuda \
    python -m pytest -q -x tests/test_parity.py tests/test_lora.py tests/test_engine.py
step "decode, batch 1, InternVL3-1B shapes, bf16: vs transformers eager and compiled" \
    python bench/foundation.py --device cuda --prompt-len 512 --new-tokens 64 --repeat 3
step "serving: 128 requests at once, 4 adapters, 128 tokens (baseline: the first 8, one at a time)" \
    python bench/serve.py --model internvl3-1b --device cuda --requests 128 --rate 0 --max-tokens 128 \
    --max-batch 128 --max-model-len 2048 --baseline-requests 8 --adapter-cost
step "serving at 8 requests/s (TTFT), 4 adapters, 128 tokens" \
    python bench/serve.py --model internvl3-1b --device cuda --requests 64 --rate 8 --max-tokens 128 \
    --max-batch 128 --max-model-len 2048 --baseline-requests 4 --out bench/results/serve_rate8.json
step "training: 4 adapters fused vs peft one after another, InternVL3-1B shapes" \
    python bench/multi_lora_train.py --model internvl3-1b --device cuda --steps 10 --batch 4
