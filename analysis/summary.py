"""Per-layer expert load shares, CV, normalised entropy and unused experts.

    python analysis/summary.py --routing routing.npz [--json summary.json]

Argument parsing only; the work is in dit_moe.routing (`python -m dit_moe.routing summary` is the same command).
"""

import sys

from dit_moe.routing.cli import main

if __name__ == "__main__":
    sys.exit(main(command="summary"))
