"""`--compile`: torch.compile of a DiT's blocks or of the whole model, in place.

`nn.Module.compile` keeps the module tree and so every state-dict key (`torch.compile(model)`
would prefix them with `_orig_mod.`), which keeps checkpoints, EMA and DeepSpeed's parameter
handling unchanged. All blocks share one compiled graph (dynamo inlines nn.Modules, so the
parameters are graph inputs). Compilation happens at the first forward of each new input shape.

The MoE layer's dispatch and combine have no data-dependent shapes on the dropless path
(argsort, scatter_add, index_select, index_add), so they stay inside the graph; the grouped-GEMM
expert path does too. The per-expert loop path breaks the graph at its one host sync (the slice
sizes), and a capacity factor at its boolean drop.
"""

from __future__ import annotations

from torch import nn

COMPILE_MODES = ("off", "blocks", "model")


def check_mode(mode: str) -> None:
    if mode not in COMPILE_MODES:
        raise ValueError(f"--compile must be one of {', '.join(COMPILE_MODES)}, got {mode!r}.")


def compile_model(model: nn.Module, mode: str) -> nn.Module:
    """Compile `model` (a DiT) in place: "blocks" each transformer block, "model" the whole forward; "off" nothing."""
    check_mode(mode)
    if mode == "model":
        model.compile()
    elif mode == "blocks":
        for block in (*model.blocks, *getattr(model, "decoder_blocks", ())):
            block.compile()
    return model
