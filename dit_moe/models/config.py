"""Architecture description of a DiT / DiT-MoE model.

`DiTConfig` is everything needed to rebuild a model: it is saved next to every
checkpoint and export and read back by `dit_moe.checkpoint.load_model`.
`MoEArgs` is the part that shapes the feed-forward layers of MoE blocks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

EXPERT_TYPES = ("swiglu", "gelu")
ATTENTION_BACKENDS = ("sdpa", "flash", "math")


@dataclass
class MoEArgs:
    """Shape and router options of one MoE feed-forward layer (DiT-MoE defaults)."""

    num_experts: int = 8
    num_experts_per_tok: int = 2              # top-k
    # DiT-MoE's checkpoint layout: n_shared_experts=2 is ONE shared SwiGLU expert of
    # intermediate width 2 * hidden. 0 disables shared experts.
    n_shared_experts: int = 2
    expert_type: str = "swiglu"               # "swiglu" (DiT-MoE) or "gelu" (dense DiT MLP, for upcycling)
    mlp_ratio: float = 4.0                    # routed expert intermediate width = mlp_ratio * hidden
    norm_topk_prob: bool = False              # renormalise the k selected weights to sum to 1
    aux_loss_coef: float = 0.01               # load-balancing loss coefficient; 0 disables it
    aux_loss_per_sample: bool = False         # DiT-MoE's "seq_aux": balance within each sample
    z_loss_coef: float = 0.0                  # router z-loss coefficient; 0 disables it
    capacity_factor: Optional[float] = None   # None: dropless; else tokens per expert = cf * k * T / E
    grouped_gemm: str = "auto"                # "auto": grouped GEMM on CUDA half precision; "on" / "off"

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1 for an MoE layer, got {self.num_experts}.")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} must lie in [1, num_experts={self.num_experts}]."
            )
        if self.expert_type not in EXPERT_TYPES:
            raise ValueError(f"expert_type must be one of {EXPERT_TYPES}, got {self.expert_type!r}.")
        if self.n_shared_experts < 0:
            raise ValueError(f"n_shared_experts must be >= 0, got {self.n_shared_experts}.")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be positive or None (dropless), got {self.capacity_factor}.")
        if self.grouped_gemm not in ("auto", "on", "off"):
            raise ValueError(f"grouped_gemm must be 'auto', 'on' or 'off', got {self.grouped_gemm!r}.")


@dataclass
class DiTConfig:
    """Everything that determines a DiT's parameters and forward pass."""

    input_size: int = 32                      # latent (or pixel) side length
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1           # label dropout for classifier-free guidance
    num_classes: int = 1000
    learn_sigma: bool = True                  # output 2 * in_channels (epsilon and variance)
    qk_norm: bool = False                     # LayerNorm over the head dim on q and k (DiT-MoE XL/G)
    attn_backend: str = "sdpa"                # "sdpa" | "flash" (flash-attn package) | "math"
    grad_checkpointing: bool = False
    # MoE: 0 (or None) experts is the dense DiT of facebookresearch/DiT.
    num_experts: Optional[int] = 0
    num_experts_per_tok: int = 2
    n_shared_experts: int = 2
    expert_type: str = "swiglu"
    moe_layers: Optional[list[int]] = None    # block indices that are MoE; None: all blocks
    norm_topk_prob: bool = False
    aux_loss_coef: float = 0.01
    aux_loss_per_sample: bool = False
    z_loss_coef: float = 0.0
    capacity_factor: Optional[float] = None
    grouped_gemm: str = "auto"
    # How the objective feeds time to the network; recorded so samplers use the same.
    objective: str = "iddpm"                  # "iddpm" | "flow"
    flow_t_scale: float = 1.0                 # flow time t in (0,1) is multiplied by this (DiT-MoE: 1)
    # MaskDiT decoder: dense DiT blocks over all tokens after the encoder blocks. 0: none (plain DiT).
    decoder_depth: int = 0                    # MaskDiT: 8
    decoder_hidden_size: int = 512            # MaskDiT: 512
    decoder_num_heads: int = 16               # MaskDiT: 16

    def __post_init__(self) -> None:
        if self.num_experts is None:
            self.num_experts = 0
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}.")
        if self.input_size % self.patch_size:
            raise ValueError(
                f"input_size={self.input_size} is not divisible by patch_size={self.patch_size}; "
                "pick an image size whose latent side is a multiple of the patch size."
            )
        if self.attn_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attn_backend must be one of {ATTENTION_BACKENDS}, got {self.attn_backend!r}.")
        if self.objective not in ("iddpm", "flow"):
            raise ValueError(f"objective must be 'iddpm' or 'flow', got {self.objective!r}.")
        if self.decoder_depth < 0:
            raise ValueError(f"decoder_depth must be >= 0, got {self.decoder_depth}.")
        if self.decoder_depth and self.decoder_hidden_size % self.decoder_num_heads:
            raise ValueError(
                f"decoder_hidden_size={self.decoder_hidden_size} is not divisible by "
                f"decoder_num_heads={self.decoder_num_heads}."
            )
        if self.moe_layers is not None:
            self.moe_layers = sorted(int(i) for i in self.moe_layers)
            bad = [i for i in self.moe_layers if not 0 <= i < self.depth]
            if bad:
                raise ValueError(f"moe_layers {bad} are outside the model's blocks 0..{self.depth - 1}.")
        if self.num_experts:
            self.moe_args()  # validates the MoE options early

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    def is_moe_block(self, index: int) -> bool:
        if not self.num_experts:
            return False
        return self.moe_layers is None or index in self.moe_layers

    def moe_args(self) -> MoEArgs:
        return MoEArgs(
            num_experts=self.num_experts,
            num_experts_per_tok=self.num_experts_per_tok,
            n_shared_experts=self.n_shared_experts,
            expert_type=self.expert_type,
            mlp_ratio=self.mlp_ratio,
            norm_topk_prob=self.norm_topk_prob,
            aux_loss_coef=self.aux_loss_coef,
            aux_loss_per_sample=self.aux_loss_per_sample,
            z_loss_coef=self.z_loss_coef,
            capacity_factor=self.capacity_factor,
            grouped_gemm=self.grouped_gemm,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DiTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown model config keys {unknown}; this file was written by a newer dit-moe.")
        return cls(**values)

    def replace(self, **changes: Any) -> "DiTConfig":
        return dataclasses.replace(self, **changes)

