"""Model registry: the DiT / DiT-MoE presets by the papers' names, and `build_model`.

    model = DiT_models["DiT-S/2"](input_size=32, in_channels=4, num_classes=1000,
                                  learn_sigma=True, num_experts=8, num_experts_per_tok=2)

Sizes are those of DiT (S, B, L, XL) and DiT-MoE (G/2); `DiT-T/2` is a tiny laptop/test preset.
Every DiTConfig and MoEArgs field (MoE shape, router options, attention backend, ...) is a keyword override.
"""

from __future__ import annotations

from functools import partial

from .config import DiTConfig, MoEArgs
from .dit import DiT

# name: (depth, hidden_size, num_heads)
MODEL_SIZES = {
    "T": (6, 128, 4),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
    "G": (40, 1408, 16),
}
PATCH_SIZES = {"T": (2,), "S": (2, 4, 8), "B": (2, 4, 8), "L": (2, 4, 8), "XL": (2, 4, 8), "G": (2,)}


def preset_config(name: str, **overrides) -> DiTConfig:
    """DiTConfig of a registry name such as "DiT-XL/2", with keyword overrides: any DiTConfig field,
    and the MoE fields flat (`num_experts=8, num_experts_per_tok=2`; 0 experts is the dense DiT)."""
    if name not in DiT_models:
        raise ValueError(f"Unknown model {name!r}; choose one of {sorted(DiT_models)}.")
    size, patch = name[len("DiT-") :].split("/")
    depth, hidden, heads = MODEL_SIZES[size]
    return DiTConfig.from_flat(
        **{"depth": depth, "hidden_size": hidden, "num_heads": heads, "patch_size": int(patch), **overrides}
    )


def _build(name: str, **overrides) -> DiT:
    return DiT(preset_config(name, **overrides))


DiT_models = {
    name: partial(_build, name)
    for name in (f"DiT-{size}/{patch}" for size, patches in PATCH_SIZES.items() for patch in patches)
}


def preset_name(config: DiTConfig) -> str | None:
    """The registry name whose depth/width/heads/patch match `config`, or None."""
    for size, (depth, hidden, heads) in MODEL_SIZES.items():
        if (config.depth, config.hidden_size, config.num_heads) == (depth, hidden, heads):
            if config.patch_size in PATCH_SIZES[size]:
                return f"DiT-{size}/{config.patch_size}"
    return None


def build_model(config: DiTConfig) -> DiT:
    return DiT(config)


__all__ = ["DiT", "DiTConfig", "MoEArgs", "DiT_models", "MODEL_SIZES", "build_model", "preset_config", "preset_name"]
