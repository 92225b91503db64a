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

Guidance interval (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval improves
sample and distribution quality"): guidance only where the noise level sigma lies in (low, high];
elsewhere the wrapper runs the conditional rows alone, so the unconditional half of the batch is
not computed there. sigma is the EDM noise level of x_t / alpha_t for both objectives, so one
interval means the same noise for either: IDDPM sqrt((1 - abar_t) / abar_t), flow t / (1 - t)
(x_t / (1 - t) = x_0 + t / (1 - t) eps). `noise_level(process)` maps the model's time input to it.
"""

from collections.abc import Callable

import torch
from torch import Tensor

GuideAt = Callable[[Tensor], Tensor]  # model time (N,) -> bool (N,): guide these rows


def guided(
    model_fn: Callable[..., Tensor],
    cfg_scale: float,
    null_label: int,
    cfg_channels: int | None = None,
    guide_at: GuideAt | None = None,
) -> Callable[..., Tensor]:
    """``fn(x, t, y) -> output`` applying classifier-free guidance at scale ``cfg_scale`` to ``model_fn``.

    ``null_label`` is the class id the model was trained with for "no class" (DiT:
    num_classes). At scale 1 guidance is the identity, so ``model_fn`` is returned and
    each call costs one conditional forward. ``guide_at`` (see `interval`) limits guidance
    to the rows it marks; a call with none marked is one conditional forward.
    """
    if cfg_scale == 1.0:
        return model_fn
    if cfg_channels is not None and cfg_channels < 1:
        raise ValueError(f"cfg_channels must be positive or None, got {cfg_channels}")

    def both_fn(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        both = model_fn(
            torch.cat([x, x]),  # (2N, C, H, W)
            torch.cat([t, t]),
            torch.cat([y, torch.full_like(y, null_label)]),
        )
        cond, uncond = both.chunk(2)  # (2N, C_out, H, W) -> 2 x (N, C_out, H, W)
        guided_channels = x.shape[1] if cfg_channels is None else cfg_channels
        mixed = uncond[:, :guided_channels] + cfg_scale * (cond[:, :guided_channels] - uncond[:, :guided_channels])
        return torch.cat([mixed, cond[:, guided_channels:]], dim=1)

    if guide_at is None:
        return both_fn

    def interval_fn(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        inside = guide_at(t)
        if not bool(inside.any()):  # host sync: one bool per step
            return model_fn(x, t, y)
        out = both_fn(x, t, y)
        if bool(inside.all()):
            return out
        return torch.where(inside.view(-1, *([1] * (x.ndim - 1))), out, model_fn(x, t, y))

    return interval_fn


def noise_level(process) -> Callable[[Tensor], Tensor]:
    """sigma(t) of the model's time input t for `process`: IDDPM sqrt((1 - abar) / abar) at the
    original-process index t, flow t' / (1 - t') with t' = t / t_scale (infinite at t' = 1)."""
    if hasattr(process, "t_scale"):
        scale = process.t_scale

        def flow_sigma(t: Tensor) -> Tensor:
            s = t.double() / scale
            return s / (1 - s)

        return flow_sigma
    abar = torch.as_tensor(process.alphas_cumprod, dtype=torch.float64)

    def iddpm_sigma(t: Tensor) -> Tensor:
        a = abar.to(t.device)[t.long()]
        return ((1 - a) / a).sqrt()

    return iddpm_sigma


def interval(process, low: float, high: float) -> GuideAt:
    """`guide_at` for guidance only at noise levels sigma in (low, high] (Kynkaanniemi et al. 2024)."""
    if not 0 <= low < high:
        raise ValueError(f"a guidance interval needs 0 <= low < high, got ({low}, {high}]")
    sigma = noise_level(process)
    return lambda t: (sigma(t) > low) & (sigma(t) <= high)


class EvaluationCounter:
    """The network, counting what it is asked for: `rows` (images forwarded; guidance makes two
    per sample inside its interval) and `calls`. rows / samples is the model evaluations per image."""

    def __init__(self, model_fn: Callable[..., Tensor]):
        self.model_fn = model_fn
        self.rows = 0
        self.calls = 0

    def __call__(self, x: Tensor, t: Tensor, *args, **kwargs) -> Tensor:
        self.rows += x.shape[0]
        self.calls += 1
        return self.model_fn(x, t, *args, **kwargs)
