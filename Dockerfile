# CUDA image with torch, DeepSpeed, flash-attn and dit-moe.
#   docker build -t dit-moe .
#   docker run --gpus all --ipc=host -v /data:/data dit-moe \
#       deepspeed train_deepspeed.py --deepspeed_config config/zero2.json --model DiT-S/2 ...
# The base image pins torch and CUDA; torch >= 2.8 has torch._grouped_mm for the MoE grouped GEMM.
ARG BASE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-devel
FROM ${BASE}

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 MAX_JOBS=8
RUN apt-get update && apt-get install -y --no-install-recommends git openssh-client pdsh ninja-build \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace/dit-moe
COPY pyproject.toml README.md ./
COPY dit_moe ./dit_moe
# deepspeed and flash-attn build against the image's torch, so no build isolation.
RUN pip install --no-build-isolation "deepspeed==0.19.8" \
    && pip install --no-build-isolation "flash-attn==2.8.3" \
    && pip install --no-build-isolation -e ".[gpu,test]"
COPY . .
