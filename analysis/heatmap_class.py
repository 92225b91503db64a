"""Class x expert selection frequency, one panel per MoE layer.

    python analysis/heatmap_class.py --routing routing.npz --out class.png [--layers 0,2]

Argument parsing only; the work is in dit_moe.routing (`python -m dit_moe.routing class` is the same command).
"""

import sys

from dit_moe.routing.cli import main

if __name__ == "__main__":
    sys.exit(main(command="class"))
