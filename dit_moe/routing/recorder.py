"""Record which experts every token is routed to, through forward hooks on the MoE routers.

    with RoutingRecorder(model) as rec:
        rec.set_context(timestep=t, step=i)      # e.g. from a sampler's per-step callback
        model(x, t, y)
    rec.save("routing.npz", ckpt="...")

Each router (`moe.gate`, see dit_moe/models/router.py) returns `(weights [M, k], expert_ids [M, k],
scores [M, E])` for M = N * T tokens, k being the router's slots (top-k; E for expert choice,
whose empty slots hold the id E and count for no expert). One model forward fires the hooks of every recorded
MoE layer on the same tokens, so a forward becomes one block of R token rows:

    ids       [R, L, k]  uint8 (int16 past 255 experts)  the chosen experts of each layer
    weights   [R, L, k]  float16                          their gate weights (optional)
    label     [R]        int16                            class label (num_classes = null label)
    position  [R]        int16                            patch index, row-major on the grid
    timestep  [R]        float32                          diffusion time tag (NaN: unknown)
    step      [R]        int16                            sampler step (-1: unknown)

Tags: a DiT's own forward inputs give each sample's label (and timestep, when the caller
set none), so classifier-free guidance's doubled batch [cond; uncond] is tagged right and
its uncond half (label == null label) is dropped unless `record_uncond`. For a bare MoE
layer, or to override, the caller sets tags with `set_context` before the forward. N and
T come from the router's [N, T, C] input (or from M and the number of labels); the patch
position is 0..T-1 unless `positions` says which patches a masked forward kept.

Memory stays bounded: row blocks are buffered until `max_memory_mb`, then written to an
`.npz` chunk in a spill folder (a temporary one, removed by `close()` or at exit,
unless `spill_dir` is given). The recorder holds no global state and the model's outputs
do not change: the hooks only read the router's outputs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..models.dit import DiT
from ..models.moe import MoEFeedForward

_UNSET = object()


def find_moe_layers(model: nn.Module) -> list[tuple[int, MoEFeedForward]]:
    """(layer index, MoE module) of every MoE layer: the block index in a DiT, else the order of appearance."""
    if isinstance(model, DiT):
        return [(i, model.blocks[i].moe) for i in model.moe_blocks]
    return list(enumerate(m for m in model.modules() if isinstance(m, MoEFeedForward)))


def ids_dtype(num_experts: int) -> np.dtype:
    """The smallest integer type that holds every id below `num_experts`."""
    return np.dtype(np.uint8 if num_experts <= 256 else np.int16)


class RoutingRecorder:
    """Context manager that hooks every MoE router of `model` and keeps the routing of every token.

    model:          a DiT (tags labels and grid from it) or any module holding MoEFeedForward layers.
    layers:         the layer indices to record (default: all MoE layers).
    record_uncond:  keep tokens whose label is the null label (CFG's unconditional half).
    record_weights: keep the gate weights as well as the expert ids.
    num_classes:    number of real classes (default: the DiT's); the null label is num_classes.
    grid_size:      (rows, cols) of the patch grid (default: the DiT's), stored for the patch plots.
    max_memory_mb:  buffered rows past this size are written to a chunk file.
    spill_dir:      where chunk files go (default: a temporary folder removed by `close()`).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Optional[Sequence[int]] = None,
        record_uncond: bool = False,
        record_weights: bool = True,
        num_classes: Optional[int] = None,
        grid_size: Optional[tuple[int, int]] = None,
        max_memory_mb: float = 256.0,
        spill_dir: Optional[str | Path] = None,
    ) -> None:
        found = find_moe_layers(model)
        if not found:
            raise ValueError("The model has no MoE layers; routing analysis needs a DiT-MoE (num_experts > 0).")
        if layers is not None:
            unknown = sorted(set(layers) - {i for i, _ in found})
            if unknown:
                raise ValueError(
                    f"Layers {unknown} are not MoE layers of this model; choose from {[i for i, _ in found]}."
                )
            found = [(i, m) for i, m in found if i in set(layers)]
        shapes = {(m.gate.num_experts, m.gate.slots, m.gate.empty_slots) for _, m in found}
        if len(shapes) != 1:
            raise ValueError(
                f"The recorded MoE layers differ in (experts, slots, empty slots): {sorted(shapes)}; "
                "record them separately."
            )
        self.model = model
        self.layers = found
        self.num_experts, self.top_k, self.empty_slots = shapes.pop()
        self.record_uncond = record_uncond
        self.record_weights = record_weights
        if isinstance(model, DiT):
            num_classes = model.config.num_classes if num_classes is None else num_classes
            grid_size = grid_size or (model.x_embedder.grid_size, model.x_embedder.grid_size)
        self.num_classes = num_classes
        self.grid_size = tuple(grid_size) if grid_size is not None else None
        self.max_bytes = int(max_memory_mb * 2**20)
        self._spill_root = Path(spill_dir) if spill_dir is not None else None
        self._tempdir: Optional[tempfile.TemporaryDirectory] = None
        self._handles: list = []
        self._context: dict = dict(labels=None, timestep=None, step=None, positions=None)
        self._call: dict = {}
        self._pending: dict[int, tuple[np.ndarray, Optional[np.ndarray]]] = {}
        self._tags: Optional[dict] = None
        self._buffer: list[dict[str, np.ndarray]] = []
        self._buffer_bytes = 0
        self._chunk_files: list[Path] = []
        self._timesteps: set[float] = set()
        self._max_label = self._max_position = -1
        self.num_rows = 0

    # -- hooks ---------------------------------------------------------------------------------

    def __enter__(self) -> "RoutingRecorder":
        if self._handles:
            raise RuntimeError("This RoutingRecorder is already recording; use one `with` block at a time.")
        if isinstance(self.model, DiT):
            self._handles.append(self.model.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
            self._handles.append(self.model.register_forward_hook(self._on_model_return))
        for slot, (_, moe) in enumerate(self.layers):
            self._handles.append(moe.gate.register_forward_hook(self._route_hook(slot)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._call = {}
        if exc[0] is None:
            self._finish_forward()
        else:
            self._pending.clear()

    def set_context(self, labels=_UNSET, timestep=_UNSET, step=_UNSET, positions=_UNSET) -> None:
        """Tags for the following forwards; an argument left out keeps its value, None clears it.

        labels:    (N,) class labels (a DiT's forward supplies them itself).
        timestep:  a scalar or (N,) diffusion time of the forward.
        step:      the sampler step index.
        positions: (T',) or (N, T') patch indices of the tokens a masked forward keeps.
        """
        for name, value in (("labels", labels), ("timestep", timestep), ("step", step), ("positions", positions)):
            if value is not _UNSET:
                self._context[name] = value

    def _on_model_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        t = args[1] if len(args) > 1 else kwargs.get("t")
        y = args[2] if len(args) > 2 else kwargs.get("y")
        self._finish_forward()
        self._call = dict(labels=y, timestep=t)

    def _on_model_return(self, module: nn.Module, args: tuple, output) -> None:
        self._finish_forward()
        self._call = {}

    def _route_hook(self, slot: int):
        def hook(module: nn.Module, inputs: tuple, output: tuple[Tensor, Tensor, Tensor]) -> None:
            self._on_route(slot, inputs[0], output[0], output[1])

        return hook

    def _on_route(self, slot: int, x: Tensor, weights: Tensor, expert_ids: Tensor) -> None:
        if slot in self._pending:
            self._finish_forward()
        num_tokens = expert_ids.shape[0]
        if not self._pending:
            self._tags = self._forward_tags(x, num_tokens)
        elif self._tags["num_tokens"] != num_tokens:
            raise RuntimeError(
                f"MoE layer {self.layers[slot][0]} routed {num_tokens} tokens but the layers before it in this "
                f"forward routed {self._tags['num_tokens']}; record one forward at a time."
            )
        keep = self._tags["keep"]
        ids = (
            expert_ids.detach().cpu()[keep].numpy().astype(ids_dtype(self.num_experts + 1))
        )  # host sync: analysis only
        kept_weights = weights.detach().cpu()[keep].numpy().astype(np.float16) if self.record_weights else None
        self._pending[slot] = (ids, kept_weights)
        if len(self._pending) == len(self.layers):
            self._finish_forward()

    # -- tags ----------------------------------------------------------------------------------

    def _forward_tags(self, x: Tensor, num_tokens: int) -> dict:
        """Per-token tags of the forward that is starting, and which of its M tokens to keep."""
        labels = self._call.get("labels")
        if labels is None:
            labels = self._context["labels"]
        if labels is None:
            raise RuntimeError("No class labels for this forward: call rec.set_context(labels=...) before it.")
        labels = torch.as_tensor(labels).reshape(-1).cpu().numpy().astype(np.int64)
        if x.dim() == 3:
            n, t = x.shape[0], x.shape[1]
        else:
            n = len(labels)
            t = num_tokens // max(n, 1)
        if n != len(labels) or n * t != num_tokens:
            raise RuntimeError(
                f"The router saw {num_tokens} tokens that do not split into {len(labels)} samples as labelled; "
                "set one label per sample with rec.set_context(labels=...)."
            )
        positions = self._positions(n, t)
        timestep = self._context["timestep"]
        if timestep is None:
            timestep = self._call.get("timestep")
        timestep = np.full(n, np.nan, np.float32) if timestep is None else self._per_sample(timestep, n, "timestep")
        step = -1 if self._context["step"] is None else int(self._context["step"])
        keep_sample = np.ones(n, dtype=bool)
        if not self.record_uncond and self.num_classes is not None:
            keep_sample = labels != self.num_classes
        keep = np.repeat(keep_sample, t)  # [N] -> [M]
        rows = int(keep.sum())
        self._timesteps.update(float(v) for v in np.unique(timestep[keep_sample]) if np.isfinite(v))
        self._max_label = max(self._max_label, int(labels.max(initial=-1)))
        self._max_position = max(self._max_position, int(positions.max(initial=-1)))
        return dict(
            num_tokens=num_tokens,
            keep=torch.from_numpy(keep),
            label=np.repeat(labels, t)[keep].astype(np.int16),
            position=positions.reshape(-1)[keep].astype(np.int16),
            timestep=np.repeat(timestep, t)[keep].astype(np.float32),
            step=np.full(rows, step, dtype=np.int16),
        )

    def _positions(self, n: int, t: int) -> np.ndarray:
        """(N, T) patch index of every token: the caller's `positions`, else 0..T-1 per sample."""
        given = self._context["positions"]
        if given is None:
            return np.broadcast_to(np.arange(t), (n, t))
        positions = torch.as_tensor(given).cpu().numpy().astype(np.int64)
        if positions.shape == (t,):
            return np.broadcast_to(positions, (n, t))
        if positions.shape != (n, t):
            raise RuntimeError(
                f"positions of shape {positions.shape} do not fit a forward of {n} samples x {t} tokens."
            )
        return positions

    @staticmethod
    def _per_sample(value, n: int, name: str) -> np.ndarray:
        array = torch.as_tensor(value).detach().reshape(-1).cpu().numpy().astype(np.float32)
        if array.size == 1:
            return np.full(n, array[0], dtype=np.float32)
        if array.size != n:
            raise RuntimeError(
                f"{name} has {array.size} values for a forward of {n} samples; pass a scalar or one per sample."
            )
        return array

    # -- buffering -----------------------------------------------------------------------------

    def _finish_forward(self) -> None:
        """Turn the layers routed so far in this forward into one row block."""
        if not self._pending:
            return
        missing = [self.layers[s][0] for s in range(len(self.layers)) if s not in self._pending]
        if missing:
            self._pending.clear()
            raise RuntimeError(
                f"A forward skipped MoE layers {missing}; pass layers=[...] to record only the layers it runs."
            )
        block = {key: self._tags[key] for key in ("label", "position", "timestep", "step")}
        block["ids"] = np.stack(
            [self._pending[s][0] for s in range(len(self.layers))], axis=1
        )  # L x [R, k] -> [R, L, k]
        if self.record_weights:
            block["weights"] = np.stack([self._pending[s][1] for s in range(len(self.layers))], axis=1)
        self._pending.clear()
        self._buffer.append(block)
        self._buffer_bytes += sum(a.nbytes for a in block.values())
        self.num_rows += len(block["label"])
        if self._buffer_bytes > self.max_bytes:
            self._spill()

    def _spill(self) -> None:
        """Write the buffered rows to the next chunk file and empty the buffer."""
        if self._spill_root is None:
            self._tempdir = tempfile.TemporaryDirectory(prefix="routing-")
            self._spill_root = Path(self._tempdir.name)
        self._spill_root.mkdir(parents=True, exist_ok=True)
        path = self._spill_root / f"chunk_{len(self._chunk_files):05d}.npz"
        np.savez(path, **self._concat_buffer())
        self._chunk_files.append(path)
        self._buffer, self._buffer_bytes = [], 0

    def _concat_buffer(self) -> dict[str, np.ndarray]:
        return {key: np.concatenate([b[key] for b in self._buffer]) for key in self._buffer[0]}

    # -- results -------------------------------------------------------------------------------

    @property
    def chunk_files(self) -> list[Path]:
        """The chunk files written so far (in order)."""
        return list(self._chunk_files)

    @property
    def timesteps(self) -> list[float]:
        """Sorted distinct timestep tags recorded."""
        return sorted(self._timesteps)

    def chunks(self) -> Iterator[dict[str, np.ndarray]]:
        """The recorded rows, chunk by chunk (spilled chunks first, then the buffer), as dicts of arrays (keys as in the module docstring)."""
        for path in self._chunk_files:
            with np.load(path) as data:
                yield {key: data[key] for key in data.files}
        if self._buffer:
            yield self._concat_buffer()

    def arrays(self) -> dict[str, np.ndarray]:
        """All recorded rows in memory at once (for small runs and tests)."""
        parts = list(self.chunks())
        if not parts:
            raise RuntimeError("Nothing was recorded: run at least one forward inside the `with` block.")
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}

    def metadata(self) -> dict:
        """What a routing file needs to be read back: experts, top-k, layers, classes, grid, timesteps.

        Without a known class count or grid, the largest label + 1 and position + 1 seen stand in.
        """
        num_positions = self.grid_size[0] * self.grid_size[1] if self.grid_size else self._max_position + 1
        return dict(
            num_experts=self.num_experts,
            top_k=self.top_k,
            empty_slots=self.empty_slots,
            moe_layers=[i for i, _ in self.layers],
            num_classes=self.num_classes if self.num_classes is not None else self._max_label + 1,
            grid_size=list(self.grid_size) if self.grid_size else None,
            num_positions=num_positions,
            timesteps=self.timesteps,
            record_uncond=self.record_uncond,
        )

    def save(self, path: str | Path, **metadata) -> Path:
        """Write everything recorded, with `metadata` (JSON-serialisable) added, to one routing `.npz`, atomically."""
        from .store import write_routing

        if self.num_rows == 0:
            raise RuntimeError("Nothing was recorded: run at least one forward inside the `with` block.")
        return write_routing(path, self.chunks, self.num_rows, {**self.metadata(), **metadata})

    def close(self) -> None:
        """Drop the recorded rows and delete a temporary spill folder."""
        self._buffer, self._buffer_bytes = [], 0
        self._chunk_files = []
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir, self._spill_root = None, None
