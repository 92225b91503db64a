"""`python -m dit_moe.plan`: what a DiT-MoE run costs per GPU on a cluster (see `dit_moe.plan`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
