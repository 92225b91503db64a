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
forward); `upcycle_checkpoint` adds reading any supported dense file and writing an export
that `dit_moe.checkpoint.load_model`, sample.py and the trainer's `--init-from` read.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..checkpoint import infer_config, read_checkpoint_file, save_export
from ..models import MODEL_SIZES, DiT_models, DiTConfig, preset_name
from ..models.experts import GELU_KEYS, SWIGLU_KEYS

ROUTER_INIT_STD = 1e-3
DEFAULT_AUX_LOSS_COEF = 0.01
UPCYCLE_ROUTERS = ("topk", "sigmoid-bias")  # the routers whose upcycled model computes the dense function
# Dense feed-forward layouts: stacked expert parameter -> dense key suffix under `blocks.N.mlp.`
# (the per-expert suffixes of experts.py are exactly the dense MLP's parameter names).
DENSE_LAYOUTS = {"gelu": GELU_KEYS, "swiglu": SWIGLU_KEYS}
_MLP_KEY = re.compile(r"^blocks\.(\d+)\.mlp\.(.+)$")
_WIDTHS = {hidden for _, hidden, _ in MODEL_SIZES.values()}


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


def _require_dense(config: DiTConfig, state: dict[str, torch.Tensor]) -> None:
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


def upcycle_state_dict(
    dense_state: dict[str, torch.Tensor],
    dense_config: DiTConfig,
    num_experts: int,
    num_experts_per_tok: int,
    moe_layers: Optional[Sequence[int]] = None,
    expert_noise: float = 0.0,
    router_init_std: float = ROUTER_INIT_STD,
    seed: int = 0,
    aux_loss_coef: float = DEFAULT_AUX_LOSS_COEF,
    router: str = "topk",
) -> tuple[DiTConfig, dict[str, torch.Tensor]]:
    """Turn a dense DiT state dict into a DiT-MoE one computing the same function (see the module doc).

    `moe_layers`: block indices to upcycle (None: all); the others keep their dense `mlp`.
    Dense GELU MLPs become GELU experts (`expert_type="gelu"`), dense SwiGLU MLPs SwiGLU experts.
    Every other tensor is passed through unchanged (the same tensor objects, never modified);
    all randomness comes from a generator seeded with `seed`. Returns (moe_config, moe_state).
    """
    _require_dense(dense_config, dense_state)
    _check_routing(num_experts, num_experts_per_tok, router)
    if expert_noise < 0 or router_init_std < 0:
        raise UpcycleError(
            f"expert_noise={expert_noise} and router_init_std={router_init_std} must be >= 0; "
            "they are standard deviations."
        )
    depth, hidden = dense_config.depth, dense_config.hidden_size
    layers = list(range(depth)) if moe_layers is None else sorted({int(i) for i in moe_layers})
    if not layers or not all(0 <= i < depth for i in layers):
        raise UpcycleError(f"moe_layers {list(moe_layers or [])} must be a non-empty subset of blocks 0..{depth - 1}.")

    kinds = {dense_ffn_layout(dense_state, i) for i in range(depth)}
    if len(kinds) > 1:
        raise UpcycleError("The blocks mix GELU and SwiGLU dense MLPs; this tool upcycles one layout per model.")
    kind = kinds.pop()
    if kind == "swiglu" and len(layers) < depth:
        raise UpcycleError(
            "Partial upcycling of a SwiGLU model would leave SwiGLU dense blocks, which DiT cannot build; "
            "upcycle all blocks (drop --moe-layers / --moe-every)."
        )
    layout = DENSE_LAYOUTS[kind]
    first_suffix = next(iter(layout.values()))  # fc1.weight or gate_proj.weight: [I, C]
    widths = {dense_state[f"blocks.{i}.mlp.{first_suffix}"].shape[0] for i in range(depth)}
    intermediate = widths.pop()
    if widths or int(dense_config.mlp_ratio * hidden) != intermediate:
        raise UpcycleError(
            f"The dense MLP widths {sorted(widths | {intermediate})} do not match mlp_ratio={dense_config.mlp_ratio} "
            f"x hidden {hidden}; pass the config the checkpoint was trained with."
        )

    upcycled = set(layers)
    moe_state = {
        key: value
        for key, value in dense_state.items()
        if not ((m := _MLP_KEY.match(key)) and int(m.group(1)) in upcycled)
    }
    # Routers first, from their own draws, so the routing does not depend on expert_noise.
    generator = torch.Generator().manual_seed(seed)
    for i in layers:
        # fp32 like the router's numerics; load_state_dict copies into the model's dtype anyway.
        router_weight = torch.randn(num_experts, hidden, generator=generator)
        moe_state[f"blocks.{i}.moe.gate.weight"] = router_init_std * router_weight
        if router == "sigmoid-bias":
            moe_state[f"blocks.{i}.moe.gate.expert_bias"] = torch.zeros(num_experts)
    for i in layers:
        for stacked, suffix in layout.items():
            dense = dense_state[f"blocks.{i}.mlp.{suffix}"]
            moe_state[f"blocks.{i}.moe.experts.{stacked}"] = _expert_copies(dense, num_experts, expert_noise, generator)

    moe_config = dense_config.replace(
        num_experts=num_experts,
        num_experts_per_tok=num_experts_per_tok,
        n_shared_experts=0,
        expert_type=kind,
        norm_topk_prob=True,
        moe_layers=None if len(layers) == depth else layers,
        aux_loss_coef=aux_loss_coef,
        router=router,
    )
    return moe_config, moe_state


