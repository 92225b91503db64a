"""Training-timestep samplers and per-sample loss weights, one class per strategy.

A sampler's ``sample(batch_size, device)`` returns ``(t, weights)``, both (N,). The
objective multiplies its per-sample loss by the weights; ``weight_target`` says which
part: "loss" (importance weights on the whole loss) or "mse" (a reweighting of the
mse term only, as SpeeDiT's P2 weights). ``update(t, losses)`` feeds back per-sample
losses to samplers that adapt (loss-second-moment); the others ignore it.

Discrete samplers (IDDPM) draw integer indices 0..T-1; continuous ones (flow) draw
t in (0, 1).

Notation for SpeeDiT (Wang et al. 2024, "A Closer Look at Time Steps is Worthy of
Triple Speed-Up for Diffusion Model Training", README core code of 1zeryu/SpeeDiT):

    g[t]             np.gradient of sqrt(1 - alpha_bar_t) over t
    p[t]             sampling probability, proportional to tanh(1e6 (g[t] - 1e-4)) + 1.5:
                     2.5 where g > 1e-4 (the steps that change the noise level), 0.5 after
    meaningful_step  tau = first t with g[t] < 1e-4, plus one
    dual sample      t' = tau - t for t < tau, t - tau otherwise
    snr[t]           alpha_bar_t / (1 - alpha_bar_t)
    P2 weight        1 / (k + snr[t])^gamma, k = gamma = 1 (Choi et al. 2022)
"""

import numpy as np
import torch
from torch import Tensor


