"""DiT / DiT-MoE: a transformer over latent patches, conditioned on timestep and class by adaLN-Zero.

Parameter names and shapes are those of facebookresearch/DiT (dense blocks: `mlp.fc1/fc2`)
and feizc/DiT-MoE (MoE blocks: `moe.gate`, `moe.experts`, `moe.shared_experts`), so their
checkpoints load key for key. The model is pure: no DeepSpeed, ranks or files.

With `decoder_depth > 0` the model is MaskDiT's (Zheng et al., TMLR 2024): the blocks above are
its encoder, followed by `decoder_embed` (adaLN-modulated LayerNorm + linear to the decoder width),
a learned `mask_token` in masked positions, fixed sin-cos `decoder_pos_embed`, dense
`decoder_blocks` conditioned on the same c, and the final layer at the decoder width. Passing a
`mask` trains on the visible tokens only (see `masking.py`); without one every token is visible,
which is how such a model fine-tunes and samples.

Shapes: x (N, in_channels, H, W); tokens (N, T, C) with T = (H / p) * (W / p); c (N, C);
visible tokens (N, T_keep, C); decoder tokens (N, T, D) with D = decoder_hidden_size.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .attention import Attention
from .config import DiTConfig
from .layers import LabelEmbedder, Mlp, PatchEmbed, TimestepEmbedder, get_2d_sincos_pos_embed, modulate
from .masking import MaskInfo, drop_tokens, restore_tokens
from .moe import MoEFeedForward
from .router import recomputing

AuxLosses = dict[str, torch.Tensor]


def add_aux(total: AuxLosses, new: AuxLosses) -> AuxLosses:
    """Sum aux-loss dicts key by key (each MoE layer contributes its own weighted losses)."""
    for name, value in new.items():
        total[name] = total[name] + value if name in total else value
    return total


class DiTBlock(nn.Module):
    """Pre-norm transformer block whose attention and feed-forward residuals are adaLN-Zero gated.

    The feed-forward is the dense GELU MLP (`mlp`) or a routed MoE layer (`moe`). A decoder block
    (`decoder=True`) is dense, at the decoder width and head count; its adaLN reads c at the
    encoder width, so c needs no separate projection (MaskDiT).
    """

    def __init__(self, config: DiTConfig, index: int, decoder: bool = False):
        super().__init__()
        hidden = config.decoder_hidden_size if decoder else config.hidden_size
        heads = config.decoder_num_heads if decoder else config.num_heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(
            hidden, heads, qk_norm=config.qk_norm, backend=config.attn_backend, qk_norm_eps=config.qk_norm_eps
        )
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        if not decoder and config.is_moe_block(index):
            self.moe = MoEFeedForward(hidden, int(hidden * config.mlp_ratio), config.moe)
        else:
            self.mlp = Mlp(hidden, int(hidden * config.mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(config.hidden_size, 6 * hidden, bias=True))

    @property
    def is_moe(self) -> bool:
        return hasattr(self, "moe")

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, AuxLosses]:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        h = modulate(self.norm2(x), shift_mlp, scale_mlp)
        if self.is_moe:
            h, aux = self.moe(h)
        else:
            h, aux = self.mlp(h), {}
        return x + gate_mlp.unsqueeze(1) * h, aux


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map from each token to its p*p*out_channels pixels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, cond_size: int | None = None):
        super().__init__()
        cond_size = cond_size or hidden_size
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DecoderEmbed(nn.Module):
    """MaskDiT's encoder-to-decoder bridge: adaLN-modulated LayerNorm, then a linear map to the decoder width."""

    def __init__(self, hidden_size: int, decoder_hidden_size: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, decoder_hidden_size, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


def _recompute_contexts():
    """Gradient checkpointing's (forward, recomputation) contexts: routers count their side effects once."""
    return nullcontext(), recomputing()


class DiT(nn.Module):
    """Diffusion Transformer; `num_experts > 0` turns the chosen blocks' feed-forwards into MoE layers."""

    def __init__(self, config: DiTConfig | None = None, **overrides):
        super().__init__()
        config = config or DiTConfig()
        if overrides:
            config = config.replace(**overrides)
        self.config = config
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels
        self.patch_size = config.patch_size
        self.num_classes = config.num_classes
        self.grad_checkpointing = config.grad_checkpointing

        self.x_embedder = PatchEmbed(config.input_size, config.patch_size, config.in_channels, config.hidden_size)
        self.t_embedder = TimestepEmbedder(config.hidden_size)
        self.y_embedder = LabelEmbedder(config.num_classes, config.hidden_size, config.class_dropout_prob)
        # Fixed sin-cos table; a Parameter (not a buffer) so official checkpoints load key for key.
        self.pos_embed = nn.Parameter(
            torch.zeros(1, self.x_embedder.num_patches, config.hidden_size), requires_grad=False
        )
        self.blocks = nn.ModuleList(DiTBlock(config, i) for i in range(config.depth))
        final_width = config.hidden_size
        if config.decoder_depth:
            final_width = config.decoder_hidden_size
            self.decoder_embed = DecoderEmbed(config.hidden_size, final_width)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, final_width))
            self.decoder_pos_embed = nn.Parameter(
                torch.zeros(1, self.x_embedder.num_patches, final_width), requires_grad=False
            )
            self.decoder_blocks = nn.ModuleList(DiTBlock(config, i, decoder=True) for i in range(config.decoder_depth))
        self.final_layer = FinalLayer(final_width, config.patch_size, self.out_channels, config.hidden_size)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's init: xavier linears, sin-cos positions, N(0, 0.02) embeddings, zeroed adaLN and output."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        pos = get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.x_embedder.grid_size)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        if self.has_decoder:
            pos = get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], self.x_embedder.grid_size)
            self.decoder_pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
            nn.init.normal_(self.mask_token, std=0.02)
            for block in self.decoder_blocks:
                nn.init.zeros_(block.adaLN_modulation[-1].weight)
                nn.init.zeros_(block.adaLN_modulation[-1].bias)
            # MaskDiT zero-initialises the bridge like the final layer.
            for layer in (self.decoder_embed.adaLN_modulation[-1], self.decoder_embed.linear):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    @property
    def has_decoder(self) -> bool:
        return hasattr(self, "decoder_blocks")

    @property
    def num_tokens(self) -> int:
        return self.x_embedder.num_patches

    @property
    def moe_blocks(self) -> list[int]:
        return [i for i, block in enumerate(self.blocks) if block.is_moe]

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*c) -> (N, c, H, W)."""
        c, p = self.out_channels, self.patch_size
        h = w = self.x_embedder.grid_size
        if h * w != x.shape[1]:
            raise ValueError(f"unpatchify expects {h * w} tokens, got {x.shape[1]}.")
        x = x.reshape(x.shape[0], h, w, p, p, c)  # (N, h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)  # (N, c, h, p, w, p)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def embed(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, force_drop_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch tokens with positions (N, T, C) and the conditioning vector c = emb(t) + emb(y) (N, C)."""
        tokens = self.x_embedder(x) + self.pos_embed.to(x.dtype)  # (N, T, C)
        label_emb = self.y_embedder(y, self.training, force_drop_ids)
        c = self.t_embedder(t).to(tokens.dtype) + label_emb.to(tokens.dtype)
        return tokens, c

    def run_blocks(self, tokens: torch.Tensor, c: torch.Tensor, blocks=None) -> tuple[torch.Tensor, AuxLosses]:
        """Apply `blocks` (default: all) to (N, T', C) tokens; any token count T' works (masked training)."""
        aux: AuxLosses = {}
        checkpointing = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks if blocks is None else blocks:
            if checkpointing:
                tokens, block_aux = checkpoint(block, tokens, c, use_reentrant=False, context_fn=_recompute_contexts)
            else:
                tokens, block_aux = block(tokens, c)
            add_aux(aux, block_aux)
        return tokens, aux

    def decode(self, tokens: torch.Tensor, c: torch.Tensor, info: MaskInfo | None) -> torch.Tensor:
        """Encoder output (N, T_keep, C) -> decoder output (N, T, D), mask tokens in masked positions."""
        tokens = self.decoder_embed(tokens, c)  # (N, T_keep, D)
        if info is not None:
            tokens = restore_tokens(tokens, info, self.mask_token.view(-1))  # (N, T, D)
        tokens = tokens + self.decoder_pos_embed.to(tokens.dtype)
        tokens, _ = self.run_blocks(tokens, c, self.decoder_blocks)  # dense blocks: no aux losses
        return tokens

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        return_aux: bool = False,
        force_drop_ids: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ):
        """x (N, in_channels, H, W), t (N,) timesteps, y (N,) labels -> (N, out_channels, H, W).

        With `return_aux=True` also returns the dict of weighted MoE aux losses summed over layers.
        `force_drop_ids` (N,) of 0/1 replaces the random label dropout (1: use the null class), so a
        trainer can draw it reproducibly. `mask` (N, T) bool (True = masked, the same count in every
        row) runs the encoder blocks on the visible tokens only; the decoder fills the rest, and
        without a decoder the masked patches' outputs are zero (MaskDiT).
        """
        tokens, c = self.embed(x, t, y, force_drop_ids)
        info = MaskInfo.from_mask(mask) if mask is not None else None
        if info is not None:
            tokens = drop_tokens(tokens, info)  # (N, T_keep, C), positions already added
        tokens, aux = self.run_blocks(tokens, c)
        if self.has_decoder:
            tokens = self.decode(tokens, c, info)
        patches = self.final_layer(tokens, c)  # (N, T or T_keep, p*p*out_channels)
        if info is not None and not self.has_decoder:
            patches = restore_tokens(patches, info, patches.new_zeros(patches.shape[-1]))  # (N, T, p*p*out)
        out = self.unpatchify(patches)  # (N, out_channels, H, W)
        return (out, aux) if return_aux else out

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float) -> torch.Tensor:
        """DiT's batched guidance entry: the batch is [cond half, uncond half]; guides the first 3 channels."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        eps, rest = out[:, :3], out[:, 3:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)
