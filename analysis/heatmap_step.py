"""Timestep x expert selection frequency, one panel per MoE layer.

    python analysis/heatmap_step.py --routing routing.npz --out step.png [--bins 10]

Argument parsing only; the work is in dit_moe.routing (`python -m dit_moe.routing step` is the same command).
"""

import sys

from dit_moe.routing.cli import main

if __name__ == "__main__":
    sys.exit(main(command="step"))
