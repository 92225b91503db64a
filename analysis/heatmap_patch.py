"""Which experts each patch position uses, one panel per MoE layer (or layer x expert).

    python analysis/heatmap_patch.py --routing routing.npz --out patch.png [--mode dominant|per-expert]

Argument parsing only; the work is in dit_moe.routing (`python -m dit_moe.routing patch` is the same command).
"""

import sys

from dit_moe.routing.cli import main

if __name__ == "__main__":
    sys.exit(main(command="patch"))