class TimestepSampler:
    """Base class: draws (t, weights) for a batch; see the module docstring."""

    weight_target = "loss"
    learns_from_losses = False                # True: `update` changes what `sample` draws

    def sample(self, batch_size: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Feed back the unweighted per-sample losses at t; a no-op unless the sampler adapts."""


class UniformTimesteps(TimestepSampler):
    """t uniform over 0..T-1, weight 1: DiT's ``torch.randint(0, T, (N,))``."""

    def __init__(self, num_timesteps: int):
        self.num_timesteps = num_timesteps

    def sample(self, batch_size, device):
        t = torch.randint(0, self.num_timesteps, (batch_size,), device=device)
        return t, torch.ones(batch_size, device=device)


class SpeeDiTTimesteps(TimestepSampler):
    """SpeeDiT's asymmetric timestep sampling with dual sampling and P2 weights on the mse term.

    Half the batch (plus one) is drawn from p; the rest are their dual steps around the
    meaningful step tau, so each batch covers both the steps before tau and those after.
    """

    weight_target = "mse"

    def __init__(self, alphas_cumprod: np.ndarray, p2_k: float = 1.0, p2_gamma: float = 1.0, threshold: float = 1e-4):
        alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
        grad = np.gradient(np.sqrt(1.0 - alphas_cumprod))
        below = grad < threshold
        if not below.any() or np.argmax(below) + 1 >= len(alphas_cumprod):
            raise ValueError(
                f"SpeeDiT needs a step before the last where d sqrt(1 - alpha_bar)/dt falls under {threshold}; "
                "this noise schedule has none, use the 1000-step linear schedule or timestep_sampler='uniform'"
            )
        self.num_timesteps = len(alphas_cumprod)
        self.meaningful_step = int(np.argmax(below)) + 1
        p = np.tanh(1e6 * (grad - threshold)) + 1.5
        self.probs = torch.from_numpy(p / p.sum())
        snr = 1.0 / (1.0 - alphas_cumprod) - 1.0
        self.p2_weights = torch.from_numpy(1.0 / (p2_k + snr) ** p2_gamma)

    def dual(self, t: Tensor) -> Tensor:
        """The dual step: tau - t below the meaningful step tau, t - tau from it on."""
        tau = self.meaningful_step
        return torch.where(t < tau, tau - t, t - tau)

    def sample(self, batch_size, device):
        drawn = torch.multinomial(self.probs, batch_size // 2 + 1, replacement=True)
        t = torch.cat([drawn, self.dual(drawn)])[:batch_size]
        return t.to(device), self.p2_weights[t].float().to(device)


class LossSecondMomentTimesteps(TimestepSampler):
    """IDDPM's importance sampling (Nichol & Dhariwal 2021, eq. 18): p_t ∝ sqrt(E[L_t^2]).

    Uniform until every step has ``history`` recorded losses; then p mixes in
    ``uniform_prob`` of the uniform distribution, and weights 1 / (T p_t) keep the
    objective's expectation unchanged. ``update`` moves the losses to the CPU (a host
    sync) and records the losses it is given: a distributed trainer gathers every rank's
    (t, loss) first, so that all ranks keep one history and draw the same timesteps.
    """

    learns_from_losses = True

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 0.001):
        self.num_timesteps = num_timesteps
        self.history = history
        self.uniform_prob = uniform_prob
        self.loss_history = np.zeros((num_timesteps, history), dtype=np.float64)
        self.loss_counts = np.zeros(num_timesteps, dtype=np.int64)

    def probabilities(self) -> np.ndarray:
        """The current p over 0..T-1."""
        if not (self.loss_counts == self.history).all():
            return np.full(self.num_timesteps, 1.0 / self.num_timesteps)
        second_moment = np.sqrt(np.mean(self.loss_history**2, axis=-1))
        p = second_moment / second_moment.sum()
        return p * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def sample(self, batch_size, device):
        p = torch.from_numpy(self.probabilities())
        t = torch.multinomial(p, batch_size, replacement=True)
        weights = 1.0 / (self.num_timesteps * p[t])
        return t.to(device), weights.float().to(device)

    def update(self, t, losses):
        for step, loss in zip(t.tolist(), losses.detach().float().cpu().tolist()):  # host sync
            if self.loss_counts[step] == self.history:
                self.loss_history[step, :-1] = self.loss_history[step, 1:]
                self.loss_history[step, -1] = loss
            else:
                self.loss_history[step, self.loss_counts[step]] = loss
                self.loss_counts[step] += 1


class LogitNormalTimesteps(TimestepSampler):
    """t = sigmoid(mean + std * z), z ~ N(0, 1): SD3's logit-normal, DiT-MoE's default (mean 0, std 1)."""

    def __init__(self, mean: float = 0.0, std: float = 1.0):
        self.mean = mean
        self.std = std

    def sample(self, batch_size, device):
        t = torch.sigmoid(self.mean + self.std * torch.randn(batch_size, device=device))
        return t, torch.ones(batch_size, device=device)


class UniformTimeTimesteps(TimestepSampler):
    """t uniform in [0, 1), weight 1: rectified flow without the logit-normal (DiT-MoE ln=False)."""

    def sample(self, batch_size, device):
        return torch.rand(batch_size, device=device), torch.ones(batch_size, device=device)


DISCRETE_SAMPLERS = ("uniform", "speedit", "loss-second-moment")
CONTINUOUS_SAMPLERS = ("logit-normal", "uniform")


def build_discrete_sampler(name: str, alphas_cumprod: np.ndarray) -> TimestepSampler:
    """An IDDPM timestep sampler by name, for a process with these alpha_bar."""
    if name == "uniform":
        return UniformTimesteps(len(alphas_cumprod))
    if name == "speedit":
        return SpeeDiTTimesteps(alphas_cumprod)
    if name == "loss-second-moment":
        return LossSecondMomentTimesteps(len(alphas_cumprod))
    raise ValueError(f"unknown timestep sampler {name!r} for iddpm: use one of {', '.join(DISCRETE_SAMPLERS)}")


def build_continuous_sampler(name: str) -> TimestepSampler:
    """A flow timestep sampler by name."""
    if name == "logit-normal":
        return LogitNormalTimesteps()
    if name == "uniform":
        return UniformTimeTimesteps()
    raise ValueError(f"unknown timestep sampler {name!r} for flow: use one of {', '.join(CONTINUOUS_SAMPLERS)}")
