"""Top-k token-choice router of an MoE layer (DiT-MoE's `MoEGate`), in fp32, and what every router shares.

Notation (DiT-MoE / DeepSeek-MoE):
    M       tokens routed together (N samples x T patches, flattened)
    E, k    number of routed experts, experts per token (top-k)
    s_{t,e} softmax score of expert e for token t            -> `scores`   [M, E]
    g_{t,j} weight of the j-th chosen expert of token t      -> `weights`  [M, k]
    f_e     fraction of the M*k assignments that go to e
    P_e     mean score of expert e over the tokens
    aux     E * sum_e f_e * P_e   (1 when perfectly balanced)

The router's forward returns exactly `(weights, expert_ids, scores)`, so a forward hook on
`moe.gate` sees everything an analysis needs; the losses are separate methods fed from
that tuple (and, for the z-loss, the logits), so nothing is kept on the module.

Every router (this one, `router_expert_choice.ExpertChoiceRouter`,
`router_sigmoid.SigmoidBiasRouter`) is a `LinearGate` with that forward: `weights` and
`expert_ids` are [M, slots] (`slots` = k for token choice); a slot whose id is E is empty
(weight 0, routed nowhere), which only routers with `empty_slots = True` produce.
`load_balancing_loss` exists where `has_balancing_loss` is True.

Training side effects (the sigmoid-bias load count, expert choice's threshold calibration) happen
once per forward that the optimizer step sees: `records_side_effects` is False inside
`recomputing()`, which gradient checkpointing enters for the forward it repeats in backward.
"""

from __future__ import annotations

import contextvars
import math
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_RECOMPUTING = contextvars.ContextVar("dit_moe_recomputing", default=False)


@contextmanager
def recomputing() -> Iterator[None]:
    """Inside: a forward that repeats one already run (gradient checkpointing's recomputation in
    backward), so routers leave their training state alone."""
    token = _RECOMPUTING.set(True)
    try:
        yield
    finally:
        _RECOMPUTING.reset(token)


class LinearGate(nn.Module):
    """The affinity map every router shares: a linear gate without bias (`weight` [E, C]) in fp32."""

    empty_slots = False  # whether expert_ids may hold the empty-slot id E
    has_balancing_loss = False
    # Persistent router state (fp32, and zero when a file written for another router lacks it)
    # and the non-persistent buffers that also stay fp32.
    state_buffers: tuple[str, ...] = ()
    fp32_buffers: tuple[str, ...] = ()

    def __init__(self, hidden_size: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.reset_parameters()
        self.register_load_state_dict_pre_hook(_zero_missing_state)

    @property
    def slots(self) -> int:
        """Width of `weights` / `expert_ids` per token: k, or E for a router with empty slots."""
        return self.num_experts if self.empty_slots else self.top_k

    def _apply(self, fn, recurse: bool = True):
        # A bf16 model (DeepSpeed casts every floating buffer) would round away this state's small
        # updates (a 1e-3 bias step, an EMA increment): cast it back, after which it stays fp32.
        super()._apply(fn, recurse)
        for name in self.state_buffers + self.fp32_buffers:
            setattr(self, name, getattr(self, name).float())
        return self

    @property
    def records_side_effects(self) -> bool:
        """Whether this forward updates router state: training mode, and not a checkpointed recomputation."""
        return self.training and not _RECOMPUTING.get()

    def reset_parameters(self) -> None:
        # DiT-MoE's MoEGate init (nn.Linear's default); DiT's xavier init only touches nn.Linear.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def logits(self, x: Tensor) -> Tensor:
        """Router logits [M, E] in fp32 for x [..., C], outside any autocast region."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.reshape(-1, x.shape[-1]).float(), self.weight.float())  # [M, C] -> [M, E]

    def z_loss(self, x: Tensor) -> Tensor:
        """Unweighted router z-loss mean_t logsumexp_e(logits)^2 (ST-MoE), for x [..., C]."""
        return torch.logsumexp(self.logits(x), dim=-1).square().mean()


class TopKRouter(LinearGate):
    """Softmax scores, top-k token choice (Shazeer et al., "Outrageously Large Neural Networks", 2017;
    DiT-MoE, Fei et al., "Scaling Diffusion Transformers to 16 Billion Parameters", 2024)."""

    has_balancing_loss = True

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, norm_topk_prob: bool = False) -> None:
        super().__init__(hidden_size, num_experts, top_k)
        self.norm_topk_prob = norm_topk_prob

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Route x [..., C]: returns fp32 weights [M, k], int64 expert_ids [M, k], fp32 scores [M, E]."""
        scores = self.logits(x).softmax(dim=-1)
        weights, expert_ids = torch.topk(scores, k=self.top_k, dim=-1)
        if self.norm_topk_prob and self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights, expert_ids, scores

    def load_balancing_loss(self, expert_ids: Tensor, scores: Tensor, num_samples: int, per_sample: bool) -> Tensor:
        """Unweighted load-balancing loss E * sum_e f_e * P_e (DiT-MoE's MoEGate formulas).

        `per_sample=False`: f and P over all M tokens of the batch.
        `per_sample=True` (DiT-MoE's `seq_aux`): f and P within each of the `num_samples`
        samples, the loss averaged over samples.
        """
        E = self.num_experts
        ids = expert_ids.reshape(num_samples, -1)  # [M, k] -> [N, T*k]
        if not per_sample:
            ids = ids.reshape(1, -1)  # [N, T*k] -> [1, M*k]
        groups, assignments = ids.shape
        f = torch.zeros(groups, E, device=scores.device, dtype=scores.dtype)
        f.scatter_add_(1, ids, torch.ones_like(ids, dtype=scores.dtype)).div_(assignments)  # [G, E]
        P = scores.reshape(groups, -1, E).mean(dim=1)  # [M, E] -> [G, M/G, E] -> [G, E]
        return (E * f * P).sum(dim=1).mean()


def _zero_missing_state(module: LinearGate, state_dict: dict, prefix: str, *args) -> None:
    """Load-time pre-hook: router state a file lacks (a top-k or upcycled checkpoint) starts at zero."""
    for name in module.state_buffers:
        state_dict.setdefault(prefix + name, torch.zeros_like(getattr(module, name)))
