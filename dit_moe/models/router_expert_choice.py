"""Expert-choice router: every expert picks its top-C tokens of the batch (Zhou et al., "Mixture-of-Experts
with Expert Choice Routing", NeurIPS 2022; for diffusion, EC-DiT, Sun et al. 2024).

Notation (as in router.py):
    M, E, k   tokens routed together (the micro-batch's N x T), experts, average experts per token
    s_{t,e}   softmax score of expert e for token t over the experts     -> `scores` [M, E]
    C         capacity, ceil(cf * M * k / E) tokens per expert (cf = capacity_factor, 1 by default),
              so the experts process cf * k * M token copies, the FLOPs of top-k token choice at cf = 1
    tau_e     inference threshold of expert e                            -> `threshold` / `threshold_norm`

Training: expert e takes the C tokens with the largest s_{t,e} over the M tokens, with weight
s_{t,e}; a token can be taken by any number of experts, none included (it then passes through
the residual and the shared experts only). Every expert is full, so there is no balancing loss.

Inference rule (batch-independent): selecting over the batch would make a sample's output depend
on the other samples and on the batch size, so in eval mode token t goes to expert e iff
s_{t,e} >= tau_e. tau_e is calibrated during training, like BatchNorm's running statistics: each
training forward takes the C-th largest score of every expert (the score of the last token it
accepted) and folds it into a debiased exponential moving average (momentum 0.99),
tau = threshold / threshold_norm with threshold_norm = 1 - 0.99^n after n forwards. Both are
persistent fp32 buffers, so checkpoints and exports carry them. An expert then takes, in expectation,
the share C / M of tokens it took in training. A router never calibrated (threshold_norm = 0,
also a file written for another router) refuses eval mode (`UncalibratedRouter`): routing over the
batch would make a sample depend on the others. The trainer recalibrates the thresholds for the
EMA weights before it exports them (dit_moe.train.routers); `calibrated` tracks, without a
host sync per forward, whether the buffers hold a calibration.

The forward returns the dense slot layout [M, E]: slot e of token t holds expert e (id e,
weight s_{t,e}) when e took t, else the empty id E with weight 0; the MoE layer's dispatch drops
empty slots.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..utils.errors import UserError
from .router import LinearGate

THRESHOLD_MOMENTUM = 0.99


UNCALIBRATED = (
    "This expert-choice model has no calibrated inference thresholds (a file written before they were saved, "
    "or a model never trained), so its routing would depend on the batch; sample from an export of this "
    "version's trainer (--export-only True --resume RUN_DIR writes one from a checkpoint)."
)


class UncalibratedRouter(UserError):
    """An expert-choice model asked to route in eval mode without inference thresholds."""


class ExpertChoiceRouter(LinearGate):
    """Softmax scores, each expert's top-C tokens in training, a calibrated threshold in eval mode."""

    empty_slots = True
    state_buffers = ("threshold", "threshold_norm")

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, capacity_factor: Optional[float] = None) -> None:
        super().__init__(hidden_size, num_experts, top_k)
        self.capacity_factor = 1.0 if capacity_factor is None else capacity_factor
        self.register_buffer("threshold", torch.zeros(num_experts))
        self.register_buffer("threshold_norm", torch.zeros(()))
        self.calibrated = False
        self.register_load_state_dict_post_hook(_note_calibration)

    def capacity(self, num_tokens: int) -> int:
        """C = ceil(cf * M * k / E), at most M."""
        return min(num_tokens, math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Route x [..., C]: returns fp32 weights [M, E], int64 expert_ids [M, E] (E: empty), fp32 scores [M, E]."""
        scores = self.logits(x).softmax(dim=-1)  # [M, E]
        if self.training:
            top_scores, top_tokens = torch.topk(scores, k=self.capacity(scores.shape[0]), dim=0)  # [C, E] each
            chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(0, top_tokens, True)  # [M, E]
            if self.records_side_effects:
                self._calibrate(top_scores[-1])
        else:
            if not self.calibrated:
                raise UncalibratedRouter(UNCALIBRATED)
            chosen = scores >= self.threshold / self.threshold_norm.clamp_min(1e-12)
        experts = torch.arange(self.num_experts, device=scores.device).expand_as(scores)
        expert_ids = torch.where(chosen, experts, self.num_experts)
        return scores * chosen, expert_ids, scores

    @torch.no_grad()
    def _calibrate(self, last_accepted: Tensor) -> None:
        """Fold the C-th score of every expert [E] into the debiased EMA of the inference threshold."""
        self.threshold.mul_(THRESHOLD_MOMENTUM).add_(last_accepted, alpha=1 - THRESHOLD_MOMENTUM)
        self.threshold_norm.mul_(THRESHOLD_MOMENTUM).add_(1 - THRESHOLD_MOMENTUM)
        self.calibrated = True

    @torch.no_grad()
    def note_loaded_thresholds(self) -> None:
        """Whether thresholds put in place by a load are a calibration (one host sync)."""
        self.calibrated = bool(self.threshold_norm > 0)

    def reset_calibration(self) -> None:
        self.threshold.zero_()
        self.threshold_norm.zero_()
        self.calibrated = False


def _note_calibration(module: ExpertChoiceRouter, incompatible_keys) -> None:
    """Load-time post-hook of `load_state_dict`."""
    module.note_loaded_thresholds()


def expert_choice_routers(model: nn.Module) -> dict[str, ExpertChoiceRouter]:
    """The expert-choice routers of `model` by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ExpertChoiceRouter)}


def check_calibrated(model: nn.Module) -> None:
    """Raise `UncalibratedRouter` (one sentence) when an expert-choice router of `model` has no thresholds."""
    if not all(router.calibrated for router in expert_choice_routers(model).values()):
        raise UncalibratedRouter(UNCALIBRATED)
