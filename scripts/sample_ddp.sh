#!/usr/bin/env bash
# Sample NUM_SAMPLES images for FID on N GPUs (one process per GPU; sample i has seed SEED + i,
# so the result does not depend on N). Re-running the same command resumes: existing PNGs are
# kept. Writes OUT/000000.png ... and OUT.npz (ADM format). Extra arguments after `--` go to
# `python -m dit_moe.sampling.many` (e.g. --sampler heun --num-sampling-steps 50 --cfg-channels 3).
set -euo pipefail

usage() {
    cat <<USAGE
Usage: $0 CKPT OUT [NUM_GPUS] [NUM_SAMPLES] [-- extra dit_moe.sampling.many args]
   or: CKPT=... OUT=... [NUM_GPUS=8] [NUM_SAMPLES=50000] [VAE_PATH=none] [CFG_SCALE=1.5] [BATCH_SIZE=32] [SEED=0] $0

  CKPT         checkpoint file or DeepSpeed checkpoint folder
  OUT          sample folder; the .npz is written next to it as OUT.npz
  NUM_GPUS     processes to launch with torchrun (default 8; on a CPU-only machine they use gloo)
  NUM_SAMPLES  images to draw (default 50000)
USAGE
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then usage; exit 0; fi
POSITIONAL=()
while [[ $# -gt 0 && "$1" != "--" ]]; do POSITIONAL+=("$1"); shift; done
if [[ "${1:-}" == "--" ]]; then shift; fi
CKPT="${POSITIONAL[0]:-${CKPT:-}}"
OUT="${POSITIONAL[1]:-${OUT:-}}"
NUM_GPUS="${POSITIONAL[2]:-${NUM_GPUS:-8}}"
NUM_SAMPLES="${POSITIONAL[3]:-${NUM_SAMPLES:-50000}}"
if [[ -z "$CKPT" || -z "$OUT" ]]; then usage >&2; exit 2; fi

exec torchrun --standalone --nproc_per_node "$NUM_GPUS" -m dit_moe.sampling.many \
    --ckpt "$CKPT" --out "$OUT" --num-samples "$NUM_SAMPLES" --vae-path "${VAE_PATH:-none}" \
    --cfg-scale "${CFG_SCALE:-1.5}" --batch-size "${BATCH_SIZE:-32}" --seed "${SEED:-0}" "$@"
