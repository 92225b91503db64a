"""Rectified flow as DiT-MoE trains it (Liu et al. 2022; Esser et al. 2024 "SD3" section 2-3).

Notation:

    x0        x_0, clean data;  noise = eps ~ N(0, I)
    t         time in [0, 1]: t = 0 is data, t = 1 is noise
    x_t       (1 - t) x_0 + t eps, the straight path between them
    v         dx_t/dt = eps - x_0, the velocity the network regresses
    t_scale   the model is called with t * t_scale. DiT-MoE feeds the raw t in (0, 1) to a
              timestep embedder built for 0..999 (t_scale = 1, kept as the default so its
              checkpoints sample correctly); t_scale = 1000 uses the embedder's full range.
"""

from collections.abc import Callable

import torch
from torch import Tensor

from .likelihood import masked_mean_flat, mean_flat


class RectifiedFlow:
    """Straight-path flow matching with a velocity-predicting network.

    Args:
        learn_sigma: the model outputs 2 * C channels (a DiT built with learn_sigma=True);
            only the first C, the velocity, are used.
        t_scale: multiplier on t before it reaches the model.
    """

    def __init__(self, learn_sigma: bool = True, t_scale: float = 1.0):
        self.learn_sigma = learn_sigma
        self.t_scale = t_scale

    @staticmethod
    def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = (1 - t) x_0 + t eps, with t of shape (N,)."""
        t = t.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))  # (N,) -> (N, 1, ..., 1)
        return (1 - t) * x0 + t * noise

    @staticmethod
    def target(x0: Tensor, noise: Tensor) -> Tensor:
        """The velocity v = eps - x_0 along the straight path."""
        return noise - x0

    def velocity(
        self, model_fn: Callable[..., Tensor], x: Tensor, t: Tensor, model_kwargs: dict | None = None
    ) -> Tensor:
        """v_theta(x_t, t): the model called at t * t_scale, variance channels dropped."""
        output = model_fn(x, t * self.t_scale, **(model_kwargs or {}))
        channels = x.shape[1]
        expected = 2 * channels if self.learn_sigma else channels
        if output.shape[1] != expected:
            raise ValueError(
                f"a flow with learn_sigma={self.learn_sigma} needs {expected} output channels for {channels} input channels, "
                f"got {output.shape[1]}; set learn_sigma to match the model"
            )
        return output[:, :channels]

    def training_losses(
        self,
        model_fn: Callable[..., Tensor],
        x0: Tensor,
        t: Tensor,
        model_kwargs: dict | None = None,
        noise: Tensor | None = None,
        loss_mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Per-sample velocity MSE at times t (N,): {"mse": (N,), "loss": (N,)}, loss = mse.

        ``loss_mask`` (N, 1, H, W), 1 where a pixel counts, averages over those pixels only
        (masked training: visible patches).
        """
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.interpolate(x0, noise, t)
        error = (self.target(x0, noise) - self.velocity(model_fn, x_t, t, model_kwargs)) ** 2
        mse = mean_flat(error) if loss_mask is None else masked_mean_flat(error, loss_mask)
        return {"mse": mse, "loss": mse}
