"""Training-timestep samplers and per-sample loss weights, one class per strategy.

A sampler's ``sample(batch_size, device)`` returns ``(t, weights)``, both (N,). The
objective multiplies its per-sample loss by the weights; ``weight_target`` says which
part: "loss" (importance weights on the whole loss) or "mse" (a reweighting of the
mse term only, as both SpeeD samplers' weights). ``update(t, losses)`` feeds back per-sample
losses to samplers that adapt (loss-second-moment); the others ignore it.

Discrete samplers (IDDPM) draw integer indices 0..T-1; continuous ones (flow) draw
t in (0, 1).

Notation for the two SpeeD samplers (Wang et al. 2024, "A Closer Look at Time Steps is
Worthy of Triple Speed-Up for Diffusion Model Training"). ``speedit`` is the paper's first
code release (README core code of 1zeryu/SpeeDiT), ``speed`` the official method of
NUS-HPC-AI-Lab/SpeeD (see `SpeeDTimesteps`). Both pivot their dual sampling on one step:

    meaningful_step  first t with np.gradient of sqrt(1 - alpha_bar_t) over t under 1e-4, plus one
                     (642 for the 1000-step linear schedule)
    dual sample      t' = meaningful_step - t for t < meaningful_step, t - meaningful_step otherwise

SpeeDiT (``speedit``):

    g[t]             np.gradient of sqrt(1 - alpha_bar_t) over t
    p[t]             sampling probability, proportional to tanh(1e6 (g[t] - 1e-4)) + 1.5:
                     2.5 where g > 1e-4 (the steps that change the noise level), 0.5 after
    snr[t]           alpha_bar_t / (1 - alpha_bar_t)
    P2 weight        1 / (p2_k + snr[t])^p2_gamma, p2_k = p2_gamma = 1 (Choi et al. 2022)

SpeeD (``speed``), the paper's symbols:

    tau              the paper's tau: the boundary step; the convergence area is t >= tau (700)
    k                the paper's k: a step below tau is k times as likely as one from tau on (5)
    lambda           the paper's lambda: the change-aware weights below tau span [1 - lambda, lambda] (0.6)
    d[t]             np.gradient of 1 - alpha_bar_t over t: how fast the noise variance changes at t
    w[t]             change-aware weight on the mse term:
                     (1 - lambda) + (2 lambda - 1) (d[t] - min d) / (max d - min d) for t < tau, 1 from tau on
"""

import numpy as np
import torch
from torch import Tensor


class TimestepSampler:
    """Base class: draws (t, weights) for a batch; see the module docstring."""

    weight_target = "loss"
    learns_from_losses = False  # True: `update` changes what `sample` draws

    def sample(self, batch_size: int, device: torch.device | str) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Feed back the unweighted per-sample losses at t; a no-op unless the sampler adapts."""


class UniformIndexTimesteps(TimestepSampler):
    """t uniform over 0..T-1, weight 1: DiT's ``torch.randint(0, T, (N,))``."""

    def __init__(self, num_timesteps: int):
        self.num_timesteps = num_timesteps

    def sample(self, batch_size, device):
        t = torch.randint(0, self.num_timesteps, (batch_size,), device=device)
        return t, torch.ones(batch_size, device=device)


def meaningful_step(alphas_cumprod: np.ndarray, method: str, threshold: float = 1e-4) -> int:
    """The dual-sampling pivot of both SpeeD samplers: one past the first step where
    d sqrt(1 - alpha_bar)/dt falls under ``threshold``; ValueError naming ``method`` if none does before the last."""
    below = np.gradient(np.sqrt(1.0 - alphas_cumprod)) < threshold
    if not below.any() or np.argmax(below) + 1 >= len(alphas_cumprod):
        raise ValueError(
            f"{method} needs a step before the last where d sqrt(1 - alpha_bar)/dt falls under {threshold}; "
            "this noise schedule has none, use the 1000-step linear schedule or timestep_sampler='uniform'"
        )
    return int(np.argmax(below)) + 1


