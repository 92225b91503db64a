"""Gaussian KL and likelihood terms of the IDDPM variational bound.

These are the two pieces of L_vlb (Nichol & Dhariwal 2021, eq. 4-5): the KL between
two diagonal Gaussians for t > 0 and the discretised Gaussian decoder likelihood for
t = 0 (Ho et al. 2020, eq. 13). Both return elementwise values in nats; callers
average over pixels and convert to bits.
"""

import math

import torch
from torch import Tensor


def mean_flat(x: Tensor) -> Tensor:
    """Mean over every dimension but the batch one: (N, ...) -> (N,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def masked_mean_flat(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over every dimension but the batch one of the elements where `mask` (broadcastable to x) is 1.

    (N, ...) -> (N,). Masked training counts only visible pixels: mask (N, 1, H, W) for x (N, C, H, W).
    """
    weights = mask.to(x.dtype).expand_as(x)
    dims = tuple(range(1, x.ndim))
    return (x * weights).sum(dim=dims) / weights.sum(dim=dims)


def normal_kl(mean1, logvar1, mean2, logvar2) -> Tensor:
    """KL( N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)) ), elementwise, in nats.

    Arguments broadcast; at least one must be a tensor.
    """
    ref = next(a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, Tensor))
    logvar1, logvar2 = (torch.as_tensor(a, dtype=ref.dtype, device=ref.device) for a in (logvar1, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: Tensor) -> Tensor:
    """Phi(x) through the tanh approximation used by the IDDPM/DiT code (kept for equal numbers)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: Tensor, *, means: Tensor, log_scales: Tensor) -> Tensor:
    """log P(x) of 8-bit data under N(means, exp(log_scales)^2) integrated over x's bin.

    x is assumed to be uint8 values rescaled to [-1, 1], so each bin is 2/255 wide; the
    outermost bins extend to -inf and +inf. Probabilities are floored at 1e-12.
    """
    if not x.shape == means.shape == log_scales.shape:
        raise ValueError(
            f"shapes differ: x {tuple(x.shape)}, means {tuple(means.shape)}, log_scales {tuple(log_scales.shape)}"
        )
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_upper = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_lower = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_upper = torch.log(cdf_upper.clamp(min=1e-12))
    log_one_minus_cdf_lower = torch.log((1.0 - cdf_lower).clamp(min=1e-12))
    log_bin = torch.log((cdf_upper - cdf_lower).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_one_minus_cdf_lower, log_bin))
