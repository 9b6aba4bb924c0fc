#!/usr/bin/env bash
# The GPU set, about 13 minutes on one H100 (DESIGN.md, "Performance method"): the CUDA tests, then each GPU
# benchmark printing its table (JSON under bench/results/). One device call runs at most 10 minutes, so the set
# goes in two (GPU_STEPS, below): GPU_STEPS='CUDA|decode|training' (~5 min), then 'serving|compression' (~8 min).
# (GPU_STEPS matches words of the headings: '8 requests' matches the 128-request step too, 'requests/s' only the
# rate's.)
# The device machine lacks the server's packages: carry their wheels or put them on PYTHONPATH (README).
# `bench/gpu.sh --dry` runs every step on the CPU at toy sizes: it proves the script before a GPU's minutes go
# into it; its figures mean nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p bench/results

# Each step runs under its own time limit, cut to what is left of GPU_SECONDS (default 600) for the whole set,
# and a failing step does not stop the next: one call of the lent GPU reports on every step. The log and the
# results go to $OUT too when it is set (the device tool's folder). GPU_STEPS, a regular expression, runs only the
# steps whose headings it matches (a rerun of what failed).
deadline=$((SECONDS + ${GPU_SECONDS:-600}))
failed=()
step() {  # step SECONDS HEADING COMMAND...: the heading, the command under its limit, how long it took
    local limit=$1 heading=$2
    shift 2
    if [[ ! "$heading" =~ ${GPU_STEPS:-.} ]]; then echo "=== not asked (GPU_STEPS): $heading"; return; fi
    local left=$((deadline - SECONDS))
    if [ "$left" -lt 20 ]; then echo "=== skipped (time): $heading"; failed+=("$heading (skipped)"); return; fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "=== $heading (limit ${limit} s)"
    local start=$SECONDS
    if ! timeout -k 10 "$limit" "$@"; then failed+=("$heading"); echo "=== FAILED: $heading"; fi
    echo "=== $((SECONDS - start)) s"
}
finish() {  # the summary line, and the results beside the log
    [ -n "${OUT:-}" ] && mkdir -p "$OUT/results" && cp bench/results/*.json "$OUT/results/" 2>/dev/null || true
    if [ "${#failed[@]}" -gt 0 ]; then printf '=== failed: %s\n' "${failed[@]}"; exit 1; fi
    echo "=== all steps passed"
}

if [ "${1:-}" = "--dry" ]; then
    step 300 "tests (cpu)" python -m pytest -q -x tests/test_engine.py -k "concurrent or failing or static or chunks"
    step 300 "foundation (cpu, toy)" python bench/foundation.py --device cpu --prompt-len 16 --new-tokens 4 --repeat 1 \
        --compiled --out bench/results/foundation_dry.json
    step 300 "serving (cpu, tiny)" python bench/serve.py --model tiny --device cpu --requests 4 --rate 0 --max-tokens 8 \
        --baseline-requests 2 --adapter-cost --out bench/results/serve_dry.json
    step 300 "training (cpu, tiny)" python bench/multi_lora_train.py --model tiny --device cpu --steps 2 --examples 8 \
        --out bench/results/train_dry.json
    step 120 "tensor parallelism (cpu, tiny, gloo)" python bench/tp.py --model tiny --device cpu --tp 2 --steps 4 \
        --out bench/results/tp_dry.json
    finish
    exit 0
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
step 70 "CUDA tests: parity (fp32 and bf16), adapters, engine" env VLSTACK_TEST_DEVICE=cuda \
    python -m pytest -q -p no:cacheprovider --timeout 60 tests/test_parity.py tests/test_lora.py tests/test_engine.py
step 90 "decode, batch 1, InternVL3-1B shapes, bf16: vs transformers eager and compiled" \
    python bench/foundation.py --device cuda --prompt-len 512 --new-tokens 64 --repeat 3
step 140 "training: 4 adapters fused vs peft one after another, InternVL3-1B shapes" \
    python bench/multi_lora_train.py --model internvl3-1b --device cuda --steps 10 --batch 4
step 240 "serving: 128 requests at once, 4 adapters, 128 tokens (baseline: the first 4, one at a time)" \
    python bench/serve.py --model internvl3-1b --device cuda --requests 128 --rate 0 --max-tokens 128 \
    --max-batch 128 --max-model-len 4096 --baseline-requests 4
step 170 "serving at 8 requests/s (TTFT), 4 adapters, 128 tokens" \
    python bench/serve.py --model internvl3-1b --device cuda --requests 64 --rate 8 --max-tokens 128 \
    --max-batch 128 --max-model-len 4096 --baseline-requests 4 --out bench/results/serve_rate8.json
step 90 "compression: bytes and decode (int8 weight-only kernel) vs bf16, InternVL3-1B shapes" \
    python bench/compress.py --device cuda --prompt-len 128 --new-tokens 64 --repeat 3
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then  # (several GPUs: tensor parallelism)
    step 150 "TP-2 decode step vs TP-1, InternVL3-1B shapes, and its collectives (NCCL)" \
        python bench/tp.py --model internvl3-1b --device cuda --tp 2 --batch 1 --batch 32
    step 150 "pipelined training, 2 stages, 1 and 4 jobs: each stage's idle share vs GPipe's bubble" \
        python bench/pipeline.py --model internvl3-1b --stages 2 --jobs 1 --jobs 4 --steps 6
    step 200 "TP-2 serving: 128 requests at once, 4 adapters, 128 tokens" \
        python bench/serve.py --model internvl3-1b --device cuda --requests 128 --rate 0 --max-tokens 128 \
        --max-batch 128 --max-model-len 4096 --baseline-requests 2 --tp 2 --out bench/results/serve_tp2.json
else
    echo "=== TP-2: one GPU here, not measured (bench/tp.py --device cpu measures the collectives with gloo)"
fi
finish
