"""Routed experts as stacked weights `[E, ...]`, and DiT-MoE's dense SwiGLU MLP.

`GroupedExperts` runs E feed-forward networks over a token buffer that is already sorted
by expert (see `moe.dispatch`): rows `offsets[e] : offsets[e] + counts[e]` belong to
expert e. Two interchangeable paths compute it:

- grouped GEMM (`torch._grouped_mm`): one kernel per projection, no host sync; used on
  CUDA in bf16/fp16 (`grouped_gemm="auto"`) or wherever asked for (`"on"`);
- a loop of `torch.mm` over contiguous slices: everywhere else; for SwiGLU with a hand-written
  backward that writes gradients in place (`expert_loop.py`).

Each expert slice has the orientation of an nn.Linear weight ([out, in]), so feizc/DiT-MoE's
per-expert keys `experts.K.gate_proj.weight` stack into `experts.gate_proj` directly; a
load-time pre-hook does that, and `stack_/unstack_expert_state_dict` convert whole files.
"""

from __future__ import annotations

import re
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .expert_loop import GradientBuffers, SwiGLUExpertLoop

# Stacked parameter name -> per-expert key suffix (feizc/DiT-MoE `MoeMLP` or DiT's timm `Mlp`).
SWIGLU_KEYS = {"gate_proj": "gate_proj.weight", "up_proj": "up_proj.weight", "down_proj": "down_proj.weight"}
GELU_KEYS = {"fc1_weight": "fc1.weight", "fc1_bias": "fc1.bias", "fc2_weight": "fc2.weight", "fc2_bias": "fc2.bias"}
_PER_EXPERT_SUFFIX = {suffix: name for name, suffix in {**SWIGLU_KEYS, **GELU_KEYS}.items()}
_STACKED_KEY = re.compile(r"^(?P<prefix>(?:.*\.)?experts\.)(?P<name>" + "|".join({**SWIGLU_KEYS, **GELU_KEYS}) + r")$")
_PER_EXPERT_KEY = re.compile(
    r"^(?P<prefix>(?:.*\.)?experts\.)(?P<index>\d+)\.(?P<suffix>" + "|".join(map(re.escape, _PER_EXPERT_SUFFIX)) + r")$"
)


