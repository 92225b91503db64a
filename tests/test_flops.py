"""FLOP accounting (dit_moe.models.flops) against torch's own FLOP counter and DiT's published count."""

from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dit_moe.models import DiT, flops, preset_config
from dit_moe.models.config import ROUTERS
from dit_moe.models.masking import random_mask
from dit_moe.models.moe import ExpertsPerTokenMeter

from reference_dit import randomize_
from tiny_dit import tiny_config

# Every expert shape the trainer offers (--num-experts-per-tok, --n-shared-experts, --num-shared-experts,
# --expert-width-ratio, --expert-type, --capacity-factor, --moe-layers), each run under every router.
EXPERT_SHAPES = {
    "dit-moe": dict(num_experts=4, num_experts_per_tok=2),  # one shared SwiGLU of width 2C
    "gelu-top1": dict(num_experts=4, num_experts_per_tok=1, n_shared_experts=0, expert_type="gelu"),
    "fine-grained": dict(
        num_experts=8, num_experts_per_tok=3, expert_width_ratio=0.25, n_shared_experts=0, num_shared_experts=1
    ),
    "capacity-2": dict(num_experts=4, num_experts_per_tok=2, capacity_factor=2.0),  # token choice: never full
    "capacity-1.5": dict(num_experts=8, num_experts_per_tok=2, capacity_factor=1.5, moe_layers=[0, 3]),
    "z-loss": dict(num_experts=4, num_experts_per_tok=2, z_loss_coef=1e-3, aux_loss_per_sample=True),  # + aux loss
}


def inputs(config, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, config.input_size, config.input_size, generator=g)
    return x, torch.rand(batch, generator=g) * 999, torch.randint(0, config.num_classes, (batch,), generator=g)


def counted_forward_flops(config, batch: int = 3, mask_ratio: float = 0.0, model=None, train: bool = False) -> int:
    """Matmul FLOPs torch's FlopCounterMode sees in one forward of `batch` images."""
    model = (model or DiT(config)).train(train)
    x, t, y = inputs(config, batch)
    mask = random_mask(batch, model.num_tokens, mask_ratio).mask if mask_ratio else None
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t, y, mask=mask)
    return counter.get_total_flops()


def calibrated(config, forwards: int = 4, batch: int = 8):
    """A random-weight model whose expert-choice thresholds are calibrated by training-mode forwards."""
    torch.manual_seed(0)
    model = randomize_(DiT(config)).train()
    with torch.no_grad():
        for seed in range(forwards):
            model(*inputs(config, batch, seed))
    return model.eval()


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("shape", EXPERT_SHAPES)
def test_training_forward_count_equals_torch_flop_counter_for_every_router_and_expert_shape(router, shape):
    """Widths from the built layer, shared experts of either layout, and expert choice's capacity over
    the micro-batch's M tokens: E min(M, ceil(cf M k / E)) copies per layer."""
    config = tiny_config(attn_backend="math", router=router, **EXPERT_SHAPES[shape])
    batch = 3
    tokens = batch * (config.input_size // config.patch_size) ** 2
    experts = flops.routed_experts_per_token(config.moe, tokens)
    model = randomize_(DiT(config))
    with ExpertsPerTokenMeter(model) as meter:
        counted = counted_forward_flops(config, batch, model=model, train=True)
    moe = config.moe
    if router != "expert-choice" and moe.capacity_factor and moe.capacity_factor * moe.num_experts_per_tok < 4:
        # token choice with a capacity an expert can fill: the count is an upper bound, the measured copies exact
        assert sum(flops.forward_flops(config, None, experts, training=True).values()) * batch >= counted
        measured = sum(flops.forward_flops(config, None, meter.per_layer(), training=True).values()) * batch
        assert measured == pytest.approx(counted, abs=batch)  # per-image counts are rounded to whole FLOPs
        return
    assert meter.per_layer() == [experts] * len(model.moe_blocks)
    assert sum(flops.forward_flops(config, None, experts, training=True).values()) * batch == counted
    assert flops.training_flops(config, micro_batch=batch) * batch == 3 * counted


@pytest.mark.parametrize("shape", EXPERT_SHAPES)
def test_expert_choice_sampling_count_equals_torch_flop_counter_from_the_measured_experts_per_token(shape):
    config = tiny_config(attn_backend="math", router="expert-choice", **EXPERT_SHAPES[shape])
    model = calibrated(config)
    with ExpertsPerTokenMeter(model) as meter:
        counted = counted_forward_flops(config, batch=1, model=model)
    measured = meter.per_layer()
    assert len(measured) == len(model.moe_blocks) and all(0 < a <= config.moe.num_experts for a in measured)
    assert sum(flops.forward_flops(config, experts_per_token=measured).values()) == counted
    assert flops.guided_step_flops(config, measured) == 2 * counted


def test_expert_choice_capacity_factor_and_fine_grained_widths_are_counted():
    """Two counts the accounting once got wrong: expert choice at cf 2 processes 2k copies per token,
    and 16 experts of width I/4, top-7, plus one shared expert of width I/4 activate 2 I of width."""
    T, C = 256, 1152
    ec = preset_config("DiT-XL/2", num_experts=8, num_experts_per_tok=2, router="expert-choice", capacity_factor=2.0)
    assert flops.forward_flops(ec)["experts"] == 28 * 2 * T * 4 * 3 * C * 4 * C
    fine = preset_config(
        "DiT-XL/2", num_experts=16, num_experts_per_tok=7, expert_width_ratio=0.25, n_shared_experts=0,
        num_shared_experts=1,
    )  # fmt: skip
    counts = flops.forward_flops(fine)
    assert counts["experts"] == 28 * 2 * T * 7 * 3 * C * C and counts["shared"] == 28 * 2 * T * 3 * C * C


@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_experts=4, num_experts_per_tok=2),  # routed SwiGLU experts + the shared one
        dict(num_experts=4, num_experts_per_tok=1, n_shared_experts=0, expert_type="gelu"),
        dict(num_experts=4, num_experts_per_tok=2, moe_layers=[1, 4], learn_sigma=False),
        dict(num_experts=0),  # the dense DiT
        dict(num_experts=4, decoder_depth=2, decoder_hidden_size=64, decoder_num_heads=2),  # MaskDiT
    ],
)
def test_forward_count_equals_torch_flop_counter(overrides):
    config = tiny_config(attn_backend="math", **overrides)  # math attention: its matmuls are visible to the counter
    assert sum(flops.forward_flops(config).values()) * 3 == counted_forward_flops(config)


