"""Record which experts every token uses while sampling from a checkpoint.

    python analysis/expert_data.py --ckpt FILE --out routing.npz [--vae-path DIR|none] [--classes 0,1,2] \
        [--samples-per-class N] [--num-sampling-steps S] [--cfg-scale 1.5] [--sampler NAME] [--seed 0]

Argument parsing only; the work is in dit_moe.routing (`python -m dit_moe.routing collect` is the same command).
"""

import sys

from dit_moe.routing.cli import main

if __name__ == "__main__":
    sys.exit(main(command="collect"))
