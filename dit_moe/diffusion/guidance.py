"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser wrapper, for any objective.

    out = u + s (c - u)     c: conditional prediction, u: prediction for the null label

The wrapper is built once and has the model's signature, so every sampler takes it in
place of the model. Each call runs one batched forward over [cond; uncond].

Which channels are guided: the prediction (eps for IDDPM, velocity for flow) is the
first C output channels, C = the input's channel count. With learn_sigma the model
also outputs C variance channels; those are not a prediction to extrapolate, so they
come from the conditional branch unchanged. ``cfg_channels=None`` guides all C
prediction channels. ``cfg_channels=3`` reproduces DiT's ``forward_with_cfg``, which
guides only the first three channels (for 4-channel SD-VAE latents the fourth eps
channel then also comes from the conditional branch); DiT's published FIDs used it.
"""

from collections.abc import Callable

import torch
from torch import Tensor


def guided(
    model_fn: Callable[..., Tensor],
    cfg_scale: float,
    null_label: int,
    cfg_channels: int | None = None,
) -> Callable[..., Tensor]:
    """``fn(x, t, y) -> output`` applying classifier-free guidance at scale ``cfg_scale`` to ``model_fn``.

    ``null_label`` is the class id the model was trained with for "no class" (DiT:
    num_classes). At scale 1 guidance is the identity, so ``model_fn`` is returned and
    each call costs one conditional forward.
    """
    if cfg_scale == 1.0:
        return model_fn
    if cfg_channels is not None and cfg_channels < 1:
        raise ValueError(f"cfg_channels must be positive or None, got {cfg_channels}")

    def guided_fn(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        both = model_fn(
            torch.cat([x, x]),  # (2N, C, H, W)
            torch.cat([t, t]),
            torch.cat([y, torch.full_like(y, null_label)]),
        )
        cond, uncond = both.chunk(2)  # (2N, C_out, H, W) -> 2 x (N, C_out, H, W)
        guided_channels = x.shape[1] if cfg_channels is None else cfg_channels
        mixed = uncond[:, :guided_channels] + cfg_scale * (cond[:, :guided_channels] - uncond[:, :guided_channels])
        return torch.cat([mixed, cond[:, guided_channels:]], dim=1)

    return guided_fn
