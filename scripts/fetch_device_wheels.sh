#!/usr/bin/env bash
# Fetch, on a machine with network, exactly the wheels that scripts/device_check.sh installs on a bare
# GPU machine without one (python3.12, torch with CUDA, triton, safetensors, einops, matplotlib,
# scikit-learn, tensorboard, timm, torchvision, huggingface-hub, pytest already there; no deepspeed,
# diffusers, webdataset or their own needs). Writes them into .whl/ (git-ignored), fresh each time so
# that one version of each is there, and fails if they exceed 60 MiB.
#
#     PYTHON=.venv/bin/python bash scripts/fetch_device_wheels.sh
#
# PYTHON needs pip, setuptools and torch: deepspeed is published as a source archive only, so its
# pure-Python wheel is built here without its CUDA ops (DS_BUILD_OPS=0; the trainer hands DeepSpeed
# torch's AdamW and needs none of them). The versions are the ones the test suite runs with.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
PYTHON="${PYTHON:-python3}"
LIMIT_MIB=60
WHEELS=(
    diffusers==0.42.1
    importlib_metadata==10.2.0 # diffusers
    lazy-importer==0.1.0       # importlib_metadata
    zipp==4.1.2                # importlib_metadata
    webdataset==1.0.2
    braceexpand==0.1.7 # webdataset
    hjson==3.1.0       # deepspeed
    pydantic==2.14.4   # deepspeed
    pydantic_core==2.50.5
    annotated-types==0.8.0
    typing-inspection==0.4.5
    typing_extensions==4.16.0 # pydantic needs >= 4.16
)
DEEPSPEED=deepspeed==0.19.8
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

rm -rf .whl
mkdir -p .whl
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]/#/--platform=}" -d .whl "${WHEELS[@]}"
sdist="$(mktemp -d)"
trap 'rm -rf "$sdist"' EXIT
"$PYTHON" -m pip download --quiet --no-deps --no-binary=:all: -d "$sdist" "$DEEPSPEED"
DS_BUILD_OPS=0 "$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation -w .whl "$sdist"/deepspeed-*.tar.gz

count="$(ls .whl/*.whl | wc -l)"
if [ "$count" -ne $((${#WHEELS[@]} + 1)) ]; then
    echo "expected $((${#WHEELS[@]} + 1)) wheels in .whl/, found $count; remove extra versions." >&2
    exit 1
fi
total_kib="$(du -sk .whl | cut -f1)"
ls -l .whl
echo "${count} wheels, $((total_kib / 1024)) MiB in .whl/ (limit ${LIMIT_MIB} MiB)"
if [ "$total_kib" -gt $((LIMIT_MIB * 1024)) ]; then
    echo ".whl/ holds ${total_kib} KiB, over the ${LIMIT_MIB} MiB that may travel to the GPU machine." >&2
    exit 1
fi
