"""Activation bytes of one training micro-batch: what autograd keeps from the forward for the backward.

Counted tensor by tensor from what the model's operations save (checked against
`torch.autograd.graph.saved_tensors_hooks` in tests/test_plan.py), per token of width C, H heads,
dense MLP width I, routed expert width I_e, k experts per token, E experts, shared width I_s, b bytes per
activation element (2 in bf16/fp16, 4 in fp32); LayerNorm statistics, router scores and logsumexps are
fp32 (4 bytes), indices int64 (8 bytes):

    attention    b (8 C + 2 C [q/k norm]) + 4 (2 + H + 4 H [q/k norm])
                 block input, LayerNorm output, modulated input, qkv, (normed q, k), attention output,
                 projection output (gated); LayerNorm statistics, logsumexp (flash / SDPA kernels, no T^2 matrix)
    feed-forward b 4 C + 4 x 2: residual, LayerNorm output, modulated input, output (gated)
      dense MLP  b 2 I: fc1 output and GELU output
      MoE        4 C [fp32 router input, half precision only] + 4 E + 8 x 3 k + b (3 k C + k) + expert inner
                 + b 4 I_s (shared SwiGLU); expert inner: b 2 k I_e on the loop path (the CPU, fp32), b 4 k I_e
                 on the grouped-GEMM path (CUDA half precision: gate, SiLU, up and their product)
    per sample   b 10 C per block (adaLN input, SiLU, its six chunks, the two 1 + scale)
    outside      patch input b p^2 c_in, final layer b 3 C + 8 per token; with masking the full token
                 tensor the gather of the kept tokens saves (b C per token) and their indices

Gradient checkpointing keeps each block's input (b C per token) and, during the backward, one block's
activations at a time. MaskDiT masking runs the encoder on round((1 - ratio) T) tokens; its decoder blocks
are dense blocks over all T tokens at the decoder width. Token counts per expert are taken as balanced.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..models import DiTConfig

FP32, INDEX = 4, 8
PER_SAMPLE_BLOCK_WIDTHS = 10  # adaLN: SiLU input and output, six chunks, two (1 + scale)


@dataclass(frozen=True)
class ActivationSpec:
    """What decides activation bytes besides the architecture."""

    micro_batch: int
    element_bytes: int  # 2 in bf16/fp16, 4 in fp32
    grad_checkpointing: bool = False
    mask_ratio: float = 0.0
    grouped_gemm: bool = True  # the CUDA half-precision expert path; False: the loop path (CPU, fp32)


def attention_bytes(width: int, heads: int, qk_norm: bool, b: int) -> float:
    return b * (8 + 2 * qk_norm) * width + FP32 * (2 + heads + 4 * heads * qk_norm)


def feed_forward_bytes(config: DiTConfig, width: int, moe: bool, spec: ActivationSpec) -> float:
    """Per-token bytes of a block's feed-forward half (its LayerNorm, the MLP or MoE layer, the gated output)."""
    b = spec.element_bytes
    common = b * 4 * width + FP32 * 2
    dense_width = int(width * config.mlp_ratio)
    if not moe:
        return common + b * 2 * dense_width
    args = config.moe
    k, expert_width = args.num_experts_per_tok, max(1, int(dense_width * args.expert_width_ratio))
    shared = (
        args.num_shared_experts * expert_width if args.num_shared_experts is not None else args.n_shared_experts * width
    )
    router = FP32 * width * (b != FP32) + FP32 * args.num_experts + INDEX * 3 * k
    inner = (4 if spec.grouped_gemm else 2) * k * expert_width
    return common + router + b * (3 * k * width + k + inner + 4 * shared)


def block_bytes(config: DiTConfig, index: int, spec: ActivationSpec, decoder: bool = False) -> float:
    """Per-token bytes of one encoder block (`index`) or decoder block."""
    width = config.decoder_hidden_size if decoder else config.hidden_size
    heads = config.decoder_num_heads if decoder else config.num_heads
    moe = not decoder and config.is_moe_block(index)
    return attention_bytes(width, heads, config.qk_norm, spec.element_bytes) + feed_forward_bytes(
        config, width, moe, spec
    )


def visible_tokens(config: DiTConfig, mask_ratio: float) -> int:
    tokens = (config.input_size // config.patch_size) ** 2
    return tokens - round(mask_ratio * tokens)


def activation_bytes(config: DiTConfig, spec: ActivationSpec) -> float:
    """Peak bytes of saved activations of one micro-batch of `spec.micro_batch` images on one rank."""
    b, n = spec.element_bytes, spec.micro_batch
    tokens, encoder_tokens = (config.input_size // config.patch_size) ** 2, visible_tokens(config, spec.mask_ratio)
    blocks = [(encoder_tokens, block_bytes(config, i, spec)) for i in range(config.depth)]
    blocks += [(tokens, block_bytes(config, 0, spec, decoder=True)) for _ in range(config.decoder_depth)]
    widths = [config.hidden_size] * config.depth + [config.decoder_hidden_size] * config.decoder_depth
    per_sample = b * PER_SAMPLE_BLOCK_WIDTHS * config.hidden_size
    if spec.grad_checkpointing:  # block inputs, and one block's activations at a time in the backward
        kept = sum(t * b * w for (t, _), w in zip(blocks, widths)) + max(t * per_token for t, per_token in blocks)
        kept += per_sample
    else:
        kept = sum(t * per_token for t, per_token in blocks) + per_sample * len(blocks)
    outside = tokens * b * config.patch_size**2 * config.in_channels
    if encoder_tokens < tokens:  # dropping tokens (a gather) keeps all of them and the kept indices
        outside += tokens * b * config.hidden_size + encoder_tokens * INDEX
    final_width, final_tokens = config.hidden_size, encoder_tokens
    if config.decoder_depth:
        outside += encoder_tokens * (b * 3 * config.hidden_size + FP32 * 2)  # decoder_embed's norm and linear
        final_width, final_tokens = config.decoder_hidden_size, tokens
    outside += final_tokens * (b * 3 * final_width + FP32 * 2)
    return n * (kept + outside)
