"""Guided sampling throughput: images/s of our DiT-MoE and of the reference-style model, eager and compiled.

    python bench/sample.py                                  # CPU: DiT-S/2 8E2A, 32x32x4 latents, 4 images
    python bench/sample.py --model DiT-XL/2 --batch-size 32 --device cuda --dtype bfloat16 --json sample.json

Samples with the flow objective's Euler sampler (DiT-MoE's) under classifier-free guidance
(`dit_moe.diffusion.guided`: one forward over [cond; uncond] per step), in eval mode, bf16 through
autocast as sample.py does, for
  ours       our model
  reference  the reference-style model (bench/reference.py) holding the same weights; in eval mode it
             runs feizc/DiT-MoE's `moe_infer` (experts sorted, per-expert counts read on the host)
each eager and compiled (`dit_moe.models.compile`, --compile-mode). The variants take turns, eager ones
first, and each is timed on --repeats full samplings of --num-steps steps after a one-step warm-up,
which for the compiled ones holds the compilation (reported apart, as compile s). The printed
images/s is batch / median seconds of a sampling; FLOPs are 2 forwards per image per step
(dit_moe.models.flops.guided_step_flops), judged against the square-GEMM rate measured in the same run and,
on a GPU, the vendor's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch

from dit_moe.diffusion import build_objective, guided
from dit_moe.models import DiT, flops
from dit_moe.models.compile import compile_model
from dit_moe.utils.host_memory import keep_freed_memory

from common import add_model_flags, in_turns, model_config
from reference import load_weights, reference_dit


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    p.add_argument("--batch-size", type=int, default=4, help="images per sampling (the model sees twice as many)")
    p.add_argument("--num-steps", type=int, default=10, help="Euler steps per sampling (DiT-MoE samples with 50)")
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--compile-mode", default="blocks", choices=["blocks", "model"])
    p.add_argument("--gemm-size", type=int, default=None, help="side of the square GEMM (default 8192 on CUDA)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    return p.parse_args(argv)


def sampler(model: DiT, args, device: torch.device, dtype: torch.dtype):
    """`run(num_steps)`: one guided sampling of the batch, from the same noise and labels each time."""
    objective = build_objective("flow", learn_sigma=model.config.learn_sigma)
    fn = guided(model, args.cfg_scale, null_label=model.num_classes)
    generator = torch.Generator(device).manual_seed(0)
    shape = (args.batch_size, args.in_channels, args.input_size, args.input_size)
    noise = torch.randn(shape, device=device, generator=generator)
    y = torch.randint(0, model.num_classes, (args.batch_size,), device=device, generator=generator)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    def run(num_steps: int) -> float:
        start = time.perf_counter()
        with autocast:
            objective.sample(fn, noise, dict(y=y), sampler="euler", num_steps=num_steps)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # host sync: timing
        return time.perf_counter() - start

    return run


def time_turns(runs: dict, args) -> dict[str, dict]:
    """Warm up each (one step), then median seconds of --repeats samplings, the variants taking turns."""
    first = {name: run(1) for name, run in runs.items()}
    seconds = in_turns({name: (lambda run=run: run(args.num_steps)) for name, run in runs.items()}, args.repeats)
    out = {}
    for name, values in seconds.items():
        median = statistics.median(values)
        out[name] = {"seconds": median, "first_step_s": first[name], "step_s": median / args.num_steps}
    return out


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cpu":
        keep_freed_memory()  # as the trainer and the sampler do
    config = model_config(
        args,
        learn_sigma=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        ours = DiT(config).eval()
        reference = load_weights(reference_dit(config), ours).eval()
    name = flops.device_name(device, args.threads)
    gemm_rate, peak = flops.measure_gemm_rate(device, dtype, args.gemm_size), flops.vendor_peak(name)
    with torch.no_grad():
        results = time_turns(
            {
                "ours-eager": sampler(ours, args, device, dtype),
                "reference-eager": sampler(reference, args, device, dtype),
            },
            args,
        )
        compile_model(ours, args.compile_mode)
        compile_model(reference, args.compile_mode)
        results.update(
            time_turns(
                {
                    "ours-compiled": sampler(ours, args, device, dtype),
                    "reference-compiled": sampler(reference, args, device, dtype),
                },
                args,
            )
        )
    per_image = flops.guided_step_flops(config)
    print(
        f"{args.model} {config.moe_shape}, batch {args.batch_size} of {args.in_channels}x{args.input_size}x"
        f"{args.input_size} (CFG batch {2 * args.batch_size}), {args.num_steps} Euler steps, cfg {args.cfg_scale},"
        f" {args.dtype}, {name}; {per_image / 1e9:.1f} GFLOP per image per step; square GEMM"
        f" {gemm_rate / 1e12:.3f} TFLOP/s" + (f", vendor dense bf16 peak {peak / 1e12:.0f} TFLOP/s" if peak else "")
    )
    print(f"{'variant':>18} {'images/s':>9} {'ms/step':>8} {'TFLOP/s':>8} {'of GEMM':>7} {'MFU':>5} {'compile s':>9}")
    for variant, r in results.items():
        r["images_per_s"] = args.batch_size / r["seconds"]
        r["compile_s"] = r["first_step_s"] - r["step_s"] if variant.endswith("compiled") else None
        r["utilisation"] = u = flops.utilisation(per_image * args.batch_size / r["step_s"], gemm_rate, peak)
        mfu = f"{100 * u['mfu']:4.0f}%" if u["mfu"] is not None else "    -"
        compile_s = f"{r['compile_s']:9.1f}" if r["compile_s"] is not None else "        -"
        print(
            f"{variant:>18} {r['images_per_s']:9.3f} {1e3 * r['step_s']:8.1f} {u['tflops']:8.3f}"
            f" {100 * u['of_gemm']:6.0f}% {mfu} {compile_s}"
        )
    ratios = {
        mode: results[f"ours-{mode}"]["images_per_s"] / results[f"reference-{mode}"]["images_per_s"]
        for mode in ("eager", "compiled")
    }
    ratios["compiled_vs_eager"] = results["ours-compiled"]["images_per_s"] / results["ours-eager"]["images_per_s"]
    print(
        f"ours vs the reference-style model: eager {ratios['eager']:.2f}x, compiled {ratios['compiled']:.2f}x the"
        f" images/s; compiled vs eager (ours): {ratios['compiled_vs_eager']:.2f}x"
    )
    if args.json:
        report = {
            "model": f"{args.model} {config.moe_shape}",
            "device": name,
            "dtype": args.dtype,
            "batch_size": args.batch_size,
            "num_steps": args.num_steps,
            "gflop_per_image_step": per_image / 1e9,
            "gemm_tflops": gemm_rate / 1e12,
            "vendor_peak_tflops": peak / 1e12 if peak else None,
            "variants": results,
            "ratios": ratios,
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
