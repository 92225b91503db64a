"""Token masking for masked diffusion training (MaskDiT, Zheng et al., TMLR 2024).

During masked training each sample keeps a random subset of its patch tokens: the encoder
blocks (dense or MoE) see only those, a light decoder sees all positions with a learned mask
token in the dropped ones. `MaskInfo` is the small metadata object that `drop_tokens` and
`restore_tokens` (inverse operations) pass between encoder and decoder.

Shapes: mask (N, T) bool, True = masked (dropped); ids_keep (N, T_keep) int64, the kept
token indices of each sample in ascending order; every sample keeps the same T_keep.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class MaskInfo:
    """Which tokens of each sample are kept (`ids_keep`) and which are masked (`mask`)."""

    mask: Tensor
    ids_keep: Tensor

    @classmethod
    def from_mask(cls, mask: Tensor) -> "MaskInfo":
        """Build from a (N, T) bool mask; every row must mask the same number of tokens."""
        if mask.ndim != 2 or mask.dtype != torch.bool:
            raise ValueError(
                f"mask must be a (N, T) bool tensor (True = masked), got {mask.dtype} {tuple(mask.shape)}."
            )
        counts = mask.sum(dim=1)
        if bool((counts != counts[0]).any()):  # host sync: validates the batch once per forward
            raise ValueError(f"every sample must mask the same number of tokens, got counts {counts.tolist()}.")
        num_keep = mask.shape[1] - int(counts[0])
        # A stable sort of 0 (kept) before 1 (masked) lists the kept indices in ascending order.
        ids_keep = torch.argsort(mask.to(torch.int8), dim=1, stable=True)[:, :num_keep]  # (N, T_keep)
        return cls(mask=mask, ids_keep=ids_keep)

    @property
    def num_tokens(self) -> int:
        return self.mask.shape[1]


def random_mask(
    batch: int,
    num_tokens: int,
    ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> MaskInfo:
    """Per-sample uniformly random masks, each hiding exactly round(ratio * num_tokens) tokens.

    The masked set of a sample is the top of a random permutation (MAE's argsort of uniform
    noise), so different samples get independent masks.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must lie in [0, 1), got {ratio}.")
    num_masked = round(ratio * num_tokens)
    if num_masked >= num_tokens:
        raise ValueError(f"mask ratio {ratio} would mask all {num_tokens} tokens; use a smaller ratio.")
    noise = torch.rand(batch, num_tokens, generator=generator, device=device)  # (N, T)
    ranks = torch.argsort(torch.argsort(noise, dim=1), dim=1)  # (N, T): each token's place in the shuffle
    return MaskInfo.from_mask(ranks >= num_tokens - num_masked)


def drop_tokens(tokens: Tensor, info: MaskInfo) -> Tensor:
    """(N, T, C) -> (N, T_keep, C): the kept tokens of each sample."""
    index = info.ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])  # (N, T_keep, C)
    return torch.gather(tokens, 1, index)


def restore_tokens(kept: Tensor, info: MaskInfo, mask_token: Tensor) -> Tensor:
    """(N, T_keep, C) -> (N, T, C): kept tokens back in place, `mask_token` (C,) everywhere else."""
    n, _, c = kept.shape
    full = mask_token.to(kept.dtype).expand(n, info.num_tokens, c)  # (N, T, C)
    index = info.ids_keep.unsqueeze(-1).expand(-1, -1, c)  # (N, T_keep, C)
    return full.scatter(1, index, kept)
