"""Forward+backward time of the MoE feed-forward against DiT-MoE's training path and a dense FFN.

    python bench/moe.py [--tokens 2048] [--repeats 7] [--threads 2] [--device cpu]

For DiT-MoE-S (C=384) and -B (C=768) widths, 8 experts, top-2, one shared expert of width 2C:
  ours       MoEFeedForward (loop path on CPU/fp32; grouped GEMM where "auto" picks it)
  ours-gmm   MoEFeedForward with grouped_gemm="on" (torch._grouped_mm), where available
  mask-loop  feizc/DiT-MoE's training path: repeat_interleave the tokens, then
             `y[idx == e] = expert_e(x[idx == e])` per expert, with its MoeMLP as written
             (projections split in pretraining_tp=2 slices)
  mask-loop-tp1  the same with unsplit projections (a stricter baseline: same matmuls as ours)
  dense      a SwiGLU FFN with the same active FLOPs: width k * I + shared width
Prints the median time of each (variants timed in turns, after one warm-up round) and the ratios,
then the compute bound: the layer's matmul FLOPs (forward + backward = 3x forward) at the best
throughput this device reaches on a large square GEMM in the same run, i.e. the shortest time any
implementation could take, and so the largest speed-up over mask-loop that is possible at all.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from dit_moe.models.config import MoEArgs
from dit_moe.models.experts import SwiGLUMLP, grouped_mm_available
from dit_moe.models.moe import MoEFeedForward
from dit_moe.models.router import TopKRouter

MLP_RATIO = 4.0  # DiT-MoE: routed expert width = 4 x hidden


class MoeMLP(SwiGLUMLP):
    """feizc/DiT-MoE's MoeMLP: SwiGLU whose projections are split in `pretraining_tp` slices (2 there)."""

    def __init__(self, hidden_size: int, intermediate_size: int, pretraining_tp: int) -> None:
        super().__init__(hidden_size, intermediate_size)
        self.tp = pretraining_tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp == 1:
            return super().forward(x)
        gate = torch.cat([F.linear(x, w) for w in self.gate_proj.weight.chunk(self.tp, dim=0)], dim=-1)
        up = torch.cat([F.linear(x, w) for w in self.up_proj.weight.chunk(self.tp, dim=0)], dim=-1)
        h = (F.silu(gate) * up).chunk(self.tp, dim=-1)
        return sum(F.linear(h_i, w) for h_i, w in zip(h, self.down_proj.weight.chunk(self.tp, dim=1)))


class MaskLoopMoE(nn.Module):
    """DiT-MoE's SparseMoeBlock training forward (per-expert nn.Linear MLPs, boolean masks)."""

    def __init__(self, hidden_size: int, args: MoEArgs, pretraining_tp: int = 2) -> None:
        super().__init__()
        self.k = args.num_experts_per_tok
        self.args = args
        intermediate = int(MLP_RATIO * hidden_size)
        self.gate = TopKRouter(hidden_size, args.num_experts, self.k)
        self.experts = nn.ModuleList(MoeMLP(hidden_size, intermediate, pretraining_tp) for _ in range(args.num_experts))
        self.shared_experts = MoeMLP(hidden_size, args.n_shared_experts * hidden_size, pretraining_tp)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        weights, ids, scores = self.gate(x)
        h = x.reshape(-1, x.shape[-1]).repeat_interleave(self.k, dim=0)  # [M, C] -> [M * k, C]
        flat = ids.reshape(-1)
        y = torch.empty_like(h)
        for e, expert in enumerate(self.experts):
            y[flat == e] = expert(h[flat == e])
        y = (y.view(*weights.shape, -1) * weights.unsqueeze(-1)).sum(dim=1)  # [M * k, C] -> [M, k, C] -> [M, C]
        ce = F.one_hot(flat, num_classes=self.args.num_experts).float().mean(0)
        aux = (scores.mean(0) * ce * self.args.num_experts).sum() * self.args.aux_loss_coef
        return y.view(x.shape) + self.shared_experts(x), {"moe_aux_loss": aux}


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
    """Median seconds per module; the modules take turns so that a load change on a shared
    machine hits all of them alike and the ratios stay meaningful."""
    times: dict[str, list[float]] = {key: [] for key in modules}
    for i in range(repeats + 1):  # round 0 warms up
        for key, module in modules.items():
            seconds = fwd_bwd_seconds(module, x, grad)
            if i:
                times[key].append(seconds)
    return {key: statistics.median(values) for key, values in times.items()}