class DualTimesteps(TimestepSampler):
    """Dual sampling, shared by both SpeeD samplers: half the batch (plus one) is drawn from
    ``probs``, the rest are their dual steps around ``meaningful_step``, so each batch covers
    both the steps before it and those after; each step gets ``weights[t]`` on the mse term.

    Subclasses set ``probs`` (T,) summing to one, ``weights`` (T,) and ``meaningful_step``.
    """

    weight_target = "mse"
    probs: Tensor
    weights: Tensor
    meaningful_step: int

    def dual(self, t: Tensor) -> Tensor:
        """The dual step: m - t below the meaningful step m, t - m from it on."""
        m = self.meaningful_step
        return torch.where(t < m, m - t, t - m)

    def sample(self, batch_size, device):
        drawn = torch.multinomial(self.probs, batch_size // 2 + 1, replacement=True)
        t = torch.cat([drawn, self.dual(drawn)])[:batch_size]
        return t.to(device), self.weights[t].float().to(device)


class SpeeDiTTimesteps(DualTimesteps):
    """SpeeDiT's asymmetric timestep sampling with dual sampling and P2 weights on the mse term
    (1zeryu/SpeeDiT; notation in the module docstring)."""

    def __init__(self, alphas_cumprod: np.ndarray, p2_k: float = 1.0, p2_gamma: float = 1.0, threshold: float = 1e-4):
        alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
        self.num_timesteps = len(alphas_cumprod)
        self.meaningful_step = meaningful_step(alphas_cumprod, "SpeeDiT", threshold)
        grad = np.gradient(np.sqrt(1.0 - alphas_cumprod))
        p = np.tanh(1e6 * (grad - threshold)) + 1.5
        self.probs = torch.from_numpy(p / p.sum())
        snr = 1.0 / (1.0 - alphas_cumprod) - 1.0
        self.weights = torch.from_numpy(1.0 / (p2_k + snr) ** p2_gamma)


class SpeeDTimesteps(DualTimesteps):
    """SpeeD's asymmetric sampling and change-aware weighting, as NUS-HPC-AI-Lab/SpeeD runs it.

    From ``speed/diffusion/speed/__init__.py`` at commit f5650f9 (``Speed_IDDPM`` with
    ``sampling: ours``, ``weighting: ours``; notation in the module docstring):
    p[t] ∝ k for t < tau and 1 from tau on; the dual half pivots on the meaningful step
    (642 on the 1000-step linear schedule), not on tau; w[t] as in the module docstring,
    its min and max taken over all T steps, applied to the mse term only (its
    ``training_losses`` multiplies the squared error by the weight before the mean).
    The defaults k=5, lambda=0.6, tau=700 are what its configs that set them use
    (``configs/ablation/base.yaml``, ``configs/comparison/metfaces/faster.yaml``,
    ``configs/text_to_image/faster.yaml``, ``configs/maskdit/faster.yaml``; its FFHQ
    comparison uses k=2). Its constructor's own defaults (k=1, i.e. uniform sampling, and
    lam=5) apply only to its configs that set neither, and are not taken here.
    """

    def __init__(self, alphas_cumprod: np.ndarray, k: float = 5.0, lam: float = 0.6, tau: int = 700):
        alphas_cumprod = np.asarray(alphas_cumprod, dtype=np.float64)
        self.num_timesteps = len(alphas_cumprod)
        if not 0 < tau < self.num_timesteps:
            raise ValueError(
                f"SpeeD's boundary tau={tau} must lie inside the {self.num_timesteps} diffusion steps; "
                "tau=700 is for the 1000-step process"
            )
        self.meaningful_step = meaningful_step(alphas_cumprod, "SpeeD")
        self.tau = tau
        below_tau = np.arange(self.num_timesteps) < tau
        p = np.where(below_tau, k, 1.0)
        self.probs = torch.from_numpy(p / p.sum())
        d = np.gradient(1.0 - alphas_cumprod)
        change_aware = (1.0 - lam) + (2.0 * lam - 1.0) * (d - d.min()) / (d.max() - d.min())
        self.weights = torch.from_numpy(np.where(below_tau, change_aware, 1.0))


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


class UniformFlowTimesteps(TimestepSampler):
    """t uniform in [0, 1), weight 1: rectified flow without the logit-normal (DiT-MoE ln=False)."""

    def sample(self, batch_size, device):
        return torch.rand(batch_size, device=device), torch.ones(batch_size, device=device)


DISCRETE_SAMPLERS = ("uniform", "speedit", "speed", "loss-second-moment")
CONTINUOUS_SAMPLERS = ("logit-normal", "uniform")


def build_discrete_sampler(name: str, alphas_cumprod: np.ndarray) -> TimestepSampler:
    """An IDDPM timestep sampler by name, for a process with these alpha_bar."""
    if name == "uniform":
        return UniformIndexTimesteps(len(alphas_cumprod))
    if name == "speedit":
        return SpeeDiTTimesteps(alphas_cumprod)
    if name == "speed":
        return SpeeDTimesteps(alphas_cumprod)
    if name == "loss-second-moment":
        return LossSecondMomentTimesteps(len(alphas_cumprod))
    raise ValueError(f"unknown timestep sampler {name!r} for iddpm: use one of {', '.join(DISCRETE_SAMPLERS)}")


def build_continuous_sampler(name: str) -> TimestepSampler:
    """A flow timestep sampler by name."""
    if name == "logit-normal":
        return LogitNormalTimesteps()
    if name == "uniform":
        return UniformFlowTimesteps()
    raise ValueError(f"unknown timestep sampler {name!r} for flow: use one of {', '.join(CONTINUOUS_SAMPLERS)}")
