"""Whole training-step benchmark: the trainer's own micro-step through the DeepSpeed engine.

Prints steps/s, images/s, peak memory and the FLOP accounting for DiT-MoE-S/2 8E2A (default),
each setting in a fresh process, and ratios against the plain run measured in the same invocation:
  plain       no gradient checkpointing, no masking, eager
  grad-ckpt   gradient checkpointing of the blocks
  compiled    torch.compile of the blocks (--compile-mode; dit_moe.models.compile); the compile time (first
              step minus a steady step) is reported apart from the step time
  compiled-grad-ckpt  both
  reference   the reference-style model (bench/reference.py: feizc/DiT-MoE's boolean-mask expert
              loop over per-expert nn.Linears), eager, same engine, objective and batch
  mask-0.5    MaskDiT: encoder on half the patches + a light decoder (--decoder-*) and the MAE term
  decoder     the same MaskDiT model unmasked (mask ratio 0), i.e. what the decoder alone costs
  glibc-malloc  plain with glibc's default malloc settings (MALLOC_MMAP_MAX_ set to its default, so
              dit_moe.utils.host_memory leaves malloc alone): on a CPU, what keeping freed memory gains
Peak memory is torch.cuda.max_memory_allocated on GPU; on CPU it is the growth of the
process's peak resident set (ru_maxrss) over the training steps, i.e. activations, gradients
and optimizer state that the steps added on top of the built model.
FLOPs per image come from the config (dit_moe.models.flops; training = 3x forward, recomputation not
counted); achieved TFLOP/s is that times images/s, judged against the square-GEMM rate measured in
the same invocation and, on a GPU, the vendor's dense bf16 peak (MFU).
`--batch-size auto` measures the plain setting's peak memory at two small batches and runs every
setting at the largest batch that the line through them fits into 85% of the device's memory.
Every setting is the trainer's own run (`dit_moe.train.loop.setup` from its command line, `train_step`:
micro-batch, engine step, the routers' optimizer-step hooks, EMA) on synthetic latent shards.

    python bench/train.py                                  # CPU: DiT-S/2 8E2A, 32x32x4 latents, batch 8
    python bench/train.py --input-size 16 --threads 1 --settings plain,reference,glibc-malloc --rounds 3
    python bench/train.py --model DiT-XL/2 --input-size 32 --batch-size auto --precision bf16   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Optional

from common import add_model_flags

WORKER_FLAG = "--worker"
OUT_OF_MEMORY = 3  # a worker's exit status when the batch does not fit
PROBE_BATCHES = (2, 4)
MEMORY_FRACTION = 0.85


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    p.add_argument("--batch-size", default="8", help="an integer, or auto: the largest that fits (see above)")
    p.add_argument("--max-batch-size", type=int, default=512, help="the most --batch-size auto may pick")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1, help="runs of every setting, in turns; the median is reported")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--zero", default="zero2", help="config/<name>.json")
    p.add_argument("--decoder-depth", type=int, default=2, help="MaskDiT decoder blocks (MaskDiT-XL: 8)")
    p.add_argument("--decoder-hidden-size", type=int, default=256, help="MaskDiT decoder width (MaskDiT-XL: 512)")
    p.add_argument("--decoder-num-heads", type=int, default=4)
    p.add_argument(
        "--compile-mode", default="blocks", choices=["blocks", "model"], help="what the compiled settings compile"
    )
    p.add_argument(
        "--settings",
        default="plain,grad-ckpt,compiled,reference,mask-0.5,decoder,glibc-malloc",
        help="comma-separated subset",
    )
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--compile", default="off", help=argparse.SUPPRESS)
    p.add_argument("--reference", default="off", help=argparse.SUPPRESS)
    p.add_argument("--grad-checkpointing", default="off", help=argparse.SUPPRESS)
    p.add_argument("--mask-ratio", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--with-decoder", default="off", help=argparse.SUPPRESS)
    p.add_argument(WORKER_FLAG, action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def fitting_batch(peaks: tuple[float, float], capacity: float, cap: int) -> int:
    """The largest batch whose peak memory, on the line through the `peaks` measured at
    `PROBE_BATCHES`, stays within `MEMORY_FRACTION` of `capacity`; a multiple of 8 when above 8,
    at least the smaller probe and at most `cap`."""
    (small, large), (peak_small, peak_large) = PROBE_BATCHES, peaks
    per_image = max((peak_large - peak_small) / (large - small), 1.0)
    fixed = peak_small - small * per_image
    fit = int((MEMORY_FRACTION * capacity - fixed) // per_image)
    fit = fit // 8 * 8 if fit > 8 else fit
    return max(small, min(cap, fit))


def peak_memory_bytes(device) -> float:
    import torch

    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0


def memory_capacity_bytes(device) -> float:
    import torch

    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[1])
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def trainer_flags(args, batch: int, features: str, results: str) -> list[str]:
    """The trainer's own command line for one setting on the synthetic latents."""
    flags = [
        "--deepspeed_config",
        f"config/{args.zero}.json",
        "--model",
        args.model,
        "--num-experts",
        str(args.num_experts),
        "--num-experts-per-tok",
        str(args.num_experts_per_tok),
        "--dataset",
        "latents",
        "--features-path",
        features,
        "--image-size",
        str(8 * args.input_size),
        "--global-batch-size",
        str(batch),
        "--precision",
        args.precision,
        "--grad-checkpointing",
        "True" if args.grad_checkpointing == "on" else "False",
        "--mask-ratio",
        str(args.mask_ratio),
        "--log-every",
        "1000000",
        "--ckpt-every",
        "1000000",
        "--num-workers",
        "0",
        "--results-dir",
        results,
    ]
    if args.with_decoder == "on":
        flags += ["--decoder-depth", str(args.decoder_depth), "--decoder-hidden-size", str(args.decoder_hidden_size)]
        flags += ["--decoder-num-heads", str(args.decoder_num_heads)]
    if args.compile != "off":
        flags += ["--compile", args.compile]
    return flags


