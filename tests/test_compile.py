"""`--compile` (dit_moe.models.compile): compiled DiTs compute what eager ones do, and the flag reaches the model."""

import copy

import pytest
import torch

from dit_moe.models.compile import compile_model
from dit_moe.models.config import MoEArgs
from dit_moe.models.moe import MoEFeedForward
from dit_moe.train.build import build_training_model
from dit_moe.train.config import load_config

from tiny_dit import tiny_model

FP32 = dict(rtol=1e-5, atol=1e-5)  # fp32 rounding: inductor fuses and reorders the same sums


def forward_backward(model, x, t, y):
    model.zero_grad(set_to_none=True)
    out, aux = model(x, t, y, return_aux=True)
    (out.square().mean() + sum(aux.values())).backward()
    return out.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
@pytest.mark.parametrize("grad_checkpointing", [False, True])
def test_compiled_blocks_train_like_eager_in_fp32(grad_checkpointing):
    """Blocks compiled: training forward (with the aux losses) and every gradient equal eager's to fp32 rounding."""
    eager = tiny_model(num_experts=4, num_experts_per_tok=2, depth=2, grad_checkpointing=grad_checkpointing).train()
    compiled = compile_model(copy.deepcopy(eager), "blocks")
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2) * 999, torch.tensor([1, 2])
    out, grads = forward_backward(eager, x, t, y)
    out_c, grads_c = forward_backward(compiled, x, t, y)
    torch.testing.assert_close(out_c, out, **FP32)
    assert grads_c.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grads_c[name], grad, **FP32, msg=name)


@pytest.mark.slow
def test_compiled_model_samples_like_eager_in_fp32():
    """The whole model compiled: the guided sampling forward equals eager's to fp32 rounding."""
    eager = tiny_model(num_experts=4, num_experts_per_tok=2, depth=2)
    compiled = compile_model(copy.deepcopy(eager), "model")
    x, t, y = torch.randn(4, 4, 8, 8), torch.full((4,), 500.0), torch.tensor([1, 2, 10, 10])
    with torch.no_grad():
        torch.testing.assert_close(
            compiled.forward_with_cfg(x, t, y, 4.0), eager.forward_with_cfg(x, t, y, 4.0), **FP32
        )


@pytest.mark.slow
def test_dropless_moe_layer_compiles_to_one_graph():
    """Router, dispatch, grouped GEMM, combine and aux loss trace as one graph (fullgraph: no break, no
    host sync) and compute eager's output and gradients (bf16: torch._grouped_mm's compiled form needs it)."""
    torch.manual_seed(0)
    layer = MoEFeedForward(64, 128, MoEArgs(num_experts=4, num_experts_per_tok=2, grouped_gemm="on"))
    layer = layer.to(torch.bfloat16).train()
    x = torch.randn(2, 16, 64, dtype=torch.bfloat16)

    def run(module):
        inp = x.clone().requires_grad_(True)
        y, aux = module(inp)
        (y.float().square().mean() + sum(aux.values())).backward()
        return y.detach(), inp.grad, layer.experts.gate_proj.grad.clone()

    want = run(layer)
    layer.zero_grad(set_to_none=True)
    got = run(torch.compile(layer, fullgraph=True))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2)


def test_compile_flag_reaches_the_model_and_keeps_its_keys():
    cfg = load_config(["--model", "DiT-T/2", "--num-experts", "4", "--compile", "blocks"])
    assert cfg.run.compile == "blocks"
    model = build_training_model(cfg, cfg.model.architecture(8, 4, 10))
    assert all(block._compiled_call_impl is not None for block in model.blocks)
    assert model._compiled_call_impl is None
    plain = build_training_model(
        load_config(["--model", "DiT-T/2", "--num-experts", "4"]), cfg.model.architecture(8, 4, 10)
    )
    assert plain.blocks[0]._compiled_call_impl is None
    assert list(compile_model(plain, "model").state_dict()) == list(model.state_dict())
    assert plain._compiled_call_impl is not None


def test_unknown_compile_mode_is_one_sentence():
    with pytest.raises(ValueError, match=r"--compile must be one of off, blocks, model, got 'all'"):
        load_config(["--compile", "all"])
