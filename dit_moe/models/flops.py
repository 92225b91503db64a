"""FLOP accounting of a DiT / DiT-MoE from its config, and the rates achieved FLOP/s are judged against.

Counts are matmul FLOPs (2 per multiply-add) of one image's forward pass, component by component:

    patch_embed   stride-p convolution: 2 T C (in_channels p^2)
    embedders     timestep MLP: 2 (256 C + C^2); the label embedding is a lookup (0)
    adaln         every adaLN modulation: 2 C (6 C) per block, 2 C (2 C) for the final layer
    attention     qkv + proj: 2 T (4 C^2); scores and values: 2 (2 T^2 C)
    mlp           dense blocks' MLP: 2 T (2 C I)
    router        2 T C E (fp32 logits); in training with a z-loss, twice (the loss recomputes them)
    experts       routed experts: 2 T a (3 C I_e) for SwiGLU, 2 T a (2 C I_e) for GELU
    shared        the shared SwiGLU expert of width I_s: 2 T (3 C I_s)
    final_layer   2 T C (p^2 out_channels)

with T tokens, C width, I = mlp_ratio C, E experts, k = num_experts_per_tok. The widths come from the
built layer (moe.MoEFeedForward): I_e = int(I expert_width_ratio), and I_s = n_shared_experts C
(DiT-MoE's layout) or num_shared_experts I_e (DeepSeek-MoE's). `a` is the expert copies per token
the routed experts process (`routed_experts_per_token`):
    token choice (topk, sigmoid-bias), dropless          a = k
    token choice with capacity factor cf                 a <= min(1, cf) k (drops depend on the data: an upper bound)
    expert choice, training, M tokens routed together    a = E min(M, ceil(cf M k / E)) / M  (-> cf k for large M)
    expert choice, eval (threshold)                      measured: pass `experts_per_token`
                                                         (moe.ExpertsPerTokenMeter); nominally min(E, cf k)
MaskDiT's encoder blocks see the visible tokens, its decoder bridge and blocks see all T at the
decoder width.
Normalisation, activations, softmax and top-k are elementwise and not counted, as in the MFU
convention (PaLM, appendix B). Training is 3x the forward (backward: gradients of inputs and of
weights); a guided sampling step is 2x (one forward over [cond; uncond]).
"""

from __future__ import annotations

import math
import time
from typing import Optional, Sequence, Union

import torch

from .config import DiTConfig, MoEArgs
from .moe import expert_widths

# Expert copies per token: one number for every MoE layer, or one per MoE layer (in block order).
ExpertsPerToken = Union[float, Sequence[float], None]

