#!/usr/bin/env bash
# DiT-MoE-G/2 16E2A (16.5B parameters), rectified flow, 512x512 latents: ZeRO-3 with MoE leaf modules.
#
#   FEATURES_PATH=/data/imagenet512_latents VAE_PATH=/models/sd-vae-ft-mse IMAGE_SIZE=512 \
#   HOSTFILE=scripts/hostfile.example bash scripts/train_g_rf.sh [more flags]
set -euo pipefail
IMAGE_SIZE="${IMAGE_SIZE:-512}"
source "$(dirname "${BASH_SOURCE[0]}")/presets.sh"
train_preset --model DiT-G/2 --num_experts 16 --num_experts_per_tok 2 --qk-norm True \
    --rf True --deepspeed_config config/zero3.json --grad-checkpointing True --global-batch-size 1024 "$@"
