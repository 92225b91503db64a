"""Sparse upcycling: a dense DiT checkpoint -> a DiT-MoE checkpoint that starts where the dense model was.

`transform` is the pure state-dict transform, `tool` reads and writes the files and holds the
command line (`python upcycle.py`, `python -m dit_moe.upcycle`).
"""

from .transform import (
    DEFAULT_AUX_LOSS_COEF,
    ROUTER_INIT_STD,
    UPCYCLE_ROUTERS,
    UpcycleError,
    dense_ffn_layout,
    moe_layers_every,
    upcycle_checkpoint,
    upcycle_state_dict,
)

__all__ = [
    "DEFAULT_AUX_LOSS_COEF",
    "ROUTER_INIT_STD",
    "UPCYCLE_ROUTERS",
    "UpcycleError",
    "dense_ffn_layout",
    "moe_layers_every",
    "upcycle_checkpoint",
    "upcycle_state_dict",
]
