"""Architecture description of a DiT / DiT-MoE model.

`DiTConfig` is everything needed to rebuild a model: it is saved next to every checkpoint and
export and read back by `dit_moe.checkpoint.load_model`. Its `moe` (a `MoEArgs`, or None for the
dense DiT of facebookresearch/DiT) shapes the feed-forward layers of the MoE blocks. Each field is
declared once, here, with its default and a trailing comment: the trainer's flags, YAML keys and
`--help` are generated from these two classes.

How a model is trained (objective, noise schedule, time scale) is not architecture: it lives in
`dit_moe.diffusion.ObjectiveConfig`, saved beside this one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

EXPERT_TYPES = ("swiglu", "gelu")
ATTENTION_BACKENDS = ("sdpa", "flash", "math")
GROUPED_GEMM_MODES = ("auto", "on", "off")
ROUTERS = ("topk", "expert-choice", "sigmoid-bias")
# Fields that change how a model trains or runs, not what its weights compute: a run that continues or
# starts from a checkpoint takes them from its flags; every other field is the checkpoint's.
TRAINING_ONLY_FIELDS = (
    "grad_checkpointing",
    "attn_backend",
    "grouped_gemm",
    "aux_loss_coef",
    "aux_loss_per_sample",
    "z_loss_coef",
    "capacity_factor",
    "class_dropout_prob",
    "bias_update_rate",
)
# Load-balancing loss coefficient when none is given: DiT-MoE's for top-k; none for the routers that balance
# otherwise (sigmoid-bias by its bias; DeepSeek-V3's own sequence-wise term is 1e-4, pass it to have it).
DEFAULT_AUX_LOSS_COEF = {"topk": 0.01}


@dataclass
class MoEArgs:
    """Shape, placement and router options of the MoE feed-forward layers (DiT-MoE defaults)."""

    num_experts: int = 8  # routed experts per MoE layer; as a flag or DiT_models keyword, 0: dense DiT
    num_experts_per_tok: int = 2  # top-k: experts each token is routed to
    # DiT-MoE's checkpoint layout: n_shared_experts=2 is ONE shared SwiGLU expert of
    # intermediate width 2 * hidden. 0 disables shared experts.
    n_shared_experts: int = 2  # shared expert width in multiples of hidden (DiT-MoE: 2); 0: none
    # DeepSeek-MoE's layout: this many shared experts, each as wide as a routed expert (fused into
    # one SwiGLU of their summed width). Set, it replaces n_shared_experts' width.
    num_shared_experts: Optional[int] = None  # shared experts of routed-expert width; None: n_shared_experts' layout
    expert_width_ratio: float = 1.0  # routed expert width = mlp_ratio * hidden * this (< 1: fine-grained experts)
    router: str = "topk"  # "topk" (DiT-MoE), "expert-choice" (EC-DiT) or "sigmoid-bias" (DeepSeek-V3)
    bias_update_rate: float = 1e-3  # sigmoid-bias router: u in bias += u * sign(mean load - load), per step
    expert_type: str = "swiglu"  # "swiglu" (DiT-MoE) or "gelu" (dense DiT MLP, for upcycling)
    moe_layers: Optional[list[int]] = None  # block indices that are MoE; None: every block
    norm_topk_prob: bool = False  # renormalise the k selected weights to sum to 1
    # None: the router's default, 0.01 for topk (DiT-MoE), 0 for sigmoid-bias (balanced by its bias) and expert-choice.
    aux_loss_coef: Optional[float] = None  # load-balancing loss coefficient (default 0.01 topk, 0 others); 0: off
    aux_loss_per_sample: bool = False  # DiT-MoE's "seq_aux": balance within each sample
    z_loss_coef: float = 0.0  # router z-loss coefficient; 0 disables it
    capacity_factor: Optional[float] = None  # None: dropless (expert-choice: 1); else cf * k * T / E per expert
    grouped_gemm: str = "auto"  # "auto": grouped GEMM on CUDA half precision; "on" / "off"

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
        if self.num_shared_experts is not None and self.num_shared_experts < 0:
            raise ValueError(f"num_shared_experts must be >= 0 or None, got {self.num_shared_experts}.")
        if self.expert_width_ratio <= 0:
            raise ValueError(f"expert_width_ratio must be positive, got {self.expert_width_ratio}.")
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {self.router!r}.")
        if self.aux_loss_coef is None:
            self.aux_loss_coef = DEFAULT_AUX_LOSS_COEF.get(self.router, 0.0)
        if self.bias_update_rate < 0:
            raise ValueError(f"bias_update_rate must be >= 0, got {self.bias_update_rate}.")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be positive or None (dropless), got {self.capacity_factor}.")
        if self.grouped_gemm not in GROUPED_GEMM_MODES:
            raise ValueError(f"grouped_gemm must be one of {GROUPED_GEMM_MODES}, got {self.grouped_gemm!r}.")
        if self.moe_layers is not None:
            self.moe_layers = sorted(int(i) for i in self.moe_layers)


MOE_FIELDS = tuple(f.name for f in dataclasses.fields(MoEArgs))
# Keys of the flat layout every config before the nested one used (and DiT_models' keyword arguments).
_LEGACY_OBJECTIVE_KEYS = ("objective", "flow_t_scale")
_LEGACY_QK_NORM_EPS = 1e-5  # what files of the flat layout, which record no eps, were built with (torch's default)


@dataclass
class DiTConfig:
    """Everything that determines a DiT's parameters and forward pass."""

    input_size: int = 32  # latent (or pixel) side length
    patch_size: int = 2  # patch side p (the --model preset's unless given)
    in_channels: int = 4
    hidden_size: int = 1152  # token width (the --model preset's unless given)
    depth: int = 28  # transformer blocks (the --model preset's unless given)
    num_heads: int = 16  # attention heads (the --model preset's unless given)
    mlp_ratio: float = 4.0  # feed-forward width / hidden, dense MLPs and routed experts alike
    class_dropout_prob: float = 0.1  # label dropout for classifier-free guidance
    num_classes: int = 1000
    learn_sigma: bool = True  # output 2 * in_channels (epsilon and variance)
    qk_norm: bool = False  # LayerNorm over the head dim on q and k (DiT-MoE's flash block)
    qk_norm_eps: float = 1e-6  # epsilon of the q/k LayerNorms (DiT-MoE's flash block: 1e-6)
    attn_backend: str = "sdpa"  # "sdpa" | "flash" (flash-attn package) | "math"
    grad_checkpointing: bool = False  # recompute each block in backward (saves activation memory)
    moe: Optional[MoEArgs] = None  # None: the dense DiT of facebookresearch/DiT
    # MaskDiT decoder: dense DiT blocks over all tokens after the encoder blocks. 0: none (plain DiT).
    decoder_depth: int = 0  # MaskDiT decoder blocks (MaskDiT: 8); 0: no decoder
    decoder_hidden_size: int = 512  # MaskDiT decoder width (MaskDiT: 512)
    decoder_num_heads: int = 16  # MaskDiT decoder heads (MaskDiT: 16)

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEArgs(**self.moe)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}.")
        if self.input_size % self.patch_size:
            raise ValueError(
                f"input_size={self.input_size} is not divisible by patch_size={self.patch_size}; "
                "pick an image size whose latent side is a multiple of the patch size."
            )
        if self.attn_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attn_backend must be one of {ATTENTION_BACKENDS}, got {self.attn_backend!r}.")
        if self.decoder_depth < 0:
            raise ValueError(f"decoder_depth must be >= 0, got {self.decoder_depth}.")
        if self.decoder_depth and self.decoder_hidden_size % self.decoder_num_heads:
            raise ValueError(
                f"decoder_hidden_size={self.decoder_hidden_size} is not divisible by "
                f"decoder_num_heads={self.decoder_num_heads}."
            )
        if self.moe is not None and self.moe.moe_layers is not None:
            bad = [i for i in self.moe.moe_layers if not 0 <= i < self.depth]
            if bad:
                raise ValueError(f"moe_layers {bad} are outside the model's blocks 0..{self.depth - 1}.")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_experts(self) -> int:
        """Routed experts per MoE layer; 0 for the dense DiT."""
        return self.moe.num_experts if self.moe is not None else 0

    @property
    def moe_shape(self) -> str:
        """DiT-MoE's name for the feed-forward shape: "8E2A" (8 experts, 2 active), or "dense"."""
        return f"{self.moe.num_experts}E{self.moe.num_experts_per_tok}A" if self.moe is not None else "dense"

    def is_moe_block(self, index: int) -> bool:
        if self.moe is None:
            return False
        return self.moe.moe_layers is None or index in self.moe.moe_layers

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_flat(cls, **values: Any) -> "DiTConfig":
        """A config from one flat set of keyword arguments, MoE fields among them (DiT_models' and the
        trainer's flags): `num_experts` 0 or None is the dense model, any other MoE field shapes `moe`."""
        moe_values = {key: values.pop(key) for key in MOE_FIELDS if key in values}
        if "moe" in values:
            if moe_values:
                raise ValueError(f"Pass either moe=MoEArgs(...) or the flat MoE fields {sorted(moe_values)}, not both.")
            return cls(**values)
        if moe_values.get("num_experts", MoEArgs.num_experts if moe_values else 0):
            values["moe"] = MoEArgs(**moe_values)
        return cls(**values)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DiTConfig":
        """Read a stored config: the nested layout, or the flat one of files written before it
        (MoE fields at the top level, `objective` / `flow_t_scale` beside them, which
        `dit_moe.diffusion.ObjectiveConfig.from_legacy_model_dict` reads)."""
        if "moe" in values:
            _check_keys(values)
            return cls(**values)
        flat = {k: v for k, v in values.items() if k not in _LEGACY_OBJECTIVE_KEYS}
        flat.setdefault("qk_norm_eps", _LEGACY_QK_NORM_EPS)
        if not flat.get("num_experts"):
            flat = {k: v for k, v in flat.items() if k not in MOE_FIELDS}
        _check_keys(flat, also=MOE_FIELDS)
        return cls.from_flat(**flat)

    def flat_dict(self) -> dict[str, Any]:
        """Every field in the flat layout of DiT_models' keywords: MoE fields beside the others
        (`num_experts` 0 and no other MoE field for the dense DiT)."""
        flat = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "moe"}
        return {**flat, **(dataclasses.asdict(self.moe) if self.moe is not None else {"num_experts": 0})}

    def replace(self, **changes: Any) -> "DiTConfig":
        """A copy with fields changed; flat MoE fields (num_experts, aux_loss_coef, ...) change `moe`."""
        flat = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "moe"}
        if "moe" in changes:
            return dataclasses.replace(self, **changes)
        moe = dataclasses.asdict(self.moe) if self.moe is not None else {"num_experts": 0}
        moe_changes = {key: changes.pop(key) for key in MOE_FIELDS if key in changes}
        return DiTConfig.from_flat(**{**flat, **changes, **moe, **moe_changes})


def _check_keys(values: dict[str, Any], also: tuple[str, ...] = ()) -> None:
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(DiTConfig)} - set(also))
    if unknown:
        raise ValueError(f"Unknown model config keys {unknown}; this file was written by a newer dit-moe.")
