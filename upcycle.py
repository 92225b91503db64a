"""Upcycle a dense DiT checkpoint into a DiT-MoE checkpoint that starts where the dense model was.

    python upcycle.py --model DiT-S/2 --ckpt dense.pt --num_experts 8 --num_experts_per_tok 2 --out moe.pt

Argument parsing only (dit_moe.upcycle.tool); the work is `dit_moe.upcycle.upcycle_checkpoint`
(see its docs for the method). `python -m dit_moe.upcycle` is the same command.
"""

import sys

from dit_moe.upcycle.tool import main

if __name__ == "__main__":
    sys.exit(main(prog="upcycle.py"))