def active_flops(tokens: int, hidden: int, args: MoEArgs) -> float:
    """Matmul FLOPs of forward + backward: k routed SwiGLU experts and the shared one per token, plus the router."""
    routed = args.num_experts_per_tok * 3 * hidden * int(MLP_RATIO * hidden)
    shared = 3 * hidden * args.n_shared_experts * hidden
    router = hidden * args.num_experts
    return 3 * 2 * tokens * (routed + shared + router)


def gemm_peak_flops(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a large square matmul: the practical ceiling of this device and dtype."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(
        f"device: {name}; torch {torch.__version__}; {args.tokens} tokens, {args.dtype}, median of {args.repeats};"
        f" load average before: {os.getloadavg()[0]:.2f}"
    )
    for label, hidden in (("DiT-MoE-S", 384), ("DiT-MoE-B", 768)):
        moe_args = MoEArgs(num_experts=8, num_experts_per_tok=2, n_shared_experts=2)
        torch.manual_seed(0)
        x = torch.randn(args.tokens // 256, 256, hidden, device=device, dtype=dtype)  # [N, T, C]
        grad = torch.randn_like(x)
        modules = {
            "ours": MoEFeedForward(hidden, int(MLP_RATIO * hidden), moe_args),
            "mask-loop": MaskLoopMoE(hidden, moe_args, pretraining_tp=2),
            "mask-loop-tp1": MaskLoopMoE(hidden, moe_args, pretraining_tp=1),
            "dense": DenseFFN(hidden, moe_args),
        }
        if grouped_mm_available():
            modules["ours-gmm"] = MoEFeedForward(
                hidden, int(MLP_RATIO * hidden), dataclasses.replace(moe_args, grouped_gemm="on")
            )
        for module in modules.values():
            module.to(device, dtype).train()
        t = time_round_robin(modules, x, grad, args.repeats)
        print(
            f"{label} [load average {os.getloadavg()[0]:.2f}] (C={hidden}): "
            + "  ".join(f"{key} {1e3 * v:.1f} ms" for key, v in t.items())
        )
        print(
            f"    ours: {t['mask-loop'] / t['ours']:.2f}x faster than mask-loop,"
            f" {t['mask-loop-tp1'] / t['ours']:.2f}x faster than mask-loop-tp1,"
            f" {t['ours'] / t['dense']:.2f}x the time of dense"
        )
        if "ours-gmm" in t:
            print(
                f"    ours-gmm: {t['mask-loop'] / t['ours-gmm']:.2f}x faster than mask-loop,"
                f" {t['ours-gmm'] / t['dense']:.2f}x the time of dense"
            )
        flops, peak = active_flops(args.tokens, hidden, moe_args), gemm_peak_flops(device, dtype)
        floor = flops / peak
        print(
            f"    compute bound: {flops / 1e9:.1f} GFLOP per forward+backward; ours {flops / t['ours'] / 1e9:.0f},"
            f" mask-loop {flops / t['mask-loop'] / 1e9:.0f}, dense {flops / t['dense'] / 1e9:.0f} GFLOP/s;"
            f" square-GEMM ceiling {peak / 1e9:.0f} GFLOP/s -> at best {1e3 * floor:.1f} ms,"
            f" {t['mask-loop'] / floor:.2f}x faster than mask-loop"
        )


if __name__ == "__main__":
    main()
