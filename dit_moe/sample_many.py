"""`python -m dit_moe.sample_many`: the FID sampler's older name (README, scripts/sample_ddp.sh); the
tool is dit_moe.sampling.many."""

import sys

from .sampling.many import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m dit_moe.sample_many"))
