"""Sparse upcycling: a dense DiT checkpoint -> a DiT-MoE checkpoint that starts where the dense model was.

`transform` is the pure state-dict transform, `request` reads and writes the files
(`upcycle_checkpoint(UpcycleRequest(...))`), `tool` is the command line (`python upcycle.py`,
`python -m dit_moe.upcycle`).
"""

from .request import UpcycleRequest, upcycle_checkpoint
from .transform import (
    DEFAULT_AUX_LOSS_COEF,
    ROUTER_INIT_STD,
    UPCYCLE_ROUTERS,
    ExpertInit,
    UpcycleError,
    dense_ffn_layout,
    moe_layers_every,
    upcycle_moe_args,
    upcycle_state_dict,
)

__all__ = [
    "DEFAULT_AUX_LOSS_COEF",
    "ROUTER_INIT_STD",
    "UPCYCLE_ROUTERS",
    "ExpertInit",
    "UpcycleError",
    "UpcycleRequest",
    "dense_ffn_layout",
    "moe_layers_every",
    "upcycle_checkpoint",
    "upcycle_moe_args",
    "upcycle_state_dict",
]
