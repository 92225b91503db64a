# Sourced by quickstart.sh and test.sh: create .venv in the repo root and install what is missing.
# On a machine without a GPU, torch is pinned to the CPU build 2.13.0. With a GPU the venv sees the
# system's packages, so a CUDA torch already installed (e.g. in the Docker image) is kept rather
# than downloaded again. deepspeed builds against the installed torch (--no-build-isolation).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        "$PYTHON" -m venv --system-site-packages .venv
    else
        "$PYTHON" -m venv .venv
    fi
fi
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=".venv/.stamp-$(cat pyproject.toml | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    if ! python -c "import torch" 2>/dev/null; then
        if command -v nvidia-smi >/dev/null 2>&1; then
            pip install torch
        else
            pip install torch==2.13.0
        fi
    fi
    pip install setuptools wheel
    pip install --no-build-isolation -e ".[test]"
    touch "$stamp"
fi
if ! command -v nvidia-smi >/dev/null 2>&1; then
    export DS_ACCELERATOR=cpu
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
