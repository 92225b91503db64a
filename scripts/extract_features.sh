#!/usr/bin/env bash
# Encode an image folder into webdataset latent shards on N GPUs (one process per GPU;
# shard i is encoded by rank i % N). Re-running the same command resumes: finished shards
# are kept. Extra arguments after the positional ones go to `python -m dit_moe.data.extract`.
set -euo pipefail

usage() {
    cat <<USAGE
Usage: $0 DATA_PATH VAE_PATH FEATURES_PATH [NUM_GPUS] [IMAGE_SIZE] [-- extra extract args]
   or: DATA_PATH=... VAE_PATH=... FEATURES_PATH=... [NUM_GPUS=8] [IMAGE_SIZE=256] [SHARD_SIZE=1000] [BATCH_SIZE=32] $0

  DATA_PATH      image folder, one sub-folder per class (e.g. ImageNet train/)
  VAE_PATH       local diffusers AutoencoderKL folder (e.g. sd-vae-ft-mse/), or "none" for pixels
  FEATURES_PATH  output folder for shard-*.tar and manifest.json
  NUM_GPUS       processes to launch with torchrun (default 8)
  IMAGE_SIZE     centre-crop size in pixels (default 256)
USAGE
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then usage; exit 0; fi
POSITIONAL=()
while [[ $# -gt 0 && "$1" != "--" ]]; do POSITIONAL+=("$1"); shift; done
if [[ "${1:-}" == "--" ]]; then shift; fi
DATA_PATH="${POSITIONAL[0]:-${DATA_PATH:-}}"
VAE_PATH="${POSITIONAL[1]:-${VAE_PATH:-}}"
FEATURES_PATH="${POSITIONAL[2]:-${FEATURES_PATH:-}}"
NUM_GPUS="${POSITIONAL[3]:-${NUM_GPUS:-8}}"
IMAGE_SIZE="${POSITIONAL[4]:-${IMAGE_SIZE:-256}}"
if [[ -z "$DATA_PATH" || -z "$VAE_PATH" || -z "$FEATURES_PATH" ]]; then usage >&2; exit 2; fi

exec torchrun --standalone --nproc_per_node "$NUM_GPUS" -m dit_moe.data.extract \
    --data-path "$DATA_PATH" --vae-path "$VAE_PATH" --features-path "$FEATURES_PATH" \
    --image-size "$IMAGE_SIZE" --shard-size "${SHARD_SIZE:-1000}" --batch-size "${BATCH_SIZE:-32}" \
    --num-workers "${NUM_WORKERS:-4}" "$@"
