"""The planner's activation bytes against the bytes autograd actually saves (saved-tensor hooks), on small models."""

import pytest
import torch

from dit_moe.models import DiT, preset_config
from dit_moe.models.masking import random_mask
from dit_moe.plan.activations import ActivationSpec, activation_bytes


def _saved_bytes(model, x, t, y, mask=None) -> int:
    """Bytes of the distinct storages autograd saves in one forward, parameters excluded.

    Under gradient checkpointing autograd saves only each block's inputs (it recomputes the rest), and the
    backward holds one block's saved tensors at a time: that is added, measured by running a block on its own.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    inputs = []
    hook = model.blocks[0].register_forward_pre_hook(lambda _module, args: inputs.extend(args))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x, t, y, mask=mask)
    hook.remove()
    total = sum(seen.values())
    if not model.grad_checkpointing:
        return total
    block_input, c = (tensor.detach().requires_grad_() for tensor in inputs)
    seen.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.blocks[0](block_input, c)
    return total + sum(seen.values())


CASES = {
    "moe": dict(num_experts=4, num_experts_per_tok=2),
    "moe-k1-no-shared": dict(num_experts=8, num_experts_per_tok=1, n_shared_experts=0, qk_norm=False),
    "fine-grained": dict(num_experts=8, num_experts_per_tok=2, expert_width_ratio=0.5, num_shared_experts=1),
    "moe-grouped-gemm": dict(num_experts=4, num_experts_per_tok=2, grouped_gemm="on"),
    "dense": dict(num_experts=0),
    "maskdit-decoder": dict(num_experts=4, decoder_depth=2, decoder_hidden_size=64, decoder_num_heads=4),
}


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("mask_ratio", [0.0, 0.5])
@pytest.mark.parametrize("case", sorted(CASES))
def test_activation_bytes_match_what_autograd_saves(case, mask_ratio, checkpointing):
    torch.manual_seed(0)
    batch = 4
    config = preset_config(
        "DiT-T/2", input_size=16, in_channels=4, num_classes=10, grad_checkpointing=checkpointing, **CASES[case]
    )
    model = DiT(config).train()
    x, t, y = torch.randn(batch, 4, 16, 16), torch.randint(0, 1000, (batch,)), torch.randint(0, 10, (batch,))
    mask = random_mask(batch, model.num_tokens, mask_ratio).mask if mask_ratio else None
    measured = _saved_bytes(model, x, t, y, mask)
    spec = ActivationSpec(
        batch, 4, checkpointing, mask_ratio, grouped_gemm=config.moe is not None and case.endswith("gemm")
    )
    planned = activation_bytes(config, spec)
    assert abs(planned - measured) <= 0.05 * measured, (planned, measured)


@pytest.mark.parametrize("grouped_gemm", ["on", "off"])
def test_bf16_activation_bytes_match_including_the_fp32_router_input(grouped_gemm):
    """Half precision: 2-byte activations, fp32 LayerNorm statistics, router input and scores; the grouped-GEMM
    path (what CUDA runs in bf16) also keeps the SiLU output and the SwiGLU product."""
    torch.manual_seed(0)
    config = preset_config(
        "DiT-T/2", input_size=16, in_channels=4, num_classes=10, num_experts=4, grouped_gemm=grouped_gemm
    )
    model = DiT(config).train().to(torch.bfloat16)
    x = torch.randn(4, 4, 16, 16, dtype=torch.bfloat16)
    measured = _saved_bytes(model, x, torch.randint(0, 1000, (4,)), torch.randint(0, 10, (4,)))
    planned = activation_bytes(config, ActivationSpec(4, 2, grouped_gemm=grouped_gemm == "on"))
    assert abs(planned - measured) <= 0.05 * measured, (planned, measured)