def worker(args) -> dict:
    """One setting, one process: the trainer's own setup and training step on synthetic latents, timed."""
    import tempfile

    import torch
    from data import write_synthetic_shards

    from dit_moe.models import flops
    from dit_moe.train.config import load_config
    from dit_moe.train.loop import num_parameters, setup, train_step
    from dit_moe.train.metrics import LoadTracker, Window

    from reference import reference_dit

    torch.set_num_threads(args.threads)
    batch = int(args.batch_size)
    work = tempfile.mkdtemp(prefix="bench_train_")
    samples = batch * (args.warmup + args.steps + 2)
    write_synthetic_shards(work + "/latents", samples, samples, (args.in_channels, args.input_size, args.input_size))
    cfg = load_config(trainer_flags(args, batch, work + "/latents", work + "/run"))
    build = (lambda cfg, config, init=None: reference_dit(config)) if args.reference == "on" else None
    run = setup(cfg, build) if build else setup(cfg)
    marks: list[float] = []
    real_step = run.engine.step

    def marked_step(*a, **k):  # the end of the micro-batch's forward and backward
        marks.append(time.perf_counter())
        return real_step(*a, **k)

    run.engine.step = marked_step
    window = Window(LoadTracker(run.engine.module, run.device))
    run.engine.train()
    step_seconds, fwd_bwd_seconds, step_faults = [], [], []

    def step():
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        train_step(run, window)
        if run.device.type == "cuda":
            torch.cuda.synchronize()  # host sync: timing of the whole step
        step_seconds.append(time.perf_counter() - start)
        fwd_bwd_seconds.append(marks[-1] - start)
        step_faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)

    try:
        for _ in range(args.warmup):
            step()
        first_step_s = step_seconds[0] if step_seconds else None
        base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if run.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        step_seconds.clear(), fwd_bwd_seconds.clear(), step_faults.clear()
        for _ in range(args.steps):
            step()
    except torch.OutOfMemoryError as err:
        print(f"out of memory at batch {batch}: {str(err).splitlines()[0]}", file=sys.stderr)
        raise SystemExit(OUT_OF_MEMORY) from None
    elapsed = sum(step_seconds)
    if run.device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    tokens = run.engine.module.num_tokens
    visible = tokens - round(args.mask_ratio * tokens) if args.mask_ratio else None
    steady = sorted(step_seconds)[len(step_seconds) // 2]
    return {
        "batch_size": batch,
        "steps_per_s": args.steps / elapsed,
        "fwd_bwd_s": sum(fwd_bwd_seconds) / args.steps,
        "images_per_s": args.steps * batch / elapsed,
        "peak_mb": peak_mb,
        "page_faults_per_step": sum(step_faults) / args.steps,
        "first_step_s": first_step_s,
        "compile_s": first_step_s - steady if args.compile != "off" and first_step_s is not None else None,
        "train_flops_per_image": flops.training_flops(run.model_config, visible),
        "device": flops.device_name(run.device, args.threads),
        "precision": run.precision,
        "params": num_parameters(run.engine.module),
        "peak_bytes": peak_memory_bytes(run.device),
        "capacity_bytes": memory_capacity_bytes(run.device),
    }


SETTINGS = {
    "plain": dict(grad_checkpointing="off", mask_ratio=0.0, with_decoder="off"),
    "grad-ckpt": dict(grad_checkpointing="on", mask_ratio=0.0, with_decoder="off"),
    "compiled": dict(grad_checkpointing="off", mask_ratio=0.0, with_decoder="off", compile="on"),
    "compiled-grad-ckpt": dict(grad_checkpointing="on", mask_ratio=0.0, with_decoder="off", compile="on"),
    "reference": dict(grad_checkpointing="off", mask_ratio=0.0, with_decoder="off", reference="on"),
    "mask-0.5": dict(grad_checkpointing="off", mask_ratio=0.5, with_decoder="on"),
    "decoder": dict(grad_checkpointing="off", mask_ratio=0.0, with_decoder="on"),
    "glibc-malloc": dict(
        grad_checkpointing="off", mask_ratio=0.0, with_decoder="off", env={"MALLOC_MMAP_MAX_": "65536"}
    ),
}
WORKER_KEYS = (
    "model",
    "num_experts",
    "num_experts_per_tok",
    "input_size",
    "in_channels",
    "max_batch_size",
    "steps",
    "warmup",
    "threads",
    "precision",
    "zero",
    "decoder_depth",
    "decoder_hidden_size",
    "decoder_num_heads",
)


def run_setting(args, setting: dict, batch_size: str) -> dict:
    """One setting in a fresh process; a batch that runs out of memory is retried once at 3/4 of it."""
    argv = [sys.executable, __file__, WORKER_FLAG, "--batch-size", batch_size]
    for key in WORKER_KEYS:
        argv += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), **setting.get("env", {}))
    for key, value in setting.items():
        if key == "env":
            continue
        if key == "compile":  # "on": what --compile-mode says
            value = args.compile_mode
        argv += [f"--{key.replace('_', '-')}", str(value)]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if out.returncode == OUT_OF_MEMORY and batch_size != "auto" and int(batch_size) > 1:
        return run_setting(args, setting, str(max(1, int(batch_size) * 3 // 4)))
    if out.returncode != 0:
        raise RuntimeError(f"benchmark worker failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def rates(result: dict, gemm_rate: float, peak: Optional[float]) -> dict:
    """Achieved training TFLOP/s of one setting, its fraction of the square-GEMM rate and its MFU."""
    from dit_moe.models import flops

    return flops.utilisation(result["train_flops_per_image"] * result["images_per_s"], gemm_rate, peak)


def auto_batch(args) -> int:
    """The largest batch the plain setting fits: `fitting_batch` on its peaks at the `PROBE_BATCHES`."""
    probes = [run_setting(args, SETTINGS["plain"], str(b)) for b in PROBE_BATCHES]
    return fitting_batch(tuple(p["peak_bytes"] for p in probes), probes[0]["capacity_bytes"], args.max_batch_size)


def main() -> None:
    args = parse()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    names = ["plain"] + [n for n in args.settings.split(",") if n != "plain"]
    unknown = sorted(set(names) - set(SETTINGS))
    if unknown:
        raise SystemExit(f"unknown --settings {unknown}; choose from {sorted(SETTINGS)}.")
    batch = str(auto_batch(args)) if args.batch_size == "auto" else args.batch_size
    rounds: dict[str, list[dict]] = {"plain": [run_setting(args, SETTINGS["plain"], batch)]}
    for round_index in range(args.rounds):
        for name in names[1 if round_index == 0 else 0 :]:
            write_json(args.json, {"partial": True, "settings": median_rounds(rounds)})  # what a killed run leaves
            try:
                rounds.setdefault(name, []).append(run_setting(args, SETTINGS[name], batch))
            except RuntimeError as err:  # one failed setting must not cost the others' numbers
                rounds[name] = [{"error": str(err)[-1500:]}]
                print(f"{name}: {str(err)[-1500:]}", file=sys.stderr)
    write_json(args.json, summarise(args, median_rounds(rounds)))


def median_rounds(rounds: dict[str, list[dict]]) -> dict[str, dict]:
    """Per setting, the round with the median images/s (settings take turns round by round, so a
    load change on a shared machine hits them alike); a setting that failed once keeps its error."""
    out = {}
    for name, results in rounds.items():
        if any("error" in r for r in results):
            out[name] = next(r for r in results if "error" in r)
            continue
        ranked = sorted(results, key=lambda r: r["images_per_s"])
        out[name] = {**ranked[(len(ranked) - 1) // 2], "rounds": len(ranked)}
    return out


def write_json(path: Optional[str], report: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=1)


def summarise(args, results: dict[str, dict]) -> dict:
    """Print the table and the ratios; return everything as one JSON-able dict."""
    import torch

    from dit_moe.models import flops

    plain = results["plain"]
    device = torch.device("cpu" if plain["device"].startswith("CPU") else "cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(plain["precision"], torch.float32)
    torch.set_num_threads(args.threads)
    gemm_rate, peak = flops.measure_gemm_rate(device, dtype), flops.vendor_peak(plain["device"])
    print(
        f"{args.model} {args.num_experts}E{args.num_experts_per_tok}A, {plain['params']:,} params, batch "
        f"{plain['batch_size']} of {args.in_channels}x{args.input_size}x{args.input_size}, {plain['precision']}, "
        f"{plain['device']}, {args.steps} timed steps, median of {args.rounds} round(s); decoder {args.decoder_depth}x{args.decoder_hidden_size};"
        f" {plain['train_flops_per_image'] / 1e9:.1f} GFLOP per image per training step; square GEMM"
        f" {gemm_rate / 1e12:.3f} TFLOP/s" + (f", vendor dense bf16 peak {peak / 1e12:.0f} TFLOP/s" if peak else "")
    )
    print(
        f"{'setting':>18} {'batch':>5} {'steps/s':>9} {'images/s':>9} {'peak MB':>9} {'time x':>7} {'memory x':>8}"
        f" {'fwd+bwd x':>9} {'TFLOP/s':>8} {'of GEMM':>7} {'MFU':>5} {'compile s':>9} {'faults/step':>11}"
    )
    for name, r in results.items():
        if "error" in r:
            print(f"{name:>18} failed (see stderr)")
            continue
        r["utilisation"] = u = rates(r, gemm_rate, peak)
        r["time_x"] = (r["batch_size"] / r["images_per_s"]) / (plain["batch_size"] / plain["images_per_s"])
        r["images_per_s_x"] = r["images_per_s"] / plain["images_per_s"]
        mfu = f"{100 * u['mfu']:4.0f}%" if u["mfu"] is not None else "    -"
        compile_s = f"{r['compile_s']:9.1f}" if r["compile_s"] is not None else "        -"
        print(
            f"{name:>18} {r['batch_size']:5d} {r['steps_per_s']:9.3f} {r['images_per_s']:9.2f} {r['peak_mb']:9.0f}"
            f" {r['time_x']:7.2f} {r['peak_mb'] / max(plain['peak_mb'], 1e-9):8.2f}"
            f" {r['fwd_bwd_s'] / plain['fwd_bwd_s']:9.2f} {u['tflops']:8.3f} {100 * u['of_gemm']:6.0f}% {mfu}"
            f" {compile_s} {r['page_faults_per_step']:11.0f}"
        )
    print(
        "time x / memory x / fwd+bwd x: time per image, peak memory and forward+backward time relative to"
        " 'plain' (below 1 is better); the rest of a step is the optimizer and EMA, which masking does not shrink;"
        " faults/step: the host's minor page faults per training step"
    )
    ok = {name: r for name, r in results.items() if "error" not in r}
    ratios = images_per_s_ratios(ok)
    if ratios["compiled_vs_eager"] is not None:
        print(f"compiled vs eager: {ratios['compiled_vs_eager']:.2f}x the images/s")
    if ratios["eager_vs_reference"] is not None:
        print(
            f"vs the reference-style model: eager {ratios['eager_vs_reference']:.2f}x its images/s,"
            f" the faster of eager and compiled {ratios['best_vs_reference']:.2f}x"
        )
    if ratios["kept_vs_glibc_malloc"] is not None:
        print(f"freed memory kept vs glibc's malloc defaults: {ratios['kept_vs_glibc_malloc']:.2f}x the images/s")
    if "mask-0.5" in ok and "decoder" in ok:
        masked, unmasked = ok["mask-0.5"], ok["decoder"]
        print(
            f"mask 0.5 vs the same MaskDiT model unmasked: time per step x"
            f"{unmasked['steps_per_s'] / masked['steps_per_s']:.2f}, forward+backward x"
            f"{masked['fwd_bwd_s'] / unmasked['fwd_bwd_s']:.2f}, "
            f"peak memory x{masked['peak_mb'] / max(unmasked['peak_mb'], 1e-9):.2f}"
        )
    return {
        "partial": False,
        "model": f"{args.model} {args.num_experts}E{args.num_experts_per_tok}A",
        "latent": [args.in_channels, args.input_size, args.input_size],
        "device": plain["device"],
        "precision": plain["precision"],
        "params": plain["params"],
        "batch_size": plain["batch_size"],
        "train_gflop_per_image": plain["train_flops_per_image"] / 1e9,
        "gemm_tflops": gemm_rate / 1e12,
        "vendor_peak_tflops": peak / 1e12 if peak else None,
        "ratios": ratios,
        "settings": results,
    }


def images_per_s_ratios(ok: dict[str, dict]) -> dict[str, Optional[float]]:
    """Images/s ratios between the settings that ran (None where one of the pair did not)."""
    speed = {name: r["images_per_s"] for name, r in ok.items()}
    best = max(speed.get("plain", 0.0), speed.get("compiled", 0.0))
    have_ref = "reference" in speed and "plain" in speed
    return {
        "compiled_vs_eager": speed["compiled"] / speed["plain"] if {"compiled", "plain"} <= set(speed) else None,
        "eager_vs_reference": speed["plain"] / speed["reference"] if have_ref else None,
        "best_vs_reference": best / speed["reference"] if have_ref else None,
        "kept_vs_glibc_malloc": speed["plain"] / speed["glibc-malloc"]
        if {"glibc-malloc", "plain"} <= set(speed)
        else None,
    }


if __name__ == "__main__":
    main()
