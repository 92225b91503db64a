"""The SwiGLU experts' loop of matrix products with a hand-written backward.

Autograd through `split` -> per-expert `mm` -> `cat` costs, per projection and layer, a stack of
the E per-expert weight gradients into a fresh [E, ...] tensor and a concatenation of the outputs;
on a CPU those copies (and the first-touch page faults of their fresh buffers) took about a tenth
of a DiT-MoE-S/2 training step (bench/step_profile.py). Here every product writes straight into
its slice of one output, input-gradient or weight-gradient buffer, and the weight gradients come
out already contiguous in the parameters' [E, out, in] layout, so the optimizer reads them as they
are. Forward values are those of the plain loop; gradients agree with autograd's to rounding.

On a CPU the weight-gradient buffers are also kept from one step to the next (`GradientBuffers`): in a
plain torch loop under glibc's default malloc they were the step's largest blocks ([E, out, in], 18.9 MB
each for DiT-MoE-S/2 8E2A), taken from the top of the heap because no hole left by freed activations
was large enough, freed together at `zero_grad`, trimmed back to the system and page-faulted in again
at the next backward: ~180,000 faults per S/2 training step (strace: the heap grew by 32 such blocks
and shrank by as much every step), where the reference's per-expert blocks fit into those holes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# torch's count of the references to a storage (tensors and views on it, and Python storage objects);
# private, so without it the buffers are simply not reused.
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


class GradientBuffers:
    """The buffers of one expert layer's loop (weight gradients, saved pre-activations, outputs), reused
    across steps on the CPU.

    `empty(name, shape, like)` returns an uninitialised tensor of `shape` with `like`'s dtype and device.
    On a CPU it is the storage this layer used last time for `name` when nothing uses that storage any
    more (a gradient after the optimizer step and `zero_grad` dropped it, or the engine copied it away;
    an activation after the backward released it); while it is alive (gradient accumulation into
    `.grad`, a caller keeping a reference or a view, two forwards before one backward) a new buffer is
    allocated, so nothing live is ever overwritten. What it costs: the layer's weight gradients and one
    forward's expert activations stay allocated between steps, CPU only (on a GPU torch's caching
    allocator already reuses blocks, and nothing is kept). Not pickled or deep-copied: a copy starts empty.
    """

    def __init__(self) -> None:
        self._storages: dict[str, torch.UntypedStorage] = {}

    def empty(self, name: str, shape: torch.Size | tuple[int, ...], like: Tensor) -> Tensor:
        if like.device.type != "cpu" or _storage_use_count is None:
            return like.new_empty(shape)
        storage = self._storages.get(name)
        nbytes = math.prod(shape) * like.element_size()
        if storage is not None and storage.nbytes() == nbytes and _storage_use_count(storage._cdata) == 1:
            return like.new_empty(0).set_(storage, 0, shape)
        buffer = like.new_empty(shape)
        self._storages[name] = buffer.untyped_storage()
        return buffer

    def __getstate__(self) -> dict:
        return {"_storages": {}}

    def __deepcopy__(self, memo) -> "GradientBuffers":
        return GradientBuffers()


class SwiGLUExpertLoop(torch.autograd.Function):
    """y_e = down_e(silu(gate_e(x_e)) * up_e(x_e)) for consecutive row blocks x_e of sizes `sizes`.

    x [S, C]; gate, up [E, I, C]; down [E, C, I] -> y [S, C]. Saves x and the two [S, I]
    pre-activations; the product silu(g) * u is recomputed in backward rather than kept.
    """

    @staticmethod
    def forward(
        ctx, x: Tensor, sizes: list[int], gate: Tensor, up: Tensor, down: Tensor, buffers: GradientBuffers | None = None
    ) -> Tensor:
        S, I = x.shape[0], gate.shape[1]
        step_buffers = buffers or GradientBuffers()
        gate_pre, up_pre = step_buffers.empty("gate_pre", (S, I), x), step_buffers.empty("up_pre", (S, I), x)
        y = step_buffers.empty("y", (S, down.shape[1]), x)
        start = 0
        for e, n in enumerate(sizes):
            if n:
                rows = slice(start, start + n)
                torch.mm(x[rows], gate[e].t(), out=gate_pre[rows])
                torch.mm(x[rows], up[e].t(), out=up_pre[rows])
                torch.mm(F.silu(gate_pre[rows]) * up_pre[rows], down[e].t(), out=y[rows])
            start += n
        ctx.sizes, ctx.buffers = sizes, buffers
        ctx.save_for_backward(x, gate_pre, up_pre, gate, up, down)
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, gate_pre, up_pre, gate, up, down = ctx.saved_tensors
        need_x, _, need_gate, need_up, need_down = ctx.needs_input_grad[:5]
        grad_y = grad_y.contiguous()
        buffers = ctx.buffers or GradientBuffers()
        grad_x = buffers.empty("grad_x", x.shape, x) if need_x else None
        grad_gate, grad_up, grad_down = (
            buffers.empty(name, w.shape, w) if need else None
            for name, w, need in (("gate", gate, need_gate), ("up", up, need_up), ("down", down, need_down))
        )
        start = 0
        for e, n in enumerate(ctx.sizes):
            if n == 0:
                for grad in (grad_gate, grad_up, grad_down):
                    if grad is not None:
                        grad[e].zero_()
                continue
            rows = slice(start, start + n)
            g, u, dy, xe = gate_pre[rows], up_pre[rows], grad_y[rows], x[rows]
            silu_g = F.silu(g)
            if grad_down is not None:
                torch.mm(dy.t(), silu_g * u, out=grad_down[e])  # [C, n] x [n, I]
            d_act = torch.mm(dy, down[e])  # [n, I]
            d_up = d_act * silu_g
            d_gate = torch.ops.aten.silu_backward(d_act.mul_(u), g)  # one fused pass: grad * silu'(g)
            if grad_gate is not None:
                torch.mm(d_gate.t(), xe, out=grad_gate[e])
            if grad_up is not None:
                torch.mm(d_up.t(), xe, out=grad_up[e])
            if grad_x is not None:  # not needed when the layer's input is a leaf (a benchmark's, say)
                torch.mm(d_gate, gate[e], out=grad_x[rows])
                grad_x[rows].addmm_(d_up, up[e])
            start += n
        return (grad_x, None, grad_gate, grad_up, grad_down, None)[: len(ctx.needs_input_grad)]
