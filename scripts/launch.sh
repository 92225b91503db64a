#!/usr/bin/env bash
# Launch train_deepspeed.py with the deepspeed launcher on one node or many; flags go through.
#
#   bash scripts/launch.sh --model DiT-S/2 --num_experts 8 ...                 # every GPU of this node
#   HOSTFILE=scripts/hostfile.example bash scripts/launch.sh ...              # every node in the hostfile
#   NUM_GPUS=4 bash scripts/launch.sh ...                                      # 4 GPUs of this node
#
# Multi-node: the hostfile lists "hostname slots=GPUS" per node; this node must reach the others
# by passwordless ssh, and the repository and .venv must be at the same path on each (shared
# file system). MASTER_ADDR (default: first host) and MASTER_PORT (default 29500) can be set;
# DEEPSPEED names the launcher to use (default: `deepspeed` from .venv or PATH).
# Under SLURM or other schedulers without ssh, start one `torchrun` per node instead (README).
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
if [ -x .venv/bin/python ]; then
    # shellcheck disable=SC1091
    . .venv/bin/activate
fi
launcher=("${DEEPSPEED:-deepspeed}" --master_port "${MASTER_PORT:-29500}")
if [ -n "${HOSTFILE:-}" ]; then
    [ -f "$HOSTFILE" ] || { echo "error: HOSTFILE=$HOSTFILE does not exist; write one 'hostname slots=8' line per node." >&2; exit 2; }
    launcher+=(--hostfile "$HOSTFILE")
    if [ -n "${MASTER_ADDR:-}" ]; then
        launcher+=(--master_addr "$MASTER_ADDR")
    fi
elif [ -n "${NUM_GPUS:-}" ]; then
    launcher+=(--num_gpus "$NUM_GPUS")
fi
# Preemption: SIGTERM or SIGINT to this script (a scheduler signalling the job's first process, e.g.
# Kubernetes' PID 1; `kill PID`; Ctrl-C) goes to the `deepspeed` launcher, whose exit every rank
# notices at the end of its step: it saves a checkpoint and stops. This script stays until the last
# rank has gone, so the scheduler's grace period covers the save (one step plus one checkpoint).
set -m  # the launch gets its own process group, which the wait below watches
"${launcher[@]}" train_deepspeed.py "$@" &
launch=$!
trap 'kill -TERM "$launch" 2>/dev/null || true' TERM INT
status=0
wait "$launch" || status=$?
while kill -0 -- "-$launch" 2>/dev/null; do # the ranks outlive a signalled launcher while they save
    sleep 1
done
exit "$status"