TIMESTEP_FEATURES = 256  # TimestepEmbedder's frequency_embedding_size
TRAINING_FACTOR = 3
GUIDED_FACTOR = 2
# Vendor dense (not 2:4 sparse) bf16 tensor-core peaks in FLOP/s, by a substring of torch's device
# name; the first match wins, so the more specific names come first.
VENDOR_BF16_DENSE_PEAK = (
    ("H200 NVL", 835e12),
    ("H200", 989.4e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989.4e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("GH200", 989.4e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
)


def routed_experts_per_token(moe: MoEArgs, routed_tokens: Optional[int] = None) -> float:
    """Expert copies per token the routed experts process (the module docstring's `a`).

    `routed_tokens` (M, the micro-batch's N x T): expert choice in training, whose capacity is
    taken over the tokens routed together; None gives the large-batch value min(E, cf k).
    """
    E, k = moe.num_experts, moe.num_experts_per_tok
    if moe.router != "expert-choice":
        return k if moe.capacity_factor is None else min(1.0, moe.capacity_factor) * k
    cf = 1.0 if moe.capacity_factor is None else moe.capacity_factor
    if routed_tokens is None:
        return min(float(E), cf * k)
    return E * min(routed_tokens, math.ceil(cf * routed_tokens * k / E)) / routed_tokens


def block_ffn_flops(
    hidden: int,
    intermediate: int,
    moe: Optional[MoEArgs],
    tokens: int,
    experts_per_token: Optional[float] = None,
    training: bool = False,
) -> dict[str, int]:
    """Feed-forward FLOPs of one block over `tokens` tokens: the dense MLP, or router + routed + shared
    experts, with `experts_per_token` copies per token (default: `routed_experts_per_token(moe)`);
    `training` counts the z-loss's second router product."""
    if moe is None:
        return {"mlp": 2 * tokens * 2 * hidden * intermediate}
    routed, shared = expert_widths(hidden, intermediate, moe)
    a = routed_experts_per_token(moe) if experts_per_token is None else experts_per_token
    projections = 3 if moe.expert_type == "swiglu" else 2
    out = {
        "router": 2 * tokens * hidden * moe.num_experts * (2 if training and moe.z_loss_coef > 0 else 1),
        "experts": round(2 * tokens * a * projections * hidden * routed),
    }
    if shared:
        out["shared"] = 2 * tokens * 3 * hidden * shared
    return out


def _block_flops(
    hidden: int,
    cond: int,
    intermediate: int,
    moe: Optional[MoEArgs],
    tokens: int,
    experts: Optional[float] = None,
    training: bool = False,
) -> dict[str, int]:
    return {
        "adaln": 2 * cond * 6 * hidden,
        "attention": 2 * tokens * 4 * hidden**2 + 2 * 2 * tokens**2 * hidden,
        **block_ffn_flops(hidden, intermediate, moe, tokens, experts, training),
    }


def _add(total: dict[str, int], part: dict[str, int]) -> None:
    for key, value in part.items():
        total[key] = total.get(key, 0) + value


def forward_flops(
    config: DiTConfig,
    visible_tokens: Optional[int] = None,
    experts_per_token: ExpertsPerToken = None,
    training: bool = False,
) -> dict[str, int]:
    """Matmul FLOPs of one image's forward pass by component (see the module docstring).

    `visible_tokens`: tokens the encoder blocks see under MaskDiT masking (default: all of them).
    `experts_per_token`: expert copies per token, one number or one per MoE layer (default:
    `routed_experts_per_token`; for expert choice pass the training value over the micro-batch or
    the one measured at sampling). `training`: the training forward's (a z-loss recomputes the router logits).
    """
    C, p = config.hidden_size, config.patch_size
    T = (config.input_size // p) ** 2
    T_enc = T if visible_tokens is None else visible_tokens
    I = int(C * config.mlp_ratio)
    total = {
        "patch_embed": 2 * T * C * config.in_channels * p * p,
        "embedders": 2 * (TIMESTEP_FEATURES * C + C * C),
    }
    moe_blocks = [index for index in range(config.depth) if config.is_moe_block(index)]
    per_layer = _per_moe_layer(experts_per_token, len(moe_blocks))
    for index in range(config.depth):
        moe = config.moe if index in moe_blocks else None
        experts = per_layer[moe_blocks.index(index)] if moe is not None else None
        _add(total, _block_flops(C, C, I, moe, T_enc, experts, training))
    width = C
    if config.decoder_depth:
        width = D = config.decoder_hidden_size
        _add(total, {"adaln": 2 * C * 2 * C, "decoder_embed": 2 * T_enc * C * D})
        for _ in range(config.decoder_depth):
            _add(total, _block_flops(D, C, int(D * config.mlp_ratio), None, T))
    _add(total, {"adaln": 2 * C * 2 * width, "final_layer": 2 * T * width * p * p * config.out_channels})
    return total


def _per_moe_layer(experts_per_token: ExpertsPerToken, layers: int) -> list[Optional[float]]:
    if experts_per_token is None or isinstance(experts_per_token, (int, float)):
        return [experts_per_token] * layers
    if len(experts_per_token) != layers:
        raise ValueError(f"experts_per_token has {len(experts_per_token)} values for {layers} MoE layers.")
    return list(experts_per_token)


def training_flops(config: DiTConfig, visible_tokens: Optional[int] = None, micro_batch: Optional[int] = None) -> int:
    """FLOPs of one image's training step (forward + backward); `micro_batch` (images per rank's
    forward) sets expert choice's capacity, None its large-batch value."""
    experts = None
    if config.moe is not None and micro_batch is not None:
        tokens = micro_batch * (visible_tokens or (config.input_size // config.patch_size) ** 2)
        experts = routed_experts_per_token(config.moe, tokens)
    return TRAINING_FACTOR * sum(forward_flops(config, visible_tokens, experts, training=True).values())


def guided_step_flops(config: DiTConfig, experts_per_token: ExpertsPerToken = None) -> int:
    """FLOPs of one guided sampling step of one image (the conditional and the unconditional forward);
    `experts_per_token` as in `forward_flops` (expert choice: measured at sampling)."""
    return GUIDED_FACTOR * sum(forward_flops(config, experts_per_token=experts_per_token).values())


def vendor_peak(device_name: str) -> Optional[float]:
    """The vendor's dense bf16 peak FLOP/s of a GPU named `device_name` (torch's name), None if not listed."""
    return next((peak for key, peak in VENDOR_BF16_DENSE_PEAK if key in device_name), None)


def device_name(device: torch.device, threads: Optional[int] = None) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({threads or torch.get_num_threads()} threads)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # host sync: timing


def measure_gemm_rate(device: torch.device, dtype: torch.dtype, size: Optional[int] = None, repeats: int = 10) -> float:
    """FLOP/s of a square `size`^3 matmul (default 8192 on CUDA, 2048 on CPU): the practical ceiling
    of this device and dtype, measured in the same run as what is judged against it."""
    size = size or (8192 if device.type == "cuda" else 2048)
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    for _ in range(2):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def utilisation(flops_per_s: float, gemm_rate: float, peak: Optional[float]) -> dict[str, Optional[float]]:
    """Achieved TFLOP/s, its fraction of the measured square-GEMM rate and of the vendor peak (MFU; None off GPU)."""
    return {
        "tflops": flops_per_s / 1e12,
        "of_gemm": flops_per_s / gemm_rate,
        "mfu": flops_per_s / peak if peak else None,
    }
