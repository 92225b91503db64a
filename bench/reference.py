"""The reference-style model the benchmarks race against: feizc/DiT-MoE's MoE layer restated.

feizc/DiT-MoE's `SparseMoeBlock` keeps one `MoeMLP` (nn.Linear projections, split in
`pretraining_tp=2` slices) per expert and
  - in training repeats every token k times and runs `y[idx == e] = expert_e(x[idx == e])`,
    one boolean mask per expert;
  - in evaluation (`moe_infer`) sorts the token copies by expert, reads the per-expert counts on
    the host (`bincount().cpu()`), runs each expert on its slice and scatter-adds the weighted rows.
`reference_dit` is our DiT with every MoE layer replaced by `MaskLoopMoE`, the rest of the
block unchanged, so a race against it measures the MoE implementation and nothing else. `load_weights`
gives it our weights through feizc's per-expert keys; it then computes our function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dit_moe.models import DiT
from dit_moe.models.config import DiTConfig, MoEArgs
from dit_moe.models.experts import SwiGLUMLP, unstack_expert_state_dict
from dit_moe.models.router import TopKRouter


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
    """DiT-MoE's SparseMoeBlock (per-expert nn.Linear MLPs; boolean masks in training, `moe_infer` in eval)."""

    def __init__(self, hidden_size: int, intermediate_size: int, args: MoEArgs, pretraining_tp: int = 2) -> None:
        super().__init__()
        self.k = args.num_experts_per_tok
        self.args = args
        self.gate = TopKRouter(hidden_size, args.num_experts, self.k)
        self.experts = nn.ModuleList(
            MoeMLP(hidden_size, intermediate_size, pretraining_tp) for _ in range(args.num_experts)
        )
        self.shared_experts = MoeMLP(hidden_size, args.n_shared_experts * hidden_size, pretraining_tp)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        weights, ids, scores = self.gate(x)
        h = x.reshape(-1, x.shape[-1])  # [N, T, C] -> [M, C]
        flat = ids.reshape(-1)  # [M, k] -> [M * k]
        if not self.training:
            return self.moe_infer(h, flat, weights.reshape(-1, 1)).view(x.shape) + self.shared_experts(x), {}
        h = h.repeat_interleave(self.k, dim=0)  # [M, C] -> [M * k, C]
        y = torch.empty_like(h)
        for e, expert in enumerate(self.experts):
            y[flat == e] = expert(h[flat == e])
        y = (y.view(*weights.shape, -1) * weights.unsqueeze(-1).to(y.dtype)).sum(dim=1)  # -> [M, k, C] -> [M, C]
        ce = F.one_hot(flat, num_classes=self.args.num_experts).float().mean(0)
        aux = (scores.mean(0) * ce * self.args.num_experts).sum() * self.args.aux_loss_coef
        return y.view(x.shape) + self.shared_experts(x), {"moe_aux_loss": aux}

    @torch.no_grad()
    def moe_infer(self, x: torch.Tensor, flat_ids: torch.Tensor, flat_weights: torch.Tensor) -> torch.Tensor:
        """feizc/DiT-MoE's evaluation path: x [M, C], flat_ids [M * k], flat_weights [M * k, 1] -> [M, C]."""
        out = torch.zeros_like(x)
        order = flat_ids.argsort()
        ends = flat_ids.bincount(minlength=len(self.experts)).cpu().numpy().cumsum(0)  # host sync, as there
        token_ids = order // self.k
        start = 0
        for e, end in enumerate(ends):
            if start < end:
                rows = token_ids[start:end]
                expert_out = self.experts[e](x[rows]) * flat_weights[order[start:end]].to(x.dtype)
                out.scatter_reduce_(0, rows.view(-1, 1).repeat(1, x.shape[-1]), expert_out, reduce="sum")
            start = end
        return out


def reference_dit(config: DiTConfig, pretraining_tp: int = 2) -> DiT:
    """Our DiT with every MoE layer replaced by a `MaskLoopMoE`; build it under `torch.device(...)` to place it.
    `load_weights` gives it a model's weights."""
    model = DiT(config)
    hidden, intermediate = config.hidden_size, int(config.hidden_size * config.mlp_ratio)
    for block in model.blocks:
        if block.is_moe:
            block.moe = MaskLoopMoE(hidden, intermediate, config.moe, pretraining_tp)
    return model


def load_weights(reference: DiT, model: DiT) -> DiT:
    """`reference` (from `reference_dit`) with `model`'s weights, stacked experts split into feizc's per-expert keys."""
    reference.load_state_dict(unstack_expert_state_dict(model.state_dict()))
    return reference