def test_masked_encoder_count_equals_torch_flop_counter():
    config = tiny_config(attn_backend="math", num_experts=4, decoder_depth=1, decoder_hidden_size=64)
    visible = 16 - round(0.5 * 16)
    assert sum(flops.forward_flops(config, visible).values()) * 3 == counted_forward_flops(config, mask_ratio=0.5)


def test_components_of_dit_moe_xl_and_dits_published_count():
    """Dense DiT-XL/2 at 256 px: DiT reports 118.6 GFLOPs, counting a multiply-add once (Peebles & Xie,
    table 4); DiT-MoE-XL/2 8E2A routes each token through 2 of 8 experts plus a 2C-wide shared expert."""
    dense = flops.forward_flops(preset_config("DiT-XL/2", num_experts=0))
    assert sum(dense.values()) / 2 == pytest.approx(118.6e9, rel=0.005)
    moe = flops.forward_flops(preset_config("DiT-XL/2", num_experts=8, num_experts_per_tok=2))
    T, C = 256, 1152
    assert moe["experts"] == 28 * 2 * T * 2 * 3 * C * 4 * C
    assert moe["shared"] == 28 * 2 * T * 3 * C * 2 * C
    assert moe["router"] == 28 * 2 * T * C * 8
    assert moe["attention"] == dense["attention"] and "mlp" not in moe
    config = preset_config("DiT-XL/2")
    assert flops.training_flops(config) == 3 * sum(flops.forward_flops(config).values())
    assert flops.guided_step_flops(config) == 2 * sum(flops.forward_flops(config).values())


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.4e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989.4e12),
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("CPU (2 threads)", None),
    ],
)
def test_vendor_peak_by_device_name(name, peak):
    assert flops.vendor_peak(name) == peak


def test_measured_gemm_rate_and_utilisation():
    rate = flops.measure_gemm_rate(torch.device("cpu"), torch.float32, size=128, repeats=2)
    assert rate > 1e6
    u = flops.utilisation(0.5 * rate, rate, None)
    assert u == {"tflops": 0.5 * rate / 1e12, "of_gemm": 0.5, "mfu": None}
    assert flops.utilisation(400e12, 800e12, 1000e12)["mfu"] == pytest.approx(0.4)


def test_routing_compare_variants_are_at_equal_activated_compute_by_the_count():
    """bench/routing_compare.py's variants, built from its flags as the trainer builds them, cost the
    same feed-forward FLOPs per token to within the routers' C x E (1%), in training and at large batch."""
    import importlib.util

    from dit_moe.train.config import load_config

    path = Path(__file__).resolve().parents[1] / "bench" / "routing_compare.py"
    spec = importlib.util.spec_from_file_location("routing_compare", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    per_token = {}
    for name, flags in bench.VARIANTS.items():
        cfg = load_config(["--model", "DiT-T/2", "--dataset", "digits", "--image-size", "8", *flags])
        config = cfg.model.architecture(8, 3, 10)
        tokens = 64 * (config.input_size // config.patch_size) ** 2
        experts = flops.routed_experts_per_token(config.moe, tokens) if config.moe else None
        per_token[name] = bench.ffn_flops_per_token(config, experts)
    assert per_token["topk"] == 2 * 3 * 128 * (2 * 512) + 2 * 128 * 8  # a SwiGLU of activated width 8C + router
    for name, value in per_token.items():
        assert value == pytest.approx(per_token["topk"], rel=0.01), name
