"""Train a DiT / DiT-MoE with DeepSpeed: `deepspeed train_deepspeed.py --deepspeed_config config/zero2.json ...`.

Flags: `python train_deepspeed.py --help`; the work is done by `dit_moe.train`.
"""

from dit_moe.train.cli import main

if __name__ == "__main__":
    main()
