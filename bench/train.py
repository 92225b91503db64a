"""Whole training-step benchmark: the trainer's own micro-step through the DeepSpeed engine.

Prints steps/s, images/s and peak memory for DiT-MoE-S/2 8E2A (default), each setting in a
fresh process, and ratios against the plain run measured in the same invocation:
  plain       no gradient checkpointing, no masking
  grad-ckpt   gradient checkpointing of the blocks
  mask-0.5    MaskDiT: encoder on half the patches + a light decoder (--decoder-*) and the MAE term
  decoder     the same MaskDiT model unmasked (mask ratio 0), i.e. what the decoder alone costs
Peak memory is torch.cuda.max_memory_allocated on GPU; on CPU it is the growth of the
process's peak resident set (ru_maxrss) over the training steps, i.e. activations, gradients
and optimizer state that the steps added on top of the built model.

    python bench/train.py                                  # CPU: DiT-S/2 8E2A, 32x32x4 latents, batch 8
    python bench/train.py --model DiT-XL/2 --input-size 32 --batch-size 32 --precision bf16   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

WORKER_FLAG = "--worker"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="DiT-S/2")
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--num-experts-per-tok", type=int, default=2)
    p.add_argument("--input-size", type=int, default=32, help="latent side (256px images -> 32)")
    p.add_argument("--in-channels", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--zero", default="zero2", help="config/<name>.json")
    p.add_argument("--decoder-depth", type=int, default=2, help="MaskDiT decoder blocks (MaskDiT-XL: 8)")
    p.add_argument("--decoder-hidden-size", type=int, default=256, help="MaskDiT decoder width (MaskDiT-XL: 512)")
    p.add_argument("--decoder-num-heads", type=int, default=4)
    p.add_argument("--settings", default="plain,grad-ckpt,mask-0.5,decoder", help="comma-separated subset")
    p.add_argument("--grad-checkpointing", default="off", help=argparse.SUPPRESS)
    p.add_argument("--mask-ratio", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--with-decoder", default="off", help=argparse.SUPPRESS)
    p.add_argument(WORKER_FLAG, action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(args) -> dict:
    """One setting, one process: build the engine exactly as the trainer does and time its steps."""
    import torch

    from dit_moe.diffusion import DrawSpec, build_objective
    from dit_moe.models import DiT, preset_config
    from dit_moe.train import engine as engine_lib
    from dit_moe.train.engine import apply_precision, load_deepspeed_config
    from dit_moe.train.loop import micro_step

    torch.set_num_threads(args.threads)
    _, _, _, device = engine_lib.init_distributed()
    ds_config = load_deepspeed_config(f"config/{args.zero}.json")
    ds_config.update(
        train_micro_batch_size_per_gpu=args.batch_size, gradient_accumulation_steps=1, train_batch_size=args.batch_size
    )
    precision = apply_precision(ds_config, args.precision, device)
    config = preset_config(
        args.model,
        input_size=args.input_size,
        in_channels=args.in_channels,
        num_experts=args.num_experts,
        num_experts_per_tok=args.num_experts_per_tok,
        grad_checkpointing=args.grad_checkpointing == "on",
        decoder_depth=args.decoder_depth if args.with_decoder == "on" else 0,
        decoder_hidden_size=args.decoder_hidden_size,
        decoder_num_heads=args.decoder_num_heads,
    )
    torch.manual_seed(0)
    engine = engine_lib.initialize(DiT(config), ds_config)
    ema = engine_lib.EMA(engine.module, 0.9999)
    objective = build_objective("iddpm", learn_sigma=True)
    dtype = next(engine.module.parameters()).dtype
    shape = (args.in_channels, args.input_size, args.input_size)
    spec = DrawSpec(shape, label_dropout=0.1, mask_ratio=args.mask_ratio, num_tokens=engine.module.num_tokens)
    x = torch.randn(args.batch_size, *shape, device=device)
    y = torch.randint(0, 1000, (args.batch_size,), device=device)

    fwd_bwd_seconds = []

    def step(i):
        rnd = objective.draw((0, i, 0), args.batch_size, spec, device)
        start = time.perf_counter()
        micro_step(engine, objective, x, y, rnd, dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()  # host sync: timing of forward + backward alone
        fwd_bwd_seconds.append(time.perf_counter() - start)
        engine.step()
        ema.update()

    engine.train()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for i in range(args.warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    fwd_bwd_seconds.clear()
    start = time.perf_counter()
    for i in range(args.steps):
        step(args.warmup + i)
    if device.type == "cuda":
        torch.cuda.synchronize()  # host sync: timing
    elapsed = time.perf_counter() - start
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
        device_name = torch.cuda.get_device_name()
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
        device_name = f"CPU ({args.threads} threads)"
    return {
        "steps_per_s": args.steps / elapsed,
        "fwd_bwd_s": sum(fwd_bwd_seconds) / args.steps,
        "images_per_s": args.steps * args.batch_size / elapsed,
        "peak_mb": peak_mb,
        "device": device_name,
        "precision": precision,
        "params": sum(p.numel() for p in engine.module.parameters()),
    }


SETTINGS = {
    "plain": dict(grad_checkpointing="off", mask_ratio=0.0, with_decoder="off"),
    "grad-ckpt": dict(grad_checkpointing="on", mask_ratio=0.0, with_decoder="off"),
    "mask-0.5": dict(grad_checkpointing="off", mask_ratio=0.5, with_decoder="on"),
    "decoder": dict(grad_checkpointing="off", mask_ratio=0.0, with_decoder="on"),
}


def run_setting(args, setting: dict) -> dict:
    argv = [sys.executable, __file__, WORKER_FLAG]
    for key in (
        "model",
        "num_experts",
        "num_experts_per_tok",
        "input_size",
        "in_channels",
        "batch_size",
        "steps",
        "warmup",
        "threads",
        "precision",
        "zero",
        "decoder_depth",
        "decoder_hidden_size",
        "decoder_num_heads",
    ):
        argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    for key, value in setting.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"benchmark worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    names = ["plain"] + [n for n in args.settings.split(",") if n != "plain"]
    unknown = sorted(set(names) - set(SETTINGS))
    if unknown:
        raise SystemExit(f"unknown --settings {unknown}; choose from {sorted(SETTINGS)}.")
    results = {name: run_setting(args, SETTINGS[name]) for name in names}
    plain = results["plain"]
    print(
        f"{args.model} {args.num_experts}E{args.num_experts_per_tok}A, {plain['params']:,} params, batch "
        f"{args.batch_size} of {args.in_channels}x{args.input_size}x{args.input_size}, {plain['precision']}, "
        f"{plain['device']}, {args.steps} timed steps; decoder {args.decoder_depth}x{args.decoder_hidden_size}"
    )
    print(
        f"{'setting':>10} {'steps/s':>9} {'images/s':>9} {'peak MB':>9} {'time x':>8} {'memory x':>9}"
        f" {'fwd+bwd s':>10} {'fwd+bwd x':>10}"
    )
    for name, r in results.items():
        print(
            f"{name:>10} {r['steps_per_s']:9.3f} {r['images_per_s']:9.2f} {r['peak_mb']:9.0f} "
            f"{plain['steps_per_s'] / r['steps_per_s']:8.2f} {r['peak_mb'] / max(plain['peak_mb'], 1e-9):9.2f}"
            f" {r['fwd_bwd_s']:10.3f} {r['fwd_bwd_s'] / plain['fwd_bwd_s']:10.2f}"
        )
    print(
        "time x / memory x / fwd+bwd x: whole step time, peak memory and forward+backward time relative to"
        " 'plain' (below 1 is better); the rest of a step is the optimizer and EMA, which masking does not shrink"
    )
    if "mask-0.5" in results and "decoder" in results:
        masked, unmasked = results["mask-0.5"], results["decoder"]
        print(
            f"mask 0.5 vs the same MaskDiT model unmasked: time per step x"
            f"{unmasked['steps_per_s'] / masked['steps_per_s']:.2f}, forward+backward x"
            f"{masked['fwd_bwd_s'] / unmasked['fwd_bwd_s']:.2f}, "
            f"peak memory x{masked['peak_mb'] / max(unmasked['peak_mb'], 1e-9):.2f}"
        )


if __name__ == "__main__":
    main()