def _infer_dense_config(state: dict[str, torch.Tensor], num_heads: Optional[int]) -> DiTConfig:
    """infer_config for a dense file, SwiGLU dense MLPs included.

    infer_config reads the MLP width from `mlp.fc1.weight` only; a SwiGLU `mlp.gate_proj.weight`
    has the same [I, C] shape, so it stands in for it in a shallow key view.
    """
    embed = state.get("x_embedder.proj.weight")
    if embed is not None and not any(".moe." in key for key in state):
        dense_ffn_layout(state, 0)  # an unknown MLP layout fails here, with a sentence
        if num_heads is None and embed.shape[0] not in _WIDTHS and "blocks.0.attn.q_norm.weight" not in state:
            raise UpcycleError(
                f"Cannot infer the head count of a width-{embed.shape[0]} model from its weights; pass --num-heads."
            )
    view = dict(state)
    for key, value in state.items():
        if key.endswith(".mlp.gate_proj.weight"):
            view.setdefault(key.replace(".mlp.gate_proj.", ".mlp.fc1."), value)
    return infer_config(view, num_heads=num_heads)  # None: inferred from the width or q_norm


def _check_request(
    config: DiTConfig,
    src: Path,
    model: Optional[str],
    image_size: Optional[int],
    input_size: Optional[int],
    num_classes: Optional[int],
) -> None:
    """Flags that describe the source must agree with what the file holds."""
    name = preset_name(config)
    if model is not None:
        if model not in DiT_models:
            raise UpcycleError(f"Unknown --model {model!r}; choose one of {sorted(DiT_models)}.")
        if model != name:
            shape = f"depth {config.depth}, width {config.hidden_size}, patch {config.patch_size}"
            held = name or f"a custom model ({shape})"
            fix = f"pass --model {name} or drop --model" if name else "drop --model"
            raise UpcycleError(f"--model {model} does not match {src}, which holds {held}; {fix}.")
    if image_size is not None:
        # 4 channels: an SD-VAE latent (8x downsampling, DiT's convention); otherwise pixel space.
        latent = image_size // 8 if config.in_channels == 4 else image_size
        if latent != config.input_size:
            expected = config.input_size * 8 if config.in_channels == 4 else config.input_size
            raise UpcycleError(
                f"--image-size {image_size} does not match {src}, which was trained at input size "
                f"{config.input_size} (image size {expected}); pass --image-size {expected} or drop it."
            )
    if input_size is not None and input_size != config.input_size:
        raise UpcycleError(
            f"--input-size {input_size} does not match {src}, whose input size is {config.input_size}; "
            f"pass --input-size {config.input_size} or drop it."
        )
    if num_classes is not None and num_classes != config.num_classes:
        raise UpcycleError(
            f"--num-classes {num_classes} does not match {src}, which has {config.num_classes} classes; "
            f"pass --num-classes {config.num_classes} or drop it."
        )


def upcycle_checkpoint(
    src_path: str | os.PathLike,
    out_path: str | os.PathLike,
    num_experts: int,
    num_experts_per_tok: int,
    *,
    model: Optional[str] = None,
    image_size: Optional[int] = None,
    input_size: Optional[int] = None,
    num_classes: Optional[int] = None,
    num_heads: Optional[int] = None,
    moe_layers: Optional[Sequence[int]] = None,
    moe_every: Optional[int] = None,
    expert_noise: float = 0.0,
    router_init_std: float = ROUTER_INIT_STD,
    seed: int = 0,
    aux_loss_coef: float = DEFAULT_AUX_LOSS_COEF,
    router: str = "topk",
) -> tuple[DiTConfig, DiTConfig, Path]:
    """Upcycle the dense checkpoint at `src_path` (EMA weights when it has them) into an export at `out_path`.

    Reads every format `read_checkpoint_file` reads (official DiT state dict, train.py dict, our
    exports, DeepSpeed dirs); the architecture comes from the file's stored config or its
    tensor shapes. `model`, `image_size` (pixels; input size = image_size // 8 for a
    4-channel latent model, image_size otherwise), `input_size` and `num_classes` are
    checked against the file. `num_heads` is needed only for non-preset widths. The export
    (`.safetensors` by suffix, else a torch `.pt`) holds the weights, the MoE config and the
    source's objective config when it records one; the source file is only read. Returns (dense_config, moe_config, written path).
    """
    src, out = Path(src_path), Path(out_path)
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise UpcycleError(f"--out {out} is the source checkpoint; write the upcycled model to another path.")
    if moe_layers is not None and moe_every is not None:
        raise UpcycleError("Pass either --moe-layers or --moe-every, not both.")
    contents = read_checkpoint_file(src, prefer_ema=True)
    stored, state = contents.model_config, contents.state_dict
    dense_config = stored if stored is not None else _infer_dense_config(state, num_heads)
    _require_dense(dense_config, state)
    _check_request(dense_config, src, model, image_size, input_size, num_classes)
    if moe_every is not None:
        moe_layers = moe_layers_every(dense_config.depth, moe_every)
    moe_config, moe_state = upcycle_state_dict(
        state,
        dense_config,
        num_experts,
        num_experts_per_tok,
        moe_layers=moe_layers,
        expert_noise=expert_noise,
        router_init_std=router_init_std,
        seed=seed,
        aux_loss_coef=aux_loss_coef,
        router=router,
    )
    return dense_config, moe_config, save_export(out, moe_config, moe_state, objective=contents.objective)
