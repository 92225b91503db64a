#!/usr/bin/env bash
# FID, Inception Score, precision and recall of a sample .npz against a reference .npz
# (images and/or precomputed mu/sigma, e.g. ADM's VIRTUAL_imagenet256_labeled.npz).
# The Inception network is NVIDIA's TorchScript inception-2015-12-05.pt, read from a local path:
#   https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt
# Extra arguments after `--` go to `python -m dit_moe.evaluation fid` (e.g. --device cuda --json out.json).
set -euo pipefail

usage() {
    cat <<USAGE
Usage: $0 SAMPLES_NPZ REF_NPZ [INCEPTION_WEIGHTS] [-- extra args]
   or: SAMPLES=... REF=... [INCEPTION_WEIGHTS=inception-2015-12-05.pt] $0
USAGE
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then usage; exit 0; fi
POSITIONAL=()
while [[ $# -gt 0 && "$1" != "--" ]]; do POSITIONAL+=("$1"); shift; done
if [[ "${1:-}" == "--" ]]; then shift; fi
SAMPLES="${POSITIONAL[0]:-${SAMPLES:-}}"
REF="${POSITIONAL[1]:-${REF:-}}"
INCEPTION_WEIGHTS="${POSITIONAL[2]:-${INCEPTION_WEIGHTS:-inception-2015-12-05.pt}}"
if [[ -z "$SAMPLES" || -z "$REF" ]]; then usage >&2; exit 2; fi

exec python -m dit_moe.evaluation fid --samples "$SAMPLES" --ref "$REF" --inception-weights "$INCEPTION_WEIGHTS" "$@"
