#!/usr/bin/env bash
# The GPU path proven in one command, sized for a short window on one H100/H200:
#
#     bash scripts/device_check.sh OUT            # on the GPU machine; carry .whl/ (scripts/fetch_device_wheels.sh)
#     bash scripts/device_check.sh --dry-run OUT  # on a CPU: the same steps at tiny sizes
#
# Steps, in order, each under its own time cap and all under one budget (DEVICE_CHECK_BUDGET_S,
# default 510 s on a GPU, so it stops itself before 9 minutes; a step that would overrun is cut
# and the report still written):
#   wheels      install .whl/*.whl into a private folder on PYTHONPATH (skipped in a dry run: the CPU
#               environment has the packages, and a cp312 wheel does not install on another Python)
#   cuda_tests  pytest -m cuda tests/test_cuda.py (a dry run sets DIT_MOE_CUDA_TESTS_ON_CPU=1)
#   train       bench/train.py: DiT-MoE-XL/2 8E2A, 4x32x32 latents, bf16, the largest micro batch that
#               fits (--batch-size auto), eager and compiled, gradient checkpointing off and on, and the
#               reference-style model (bench/reference.py), same engine and batch
#   moe         bench/moe.py: the MoE layer at XL width, grouped vs loop vs the boolean-mask loop
#   sample      bench/sample.py: guided sampling images/s, ours vs the reference-style model, eager and compiled
# then bench/device_report.py writes OUT/device_check.json (every field present, null where a step
# did not deliver) and OUT/summary.txt; OUT/device_check.log holds every step's output.
# PYTHON (default python3) runs everything. Exit status: 0 when every step succeeded.
set -uo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then
    DRY_RUN=1
    shift
fi
if [ $# -ne 1 ]; then
    echo "usage: bash scripts/device_check.sh [--dry-run] OUT" >&2
    exit 2
fi
mkdir -p "$1"
OUT="$(cd "$1" && pwd)"
PYTHON="${PYTHON:-python3}"
START=$(date +%s)
REPORT_S=30 # kept back for the report
if [ "$DRY_RUN" = 1 ]; then
    BUDGET_S="${DEVICE_CHECK_BUDGET_S:-1500}" # a shared CPU is slow; the budget there only guards against hangs
else
    BUDGET_S="${DEVICE_CHECK_BUDGET_S:-510}"
fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
LOG="$OUT/device_check.log"
: >"$LOG"
: >"$WORK/steps.tsv"
export PYTHONUNBUFFERED=1 PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/dit_moe_inductor}" # shared by the compiled runs

# step NAME CAP_S COMMAND...: run COMMAND with at most CAP_S seconds and what is left of the budget.
step() {
    local name="$1" cap="$2"
    shift 2
    local left=$((BUDGET_S - REPORT_S - ($(date +%s) - START)))
    local limit=$((cap < left ? cap : left))
    local began status rc
    began=$(date +%s)
    echo "=== $name (limit ${limit} s): $*" >>"$LOG"
    if [ "$limit" -lt 5 ]; then
        status="skipped: out of time"
    else
        timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
        rc=$?
        case $rc in
        0) status=ok ;;
        124 | 137) status="timed out after ${limit} s" ;;
        *) status="failed (exit $rc)" ;;
        esac
    fi
    printf '%s\t%s\t%s\n' "$name" "$status" "$(($(date +%s) - began))" >>"$WORK/steps.tsv"
    echo "=== $name: $status" | tee -a "$LOG"
}

if [ "$DRY_RUN" = 1 ]; then
    export DS_ACCELERATOR=cpu DIT_MOE_CUDA_TESTS_ON_CPU=1
    printf 'wheels\tskipped: dry run\t0\n' >>"$WORK/steps.tsv"
    TRAIN=(--model DiT-T/2 --num-experts 4 --input-size 8 --precision fp32 --batch-size auto --max-batch-size 4
        --steps 1 --warmup 2 --threads 1)
    MOE=(--device cpu --dtype float32 --widths T --tokens 512 --repeats 1 --threads 1 --gemm-size 256)
    SAMPLE=(--model DiT-T/2 --num-experts 4 --input-size 8 --batch-size 2 --num-steps 2 --repeats 1 --threads 1
        --device cpu --dtype float32 --gemm-size 256)
    TEST_CAP=600 TRAIN_CAP=600 MOE_CAP=120 SAMPLE_CAP=300
    # one compiled setting: each compile takes minutes on a CPU, and the pair runs the same code paths
    SETTINGS=plain,compiled,reference
else
    export DS_ACCELERATOR=cuda
    (cd .whl 2>/dev/null && ls -- *.whl) >"$WORK/wheels.txt"
    step wheels 60 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/dit_moe_site .whl/*.whl
    export PYTHONPATH="/tmp/dit_moe_site:$PYTHONPATH"
    nvidia-smi >>"$LOG" 2>&1
    TRAIN=(--model DiT-XL/2 --num-experts 8 --input-size 32 --precision bf16 --batch-size auto --steps 4 --warmup 2
        --threads 8)
    MOE=(--device cuda --dtype bfloat16 --widths XL --tokens 16384 --repeats 10 --threads 8)
    SAMPLE=(--model DiT-XL/2 --num-experts 8 --input-size 32 --batch-size 32 --num-steps 10 --repeats 2 --threads 8
        --device cuda --dtype bfloat16)
    TEST_CAP=120 TRAIN_CAP=270 MOE_CAP=45 SAMPLE_CAP=120
    SETTINGS=plain,grad-ckpt,compiled,compiled-grad-ckpt,reference
fi

step cuda_tests "$TEST_CAP" "$PYTHON" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider \
    --junitxml "$WORK/cuda_tests.xml"
step train "$TRAIN_CAP" "$PYTHON" bench/train.py "${TRAIN[@]}" --num-experts-per-tok 2 \
    --settings "$SETTINGS" --json "$WORK/train.json"
step moe "$MOE_CAP" "$PYTHON" bench/moe.py "${MOE[@]}" --json "$WORK/moe.json"
step sample "$SAMPLE_CAP" "$PYTHON" bench/sample.py "${SAMPLE[@]}" --json "$WORK/sample.json"

report=(--budget-s "$BUDGET_S" --elapsed-s "$(($(date +%s) - START))")
[ "$DRY_RUN" = 1 ] && report+=(--dry-run)
timeout "$REPORT_S" "$PYTHON" bench/device_report.py "$WORK" "$OUT" "${report[@]}" 2>>"$LOG" || exit 1
if grep -qv -e $'\tok\t' -e $'\tskipped: dry run\t' "$WORK/steps.tsv"; then
    exit 1
fi
