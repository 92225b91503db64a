#!/usr/bin/env bash
# DiT-MoE-S/2 8E2A with the IDDPM objective (DiT's), 256x256 latents; one node by default.
#
#   FEATURES_PATH=/data/imagenet256_latents VAE_PATH=/models/sd-vae-ft-mse bash scripts/train_s.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/presets.sh"
train_preset --model DiT-S/2 --num_experts 8 --num_experts_per_tok 2 \
    --deepspeed_config config/zero2.json --global-batch-size 256 "$@"
