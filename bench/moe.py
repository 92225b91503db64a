"""Forward+backward time of the MoE feed-forward against DiT-MoE's training path and a dense FFN.

    python bench/moe.py [--tokens 2048] [--repeats 7] [--threads 2] [--device cpu]

For DiT-MoE-S (C=384) and -B (C=768) widths, 8 experts, top-2, one shared expert of width 2C:
  ours       MoEFeedForward (loop path on CPU/fp32; grouped GEMM where "auto" picks it)
  ours-gmm   MoEFeedForward with grouped_gemm="on" (torch._grouped_mm), where available
  mask-loop  feizc/DiT-MoE's training path: repeat_interleave the tokens, then
             `y[idx == e] = expert_e(x[idx == e])` per expert (its MoeMLP with pretraining_tp=1)
  dense      a SwiGLU FFN with the same active FLOPs: width k * I + shared width
Prints the median time of each and the ratios mask-loop / ours (speed-up) and ours / dense (overhead).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from dit_moe.models.config import MoEArgs
from dit_moe.models.experts import SwiGLUMLP, grouped_mm_available
from dit_moe.models.moe import MoEFeedForward
from dit_moe.models.router import TopKRouter


class MaskLoopMoE(nn.Module):
    """DiT-MoE's SparseMoeBlock training forward (per-expert nn.Linear MLPs, boolean masks)."""

    def __init__(self, hidden_size: int, args: MoEArgs) -> None:
        super().__init__()
        self.k = args.num_experts_per_tok
        self.args = args
        intermediate = int(args.mlp_ratio * hidden_size)
        self.gate = TopKRouter(hidden_size, args.num_experts, self.k)
        self.experts = nn.ModuleList(SwiGLUMLP(hidden_size, intermediate) for _ in range(args.num_experts))
        self.shared_experts = SwiGLUMLP(hidden_size, args.n_shared_experts * hidden_size)

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
        width = args.num_experts_per_tok * int(args.mlp_ratio * hidden_size) + args.n_shared_experts * hidden_size
        self.mlp = SwiGLUMLP(hidden_size, width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.mlp(x), {}


def time_fwd_bwd(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, repeats: int, warmup: int = 2) -> float:
    """Median seconds of one forward + backward (output cotangent `grad`, plus the aux losses)."""
    times = []
    for i in range(warmup + repeats):
        module.zero_grad(set_to_none=True)
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        y, aux = module(x)
        loss = (y * grad).sum() + sum(aux.values())
        loss.backward()
        if x.is_cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


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
    print(f"device: {name}; torch {torch.__version__}; {args.tokens} tokens, {args.dtype}, median of {args.repeats}")
    for label, hidden in (("DiT-MoE-S", 384), ("DiT-MoE-B", 768)):
        moe_args = MoEArgs(num_experts=8, num_experts_per_tok=2, n_shared_experts=2)
        torch.manual_seed(0)
        x = torch.randn(args.tokens // 256, 256, hidden, device=device, dtype=dtype)  # [N, T, C]
        grad = torch.randn_like(x)
        modules = {
            "ours": MoEFeedForward(hidden, moe_args),
            "mask-loop": MaskLoopMoE(hidden, moe_args),
            "dense": DenseFFN(hidden, moe_args),
        }
        if grouped_mm_available():
            modules["ours-gmm"] = MoEFeedForward(hidden, MoEArgs(**{**vars(moe_args), "grouped_gemm": "on"}))
        times = {key: time_fwd_bwd(m.to(device, dtype).train(), x, grad, args.repeats) for key, m in modules.items()}
        line = "  ".join(f"{key} {1e3 * t:.1f} ms" for key, t in times.items())
        print(f"{label} (C={hidden}): {line}")
        print(f"    speed-up over mask-loop: {times['mask-loop'] / times['ours']:.2f}x"
              f"   overhead over dense: {times['ours'] / times['dense']:.2f}x"
              + (f"   grouped: speed-up {times['mask-loop'] / times['ours-gmm']:.2f}x,"
                 f" overhead {times['ours-gmm'] / times['dense']:.2f}x" if "ours-gmm" in times else ""))


if __name__ == "__main__":
    main()
