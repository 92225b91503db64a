"""Forward+backward time of the MoE feed-forward against DiT-MoE's training path and a dense FFN.

    python bench/moe.py [--tokens 2048] [--repeats 7] [--threads 2] [--device cpu] [--widths S,B]
    python bench/moe.py --device cuda --dtype bfloat16 --widths XL --tokens 16384 --json moe.json

At the widths of the --widths presets (DiT-MoE-S: C=384, -B: C=768, -XL: C=1152), 8 experts, top-2,
one shared expert of width 2C:
  grouped    MoEFeedForward with grouped_gemm="on" (torch._grouped_mm), where this torch has it
  loop       MoEFeedForward with grouped_gemm="off": one torch.mm per expert slice
  mask-loop  feizc/DiT-MoE's training path (bench/reference.py): repeat_interleave the tokens, then
             `y[idx == e] = expert_e(x[idx == e])` per expert, with its MoeMLP as written
             (projections split in pretraining_tp=2 slices)
  mask-loop-tp1  the same with unsplit projections (a stricter baseline: same matmuls as ours)
  dense      a SwiGLU FFN with the same active FLOPs: width k * I + shared width
Our layer runs `grouped` on CUDA in bf16/fp16 and `loop` elsewhere (grouped_gemm="auto").
Prints the median time of each (variants timed in turns, after one warm-up round) and the ratios,
then the FLOP accounting (dit_moe.models.flops: router, routed experts at top-k, shared expert; forward +
backward = 3x forward): achieved TFLOP/s of each variant, as a fraction of the square-GEMM rate
measured in the same run (and, on a GPU, of the vendor's dense bf16 peak), and the compute bound:
the shortest time any implementation could take at the square-GEMM rate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time

import torch
from torch import nn

from dit_moe.models import MODEL_SIZES
from dit_moe.models import flops as flop_count
from dit_moe.models.config import MoEArgs
from dit_moe.models.experts import GroupedExperts, SwiGLUMLP, grouped_mm_available
from dit_moe.models.moe import MoEFeedForward
from dit_moe.utils.host_memory import keep_freed_memory

from common import in_turns
from reference import MaskLoopMoE

MLP_RATIO = 4.0  # DiT-MoE: routed expert width = 4 x hidden
TOKENS_PER_SAMPLE = 256  # 256 px images: 32x32 latents, patch 2


class DenseFFN(nn.Module):
    """SwiGLU FFN whose FLOPs equal the MoE's active ones (k routed experts + the shared one)."""

    def __init__(self, hidden_size: int, args: MoEArgs) -> None:
        super().__init__()
        width = args.num_experts_per_tok * int(MLP_RATIO * hidden_size) + args.n_shared_experts * hidden_size
        self.mlp = SwiGLUMLP(hidden_size, width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.mlp(x), {}


def fwd_bwd_seconds(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    """Seconds of one forward + backward (output cotangent `grad`, plus the aux losses)."""
    module.zero_grad(set_to_none=True)
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    y, aux = module(x)
    ((y * grad).sum() + sum(aux.values())).backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def time_round_robin(
    modules: dict[str, nn.Module], x: torch.Tensor, grad: torch.Tensor, repeats: int
) -> dict[str, float]:
    """Median seconds per module over `repeats` rounds in turns (`common.in_turns`), after one warm-up round."""
    runs = {key: (lambda module=module: fwd_bwd_seconds(module, x, grad)) for key, module in modules.items()}
    in_turns(runs, 1)
    return {key: statistics.median(values) for key, values in in_turns(runs, repeats).items()}


def layer_flops(tokens: int, hidden: int, args: MoEArgs) -> int:
    """Matmul FLOPs of the layer's forward + backward over `tokens` tokens."""
    ffn = flop_count.block_ffn_flops(hidden, int(MLP_RATIO * hidden), args, tokens)
    return flop_count.TRAINING_FACTOR * sum(ffn.values())


def variants(hidden: int, args: MoEArgs) -> dict[str, nn.Module]:
    intermediate = int(MLP_RATIO * hidden)
    modules = {}
    if grouped_mm_available():
        modules["grouped"] = MoEFeedForward(hidden, intermediate, dataclasses.replace(args, grouped_gemm="on"))
    modules["loop"] = MoEFeedForward(hidden, intermediate, dataclasses.replace(args, grouped_gemm="off"))
    modules["mask-loop"] = MaskLoopMoE(hidden, intermediate, args, pretraining_tp=2)
    modules["mask-loop-tp1"] = MaskLoopMoE(hidden, intermediate, args, pretraining_tp=1)
    modules["dense"] = DenseFFN(hidden, args)
    return modules


def bench_width(label: str, hidden: int, args, device: torch.device, dtype: torch.dtype, gemm_rate: float, peak):
    moe_args = MoEArgs(num_experts=8, num_experts_per_tok=2, n_shared_experts=2)
    torch.manual_seed(0)
    x = torch.randn(
        args.tokens // TOKENS_PER_SAMPLE, TOKENS_PER_SAMPLE, hidden, device=device, dtype=dtype
    )  # [N, T, C]
    grad = torch.randn_like(x)
    modules = variants(hidden, moe_args)
    for module in modules.values():
        module.to(device, dtype).train()
    t = time_round_robin(modules, x, grad, args.repeats)
    ours = "grouped" if "grouped" in t and GroupedExperts(1, hidden, 1).use_grouped(dtype, device) else "loop"  # "auto"
    flops = layer_flops(args.tokens, hidden, moe_args)
    floor = flops / gemm_rate
    result = {
        "hidden": hidden,
        "ours": ours,
        "ms": {key: 1e3 * v for key, v in t.items()},
        "speedup_vs_mask_loop": {key: t["mask-loop"] / v for key, v in t.items()},
        "gflop": flops / 1e9,
        "utilisation": {key: flop_count.utilisation(flops / v, gemm_rate, peak) for key, v in t.items()},
        "compute_bound_ms": 1e3 * floor,
    }
    print(
        f"{label} (C={hidden}) [load average {os.getloadavg()[0]:.2f}]: "
        + "  ".join(f"{k} {1e3 * v:.2f} ms" for k, v in t.items())
    )
    for key in t:
        u = result["utilisation"][key]
        mfu = f", {100 * u['mfu']:.0f}% of the vendor peak" if u["mfu"] is not None else ""
        print(
            f"    {key:>13}: {t['mask-loop'] / t[key]:5.2f}x faster than mask-loop, {u['tflops']:.3f} TFLOP/s,"
            f" {100 * u['of_gemm']:.0f}% of the square-GEMM rate{mfu}"
        )
    print(
        f"    ours ({ours}) is {t['mask-loop-tp1'] / t[ours]:.2f}x faster than mask-loop-tp1 and takes"
        f" {t[ours] / t['dense']:.2f}x the time of dense; {flops / 1e9:.1f} GFLOP per forward+backward: at the"
        f" square-GEMM rate {1e3 * floor:.2f} ms, {t['mask-loop'] / floor:.2f}x faster than mask-loop"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048, help=f"a multiple of {TOKENS_PER_SAMPLE}")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--widths", default="S,B", help=f"comma-separated sizes of {sorted(MODEL_SIZES)}")
    parser.add_argument(
        "--gemm-size", type=int, default=None, help="side of the square GEMM (default 8192 on CUDA, 2048 on CPU)"
    )
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cpu":
        keep_freed_memory()  # as the trainer and the sampler do
    name = flop_count.device_name(device, args.threads)
    gemm_rate, peak = flop_count.measure_gemm_rate(device, dtype, args.gemm_size), flop_count.vendor_peak(name)
    print(
        f"device: {name}; torch {torch.__version__}; {args.tokens} tokens, {args.dtype}, median of {args.repeats};"
        f" square GEMM {gemm_rate / 1e12:.3f} TFLOP/s"
        + (f", vendor dense bf16 peak {peak / 1e12:.0f} TFLOP/s" if peak else "")
        + f"; load average before: {os.getloadavg()[0]:.2f}"
    )
    widths = {}
    for label in args.widths.split(","):
        hidden = MODEL_SIZES[label][1]
        widths[f"DiT-MoE-{label}"] = bench_width(f"DiT-MoE-{label}", hidden, args, device, dtype, gemm_rate, peak)
    if args.json:
        report = {
            "device": name,
            "torch": torch.__version__,
            "dtype": args.dtype,
            "tokens": args.tokens,
            "gemm_tflops": gemm_rate / 1e12,
            "vendor_peak_tflops": peak / 1e12 if peak else None,
            "widths": widths,
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
