"""FLOP accounting (dit_moe.models.flops) against torch's own FLOP counter and DiT's published count."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dit_moe.models import DiT, flops, preset_config
from dit_moe.models.masking import random_mask

from tiny_dit import tiny_config


def counted_forward_flops(config, batch: int = 3, mask_ratio: float = 0.0) -> int:
    """Matmul FLOPs torch's FlopCounterMode sees in one forward of `batch` images."""
    model = DiT(config).eval()
    x = torch.randn(batch, config.in_channels, config.input_size, config.input_size)
    t, y = torch.rand(batch) * 999, torch.randint(0, config.num_classes, (batch,))
    mask = random_mask(batch, model.num_tokens, mask_ratio).mask if mask_ratio else None
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t, y, mask=mask)
    return counter.get_total_flops()


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
