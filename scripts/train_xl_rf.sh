#!/usr/bin/env bash
# DiT-MoE-XL/2 8E2A, rectified flow, 256x256 ImageNet latents, as DiT-MoE trains it.
#
#   FEATURES_PATH=/data/imagenet256_latents VAE_PATH=/models/sd-vae-ft-mse \
#   HOSTFILE=scripts/hostfile.example bash scripts/train_xl_rf.sh [more train_deepspeed.py flags]
#
# FEATURES_PATH: shards from scripts/extract_features.sh (or a fast-DiT .npy folder); without it,
# DATA_PATH (an ImageNet-style image folder) is encoded on the fly with the VAE.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/presets.sh"
train_preset --model DiT-XL/2 --num_experts 8 --num_experts_per_tok 2 --qk-norm True \
    --rf True --deepspeed_config config/zero2.json --global-batch-size 1024 "$@"
