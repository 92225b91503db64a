#!/usr/bin/env bash
# DiT-MoE-B/2 8E2A, rectified flow, 256x256 latents.
#
#   FEATURES_PATH=/data/imagenet256_latents VAE_PATH=/models/sd-vae-ft-mse bash scripts/train_b.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/presets.sh"
train_preset --model DiT-B/2 --num_experts 8 --num_experts_per_tok 2 \
    --rf True --deepspeed_config config/zero2.json --global-batch-size 1024 "$@"
