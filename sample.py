"""Sample a PNG grid of chosen classes from any supported DiT / DiT-MoE checkpoint.

    python sample.py --model DiT-XL/2 --ckpt FILE --vae-path DIR --image-size 256 --cfg-scale 1.5
    python sample.py --ckpt export.safetensors --class-labels 0,1,2,3 --sampler heun --out grid.png
    python sample.py --image-size 512 --seed 1     # no --ckpt: DiT's released DiT-XL/2, downloaded once
    python sample.py --ckpt export.safetensors --sampler unipc --num-sampling-steps 10 --guidance-interval 0.28,5.42

Argument parsing only; the work is `dit_moe.sampling.grid` (see its docs and dit_moe.sampling.prepare
for the defaults and checks). `python sample.py --help` lists every flag; each has a `--cfg-scale`
and a `--cfg_scale` spelling.
"""

import sys

from dit_moe.sampling.grid import main

if __name__ == "__main__":
    sys.exit(main(prog="sample.py"))
