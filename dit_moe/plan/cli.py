"""The planner's command line: the trainer's own model flags plus the cluster's, a table or `--json`."""

from __future__ import annotations

import argparse
import json
from typing import Any, Optional

from ..cli import run_main
from ..train.flags import add_section_flags
from ..train.sections import ModelSection
from ..utils.errors import UserError
from .cluster import PRECISION_BYTES, ClusterSpec, zero_settings_from_file
from .report import Plan, make_plan, sweep

LATENT_CHANNELS, SD_VAE_DOWNSAMPLE = 4, 8  # SD-VAE latents: 4 channels at --image-size / 8


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dit_moe.plan",
        description="Per-GPU memory, fit, largest micro-batch, checkpoint size and all-to-all traffic of a "
        "DiT-MoE run on a cluster, before booking it.",
    )
    add_section_flags(parser.add_argument_group("model (the trainer's flags)"), "model")
    data = parser.add_argument_group("data (the trainer's flags)")
    add_section_flags(data, "data", only=("image_size", "num_classes"))
    cluster = parser.add_argument_group("cluster")
    cluster.add_argument("--nodes", type=int, default=1)
    cluster.add_argument("--gpus-per-node", "--gpus_per_node", type=int, default=8)
    cluster.add_argument("--gpu-memory", "--gpu_memory", type=float, default=80.0, help="GiB per GPU (default: 80)")
    cluster.add_argument("--zero", type=int, default=2, help="ZeRO stage 1, 2 or 3 (default: 2)")
    cluster.add_argument("--ep-size", "--ep_size", type=int, default=1, help="expert-parallel group size")
    cluster.add_argument(
        "--micro-batch", "--micro_batch", "--train_batch_size", type=int, default=32, help="images per GPU"
    )
    cluster.add_argument("--precision", choices=sorted(PRECISION_BYTES), default="bf16")
    cluster.add_argument("--no-ema", "--no_ema", action="store_true", help="plan without the trainer's fp32 EMA")
    cluster.add_argument("--offload", action="store_true", help="ZeRO-Offload: optimizer state on the host")
    cluster.add_argument("--mfu", type=float, default=0.4, help="model FLOP utilisation for the step time")
    cluster.add_argument("--peak-tflops", "--peak_tflops", type=float, default=989.4, help="dense bf16 peak (H100)")
    cluster.add_argument("--deepspeed-config", "--deepspeed_config", help="read bucket sizes from this JSON")
    cluster.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    cluster.add_argument(
        "--sweep", action="store_true", help="a Markdown table over every ZeRO stage and --ep-size that can run"
    )
    return parser


def plan_from_args(args: argparse.Namespace) -> Plan:
    """The `Plan` the parsed flags describe; bad values raise one sentence."""
    values = vars(args)
    model_values = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith("model.")}
    section = ModelSection(**model_values)
    image_size = values.get("data.image_size") or 256
    if image_size % SD_VAE_DOWNSAMPLE:
        raise UserError(f"--image-size {image_size} is not a multiple of {SD_VAE_DOWNSAMPLE} (the VAE's downsampling).")
    config = section.architecture(
        image_size // SD_VAE_DOWNSAMPLE, LATENT_CHANNELS, values.get("data.num_classes") or 1000
    )
    if args.ep_size > 1 and config.moe is None:
        raise UserError(f"--ep-size {args.ep_size} needs an MoE model; set --num-experts > 0 or use --ep-size 1.")
    if config.moe is not None and config.moe.num_experts % args.ep_size:
        raise UserError(
            f"--ep-size {args.ep_size} does not divide the {config.moe.num_experts} experts; pick a divisor of "
            f"{config.moe.num_experts}."
        )
    cluster = ClusterSpec(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        gpu_memory_gib=args.gpu_memory,
        zero=args.zero,
        ep_size=args.ep_size,
        micro_batch=args.micro_batch,
        precision=args.precision,
        grad_checkpointing=config.grad_checkpointing,
        ema=not args.no_ema,
        offload=args.offload,
        mfu=args.mfu,
        peak_tflops=args.peak_tflops,
        zero_settings=zero_settings_from_file(args.deepspeed_config),
    )
    return Plan(config, cluster, section.model, image_size, section.mask_ratio)


def format_table(result: dict[str, Any]) -> str:
    """The plan as aligned lines a person reads at a glance."""
    model, cluster, memory = result["model"], result["cluster"], result["per_gpu_gib"]
    lines = [
        f"{model['name']} {model['shape']} at {model['image_size']} px on {cluster['nodes']} x "
        f"{cluster['gpus_per_node']} GPUs ({cluster['gpu_memory_gib']:g} GiB), ZeRO-{cluster['zero']}, "
        f"--ep-size {cluster['ep_size']}, micro-batch {cluster['micro_batch']}, {cluster['precision']}",
        f"  parameters        {result['parameters']['total'] / 1e9:.3f} B "
        f"({result['parameters']['expert'] / 1e9:.3f} B in routed experts)",
    ]
    lines += [f"  {name:<17} {memory[name]:8.2f} GiB per GPU" for name in memory]
    verdict = "fits" if result["fits"] else "does NOT fit"
    lines += [
        f"  verdict           {verdict}; largest micro-batch that fits: {result['max_micro_batch']}",
        f"  checkpoint        {result['checkpoint_gib']['per_rank']:.2f} GiB on rank 0, "
        f"{result['checkpoint_gib']['total']:.2f} GiB in all",
        f"  all-to-all        {result['all_to_all_bytes_per_step'] / 2**30:.3f} GiB sent per GPU per micro-batch",
        f"  FLOPs per image   {result['flops_per_image']['training'] / 1e12:.3f} TFLOP (training)",
        f"  step time         {result['step_time_s']:.3f} s per micro-batch at {result['step_time_at_mfu']:.0%} MFU",
    ]
    return "\n".join(lines)


def format_sweep(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of `sweep`'s rows, one per (ZeRO stage, --ep-size)."""
    first = rows[0]
    lines = [
        f"{first['model']['name']} {first['model']['shape']} at {first['model']['image_size']} px, "
        f"{first['cluster']['world_size']} GPUs of {first['cluster']['gpu_memory_gib']:g} GiB, "
        f"{first['cluster']['precision']}, gradient checkpointing {'on' if first['cluster']['grad_checkpointing'] else 'off'}",
        "",
        "| ZeRO | --ep-size | largest micro-batch | model states GiB/GPU | activations GiB/GPU | checkpoint GiB "
        "rank 0 / all | all-to-all GiB/GPU/step | step s at 40% MFU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        memory, cluster = row["per_gpu_gib"], row["cluster"]
        states = memory["total"] - memory["activations"]
        largest = row["max_micro_batch"] or "does not fit"
        lines.append(
            f"| {cluster['zero']} | {cluster['ep_size']} | {largest} | {states:.1f} | {memory['activations']:.1f} | "
            f"{row['checkpoint_gib']['per_rank']:.0f} / {row['checkpoint_gib']['total']:.0f} | "
            f"{row['all_to_all_bytes_per_step'] / 2**30:.2f} | {row['step_time_s']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    def work() -> None:
        args = build_parser().parse_args(argv)
        plan = plan_from_args(args)
        if args.sweep:
            rows = sweep(plan)
            print(json.dumps(rows, indent=2) if args.json else format_sweep(rows))
            return
        result = make_plan(plan)
        print(json.dumps(result, indent=2) if args.json else format_table(result))

    return run_main(work, prog="python -m dit_moe.plan")