class SwiGLUMLP(nn.Module):
    """down(silu(gate(x)) * up(x)): DiT-MoE's `MoeMLP`, used as the shared expert."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def grouped_mm_available() -> bool:
    """Whether this torch build has `torch._grouped_mm` (added in torch 2.8)."""
    return hasattr(torch, "_grouped_mm")


class GroupedExperts(nn.Module):
    """E experts with stacked weights; SwiGLU (DiT-MoE) or tanh-GELU (dense DiT MLP, for upcycling).

    SwiGLU: `gate_proj` [E, I, C], `up_proj` [E, I, C], `down_proj` [E, C, I], no bias.
    GELU:   `fc1_weight` [E, I, C], `fc1_bias` [E, I], `fc2_weight` [E, C, I], `fc2_bias` [E, C].
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        expert_type: str = "swiglu",
        grouped_gemm: str = "auto",
    ) -> None:
        super().__init__()
        if grouped_gemm == "on" and not grouped_mm_available():
            raise ValueError(
                f"grouped_gemm='on' needs torch._grouped_mm (torch >= 2.8), this is torch {torch.__version__}; "
                "use grouped_gemm='auto' or 'off'."
            )
        self.num_experts = num_experts
        self.expert_type = expert_type
        self.grouped_gemm = grouped_gemm
        E, C, I = num_experts, hidden_size, intermediate_size
        if expert_type == "swiglu":
            self.gate_proj = nn.Parameter(torch.empty(E, I, C))
            self.up_proj = nn.Parameter(torch.empty(E, I, C))
            self.down_proj = nn.Parameter(torch.empty(E, C, I))
        else:
            self.fc1_weight = nn.Parameter(torch.empty(E, I, C))
            self.fc1_bias = nn.Parameter(torch.empty(E, I))
            self.fc2_weight = nn.Parameter(torch.empty(E, C, I))
            self.fc2_bias = nn.Parameter(torch.empty(E, C))
        self.reset_parameters()
        self.register_load_state_dict_pre_hook(_stack_per_expert_keys)
        self.gradient_buffers = GradientBuffers()  # the SwiGLU loop's weight gradients, kept between steps on a CPU

    @property
    def weight_names(self) -> tuple[str, ...]:
        return tuple(SWIGLU_KEYS if self.expert_type == "swiglu" else GELU_KEYS)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Each expert like an nn.Linear under DiT's init: xavier_uniform weights, zero biases."""
        for name in self.weight_names:
            param = getattr(self, name)
            if param.dim() == 2:
                param.zero_()
                continue
            for expert_weight in param:  # xavier on [E, out, in] would mix fans across experts
                nn.init.xavier_uniform_(expert_weight)

    @torch.no_grad()
    def keep_experts(self, first: int, count: int) -> None:
        """Keep only experts `first ... first + count - 1` and free the others (an expert-parallel
        rank's slice); the module then behaves as `count` experts."""
        for name in self.weight_names:
            setattr(self, name, nn.Parameter(getattr(self, name)[first : first + count].clone()))
        self.num_experts = count

    def use_grouped(self, dtype: torch.dtype, device: torch.device) -> bool:
        """Grouped GEMM on CUDA half precision ("auto") or always ("on"), if strides allow it."""
        if self.grouped_gemm == "off" or not grouped_mm_available():
            return False
        if self.grouped_gemm == "auto" and not (device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)):
            return False
        # _grouped_mm needs 16-byte aligned row strides on every operand.
        widths = [getattr(self, name).shape[-1] for name in self.weight_names if getattr(self, name).dim() == 3]
        return all(w * dtype.itemsize % 16 == 0 for w in widths)

    def forward(self, x: Tensor, counts: Tensor, first_expert: int = 0) -> Tensor:
        """Apply experts `first_expert ... first_expert + len(counts) - 1` to x [S, C] sorted by expert.

        `counts` [E_local] (integer, on x's device) gives how many consecutive rows each expert
        takes; their sum must be S. Taking a slice of the stacked weights lets an expert-parallel
        rank run only its local experts. Every expert in the range takes part in autograd even
        with zero rows, so its gradient is a zero tensor, never None (ZeRO reduces need them all).
        """
        local = counts.shape[0]
        weights = [getattr(self, name) for name in self.weight_names]
        if local != self.num_experts:  # a slice's backward zero-pads its gradient to [E, ...]: only when needed
            weights = [w.narrow(0, first_expert, local) for w in weights]
        # Under autocast the matmuls run in the autocast dtype; _grouped_mm is not autocast-aware.
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        if self.use_grouped(dtype, x.device):
            return self._forward_grouped(x.to(dtype), counts, weights)
        return self._forward_loop(x, counts, weights, dtype)

    def _ffn(self, x: Tensor, mm, weights: list[Tensor], bias_rows) -> Tensor:
        """The expert FFN with `mm(x, w)` = x @ w^T per expert and `bias_rows(b)` = bias per row."""
        if self.expert_type == "swiglu":
            gate_proj, up_proj, down_proj = weights
            return mm(F.silu(mm(x, gate_proj)) * mm(x, up_proj), down_proj)
        fc1_weight, fc1_bias, fc2_weight, fc2_bias = weights
        h = F.gelu(mm(x, fc1_weight) + bias_rows(fc1_bias), approximate="tanh")
        return mm(h, fc2_weight) + bias_rows(fc2_bias)

    def _forward_grouped(self, x: Tensor, counts: Tensor, weights: list[Tensor]) -> Tensor:
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)  # [E_local], end row of each expert
        expert_of_row: Optional[Tensor] = None
        if self.expert_type == "gelu":
            expert_of_row = torch.repeat_interleave(
                torch.arange(counts.shape[0], device=x.device), counts, output_size=x.shape[0]
            )  # [S]; output_size avoids a host sync

        def mm(a: Tensor, w: Tensor) -> Tensor:
            return torch._grouped_mm(a, w.to(a.dtype).transpose(-2, -1), offs=offsets)  # [S, in] x [E, in, out]

        def bias_rows(b: Tensor) -> Tensor:
            return b.to(x.dtype).index_select(0, expert_of_row)  # [E, out] -> [S, out]

        return self._ffn(x, mm, weights, bias_rows)

    def _forward_loop(self, x: Tensor, counts: Tensor, weights: list[Tensor], dtype: torch.dtype) -> Tensor:
        sizes = counts.tolist()  # the one host sync of the loop path: slice sizes per expert
        if self.expert_type == "swiglu":  # its products write into buffers (out=), which autocast skips
            return SwiGLUExpertLoop.apply(x.to(dtype), sizes, *(w.to(dtype) for w in weights), self.gradient_buffers)
        # unbind, not w[e]: its backward stacks the E gradients once instead of adding E
        # full-size zero-padded [E, ...] gradients.
        per_expert = zip(*(w.to(x.dtype).unbind(0) for w in weights))
        outputs = [
            self._ffn(rows, lambda a, m: torch.mm(a, m.t()), list(w), lambda b: b)
            for rows, w in zip(x.split(sizes, dim=0), per_expert)
        ]
        return torch.cat(outputs, dim=0)


def _stack_per_expert_keys(module: GroupedExperts, state_dict: dict, prefix: str, *args) -> None:
    """Load-time pre-hook: feizc/DiT-MoE's `{prefix}K.gate_proj.weight` (K = 0..E-1) -> `{prefix}gate_proj`."""
    for name, suffix in {**SWIGLU_KEYS, **GELU_KEYS}.items():
        keys = [f"{prefix}{e}.{suffix}" for e in range(module.num_experts)]
        if all(key in state_dict for key in keys):
            state_dict[prefix + name] = torch.stack([state_dict.pop(key) for key in keys])


def stack_expert_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-expert keys (`...experts.K.gate_proj.weight`, feizc layout) -> stacked (`...experts.gate_proj`)."""
    out: dict[str, Tensor] = {}
    groups: dict[str, dict[int, Tensor]] = {}
    for key, value in state_dict.items():
        match = _PER_EXPERT_KEY.match(key)
        if match is None:
            out[key] = value
            continue
        stacked = match["prefix"] + _PER_EXPERT_SUFFIX[match["suffix"]]
        groups.setdefault(stacked, {})[int(match["index"])] = value
    for stacked, experts in groups.items():
        if sorted(experts) != list(range(len(experts))):
            raise ValueError(f"{stacked}: expert indices {sorted(experts)} are not 0..{len(experts) - 1}.")
        out[stacked] = torch.stack([experts[e] for e in range(len(experts))])
    return out


def unstack_expert_state_dict(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Stacked keys (`...experts.gate_proj`) -> per-expert keys (`...experts.K.gate_proj.weight`, feizc layout)."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        match = _STACKED_KEY.match(key)
        if match is None:
            out[key] = value
            continue
        suffix = {**SWIGLU_KEYS, **GELU_KEYS}[match["name"]]
        for e, expert_value in enumerate(value.unbind(0)):
            out[f"{match['prefix']}{e}.{suffix}"] = expert_value.clone()
    return out
