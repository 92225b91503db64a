"""Sparse upcycling: a dense DiT checkpoint -> a DiT-MoE checkpoint that starts where the dense model was.

Every chosen block's dense feed-forward becomes an MoE layer whose E experts are copies of
that MLP (Komatsuzaki et al., "Sparse Upcycling", 2022). The upcycled model computes the
dense model's function at step 0, to float32 rounding, because

- the experts are identical, so whichever k experts a token is routed to compute f(h);
- the k routing weights are renormalised to sum to 1 (`norm_topk_prob=True`), so the
  combined output is sum_j g_j f(h) = f(h);
- there are no shared experts (`n_shared_experts=0`) adding anything on top.

The same holds for the sigmoid-bias router (`router="sigmoid-bias"`: renormalised weights, bias
0); expert-choice routing cannot start there, since a token may reach no expert.

Top-1 routing cannot meet this: the router renormalises only when k > 1 (DeepSeek-MoE's
convention), so a single weight would scale every token's output by its score ~1/E.

The router starts small, weight ~ N(0, router_init_std^2) with std 1e-3: the scores start
near uniform (no expert favoured, aux loss ~1) yet differ from token to token, so tokens
spread over the experts, the experts receive different gradients and stop being copies.

Expert noise (`expert_noise` = sigma > 0) perturbs each copy independently,
W_e = W + sigma * std(W) * Z with Z ~ N(0, 1) per element (zero-initialised biases, whose
std is 0, stay zero), to break the symmetry from step 0 instead. Output bound: the MoE
output is a convex combination of the chosen experts' outputs (weights >= 0, sum 1), so
per token  |MoE(h) - f(h)| <= max_e |f_e(h) - f(h)|,  where f_e is the dense MLP with
relatively sigma-perturbed weights; that difference is O(sigma) (first order in the
perturbation), and so is the change of the whole network's output.

The transform is pure (`upcycle_state_dict`: state dict in, state dict out, no files, no
forward); `dit_moe.upcycle.request.upcycle_checkpoint` adds reading any supported dense file and
writing an export that `dit_moe.checkpoint.load_model`, sample.py and the trainer's `--init-from` read.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from ..models import DiTConfig, MoEArgs
from ..models.experts import GELU_KEYS, SWIGLU_KEYS

ROUTER_INIT_STD = 1e-3
DEFAULT_AUX_LOSS_COEF = 0.01
UPCYCLE_ROUTERS = ("topk", "sigmoid-bias")  # the routers whose upcycled model computes the dense function
# Dense feed-forward layouts: stacked expert parameter -> dense key suffix under `blocks.N.mlp.`
# (the per-expert suffixes of experts.py are exactly the dense MLP's parameter names).
DENSE_LAYOUTS = {"gelu": GELU_KEYS, "swiglu": SWIGLU_KEYS}
_MLP_KEY = re.compile(r"^blocks\.(\d+)\.mlp\.(.+)$")


class UpcycleError(ValueError):
    """A checkpoint or request that cannot be upcycled; the message says how to fix it."""


def moe_layers_every(depth: int, every: int) -> list[int]:
    """Blocks that become MoE when every `every`-th block is upcycled: the last of each group,
    so every=2 gives 1, 3, 5, ... (GShard's "every other layer"), every=1 gives all blocks."""
    if every < 1:
        raise UpcycleError(f"moe_every must be >= 1, got {every}; use 1 for all blocks, 2 for every other block.")
    return [i for i in range(depth) if i % every == every - 1]


def dense_ffn_layout(state: dict[str, torch.Tensor], block: int) -> str:
    """ "gelu" (DiT's `mlp.fc1/fc2`) or "swiglu" (`mlp.gate_proj/up_proj/down_proj`) for one block."""
    present = {m.group(2) for key in state if (m := _MLP_KEY.match(key)) and int(m.group(1)) == block}
    for kind, layout in DENSE_LAYOUTS.items():
        if present == set(layout.values()):
            return kind
    raise UpcycleError(
        f"Block {block} has no dense MLP this tool knows (found mlp keys {sorted(present)}; expected "
        f"{sorted(GELU_KEYS.values())} or {sorted(SWIGLU_KEYS.values())}); pass a dense DiT checkpoint."
    )


def require_dense(config: DiTConfig, state: dict[str, torch.Tensor]) -> None:
    if config.moe is not None or any(".moe." in key for key in state):
        raise UpcycleError(
            "This checkpoint is already an MoE model (it has blocks.N.moe.* weights); "
            "upcycle a dense DiT checkpoint, or train this one directly with --init-from."
        )


def _check_routing(num_experts: int, num_experts_per_tok: int, router: str = "topk") -> None:
    if router not in UPCYCLE_ROUTERS:
        raise UpcycleError(
            f"router={router!r} cannot start where the dense model was (expert choice may leave a token without "
            f"experts); upcycle with one of {UPCYCLE_ROUTERS} and fine-tune."
        )
    if num_experts < 2:
        raise UpcycleError(f"num_experts={num_experts} gives no routing; pass --num-experts 2 or more (e.g. 8).")
    if num_experts_per_tok > num_experts:
        raise UpcycleError(
            f"num_experts_per_tok={num_experts_per_tok} exceeds num_experts={num_experts}; "
            "choose a top-k no larger than the number of experts."
        )
    if num_experts_per_tok < 2:
        raise UpcycleError(
            f"num_experts_per_tok={num_experts_per_tok} cannot start where the dense model was: the router "
            "renormalises only k >= 2 weights, so top-1 would scale every output by ~1/num_experts; use top-k >= 2."
        )


def _expert_copies(weight: torch.Tensor, num_experts: int, noise: float, generator: torch.Generator) -> torch.Tensor:
    """[E, *weight.shape]: E copies of `weight`, each plus independent noise * std(weight) * N(0, 1)."""
    copies = weight.detach().float().unsqueeze(0).repeat(num_experts, *([1] * weight.dim()))
    scale = noise * weight.detach().float().std() if noise > 0 and weight.numel() > 1 else 0.0
    if scale > 0:
        copies = copies + scale * torch.randn(copies.shape, generator=generator)
    return copies.to(weight.dtype).contiguous()


@dataclass(frozen=True)
class ExpertInit:
    """How the upcycled router and expert copies start (see the module doc)."""

    expert_noise: float = 0.0  # relative noise per expert copy: W + sigma * std(W) * N(0, 1); 0: exact copies
    router_init_std: float = ROUTER_INIT_STD  # router weights ~ N(0, std^2)
    seed: int = 0  # seeds every random draw of the transform

    def __post_init__(self) -> None:
        if self.expert_noise < 0 or self.router_init_std < 0:
            raise UpcycleError(
                f"expert_noise={self.expert_noise} and router_init_std={self.router_init_std} must be >= 0; "
                "they are standard deviations."
            )


def upcycle_moe_args(num_experts: int = 8, num_experts_per_tok: int = 2, **fields: Any) -> MoEArgs:
    """The MoE shape an upcycled model can have: renormalised top-k, no shared experts, full-width
    experts (their type is set from the dense MLP); `fields` sets router, aux_loss_coef, moe_layers..."""
    _check_routing(num_experts, num_experts_per_tok, fields.get("router", "topk"))
    values = {"n_shared_experts": 0, "norm_topk_prob": True, "aux_loss_coef": DEFAULT_AUX_LOSS_COEF, **fields}
    return MoEArgs(num_experts=num_experts, num_experts_per_tok=num_experts_per_tok, **values)


def _check_moe(moe: MoEArgs) -> None:
    """The MoE shapes whose upcycled model computes the dense function at step 0."""
    _check_routing(moe.num_experts, moe.num_experts_per_tok, moe.router)
    if moe.n_shared_experts or moe.num_shared_experts or not moe.norm_topk_prob or moe.expert_width_ratio != 1:
        raise UpcycleError(
            "An upcycled model has no shared experts, renormalised top-k weights and full-width experts "
            "(n_shared_experts=0, num_shared_experts=None, norm_topk_prob=True, expert_width_ratio=1); "
            "build its MoE shape with upcycle_moe_args."
        )


def _dense_kind(dense_state: dict[str, torch.Tensor], config: DiTConfig, layers: list[int]) -> str:
    """The one dense MLP layout of every block ("gelu" or "swiglu"), checked against the config's width."""
    depth, hidden = config.depth, config.hidden_size
    kinds = {dense_ffn_layout(dense_state, i) for i in range(depth)}
    if len(kinds) > 1:
        raise UpcycleError("The blocks mix GELU and SwiGLU dense MLPs; this tool upcycles one layout per model.")
    kind = kinds.pop()
    if kind == "swiglu" and len(layers) < depth:
        raise UpcycleError(
            "Partial upcycling of a SwiGLU model would leave SwiGLU dense blocks, which DiT cannot build; "
            "upcycle all blocks (drop --moe-layers / --moe-every)."
        )
    first_suffix = next(iter(DENSE_LAYOUTS[kind].values()))  # fc1.weight or gate_proj.weight: [I, C]
    widths = {dense_state[f"blocks.{i}.mlp.{first_suffix}"].shape[0] for i in range(depth)}
    intermediate = widths.pop()
    if widths or int(config.mlp_ratio * hidden) != intermediate:
        raise UpcycleError(
            f"The dense MLP widths {sorted(widths | {intermediate})} do not match mlp_ratio={config.mlp_ratio} "
            f"x hidden {hidden}; pass the config the checkpoint was trained with."
        )
    return kind


def _moe_blocks(depth: int, moe_layers: Optional[Sequence[int]]) -> list[int]:
    layers = list(range(depth)) if moe_layers is None else sorted({int(i) for i in moe_layers})
    if not layers or not all(0 <= i < depth for i in layers):
        raise UpcycleError(f"moe_layers {list(moe_layers or [])} must be a non-empty subset of blocks 0..{depth - 1}.")
    return layers


def upcycle_state_dict(
    dense_state: dict[str, torch.Tensor], dense_config: DiTConfig, moe: MoEArgs, init: ExpertInit = ExpertInit()
) -> tuple[DiTConfig, dict[str, torch.Tensor]]:
    """Turn a dense DiT state dict into a DiT-MoE one of shape `moe` computing the same function
    (see the module doc).

    `moe.moe_layers`: block indices to upcycle (None: all); the others keep their dense `mlp`.
    Dense GELU MLPs become GELU experts, dense SwiGLU MLPs SwiGLU experts (whatever `moe.expert_type`
    says). Every other tensor is passed through unchanged (the same tensor objects, never modified);
    all randomness comes from a generator seeded with `init.seed`. Returns (moe_config, moe_state).
    """
    require_dense(dense_config, dense_state)
    _check_moe(moe)
    layers = _moe_blocks(dense_config.depth, moe.moe_layers)
    kind = _dense_kind(dense_state, dense_config, layers)
    upcycled = set(layers)
    moe_state = {
        key: value
        for key, value in dense_state.items()
        if not ((m := _MLP_KEY.match(key)) and int(m.group(1)) in upcycled)
    }
    # Routers first, from their own draws, so the routing does not depend on expert_noise.
    generator = torch.Generator().manual_seed(init.seed)
    for i in layers:
        # fp32 like the router's numerics; load_state_dict copies into the model's dtype anyway.
        router_weight = torch.randn(moe.num_experts, dense_config.hidden_size, generator=generator)
        moe_state[f"blocks.{i}.moe.gate.weight"] = init.router_init_std * router_weight
        if moe.router == "sigmoid-bias":
            moe_state[f"blocks.{i}.moe.gate.expert_bias"] = torch.zeros(moe.num_experts)
    for i in layers:
        for stacked, suffix in DENSE_LAYOUTS[kind].items():
            dense = dense_state[f"blocks.{i}.mlp.{suffix}"]
            copies = _expert_copies(dense, moe.num_experts, init.expert_noise, generator)
            moe_state[f"blocks.{i}.moe.experts.{stacked}"] = copies
    moe_args = dataclasses.replace(
        moe, expert_type=kind, moe_layers=None if len(layers) == dense_config.depth else layers
    )
    return dense_config.replace(moe=moe_args), moe_state
