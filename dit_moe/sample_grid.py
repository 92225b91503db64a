"""`python -m dit_moe.sample_grid`: the PNG grid tool's older name; the tool is dit_moe.sampling.grid."""

import sys

from .sampling.grid import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m dit_moe.sample_grid"))
