"""The suite's tiny model, built from the registry so every test shares one definition."""

from dit_moe.models import DiT, DiTConfig, preset_config

from reference_dit import randomize_


def tiny_config(**overrides) -> DiTConfig:
    """DiT-T/2 (6 blocks, width 128, 4 heads) on 8x8 inputs (16 tokens), 4 channels, 10 classes.

    Any DiTConfig field is an override, the flat MoE shape included (num_experts=4, num_experts_per_tok=2).
    """
    return preset_config("DiT-T/2", **{"input_size": 8, "num_classes": 10, **overrides})


def tiny_model(**overrides) -> DiT:
    """`tiny_config(**overrides)` in eval mode with random weights (the zero-initialised layers included),
    so its outputs depend on every block; draws from the global RNG, so two calls differ."""
    return randomize_(DiT(tiny_config(**overrides))).eval()
