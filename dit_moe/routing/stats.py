"""Counts and summary statistics of recorded routing.

Notation: L recorded MoE layers, E experts, k experts per token, C classes (+1 row for the
null label), P = grid rows x cols patch positions, U distinct timesteps.

    by_class    [L, C+1, E]   tokens of each class that chose expert e (any of their k slots)
    by_position [L, P, E]     the same per patch position
    by_timestep [L, U, E]     the same per timestep tag (rows with no timestep are left out)
    tokens_*    [C+1], [P], [U]  tokens per class / position / timestep

A frequency `by_x / tokens_x` is the fraction of those tokens whose top-k holds expert e:
it lies in [0, 1] and sums to k over experts; a balanced router gives k / E everywhere.
The load share of an expert is its count over all L's M*k assignments of the layer.
In a recording with `empty_slots`, an id equal to E is an empty slot (expert-choice routing: k slots = E, each token taken by any
number of experts) and is counted for no expert; frequencies then sum to the mean experts per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np

from .store import RoutingFile, RoutingFileError


@dataclass
class RoutingCounts:
    """Routing histograms of one recording, with the metadata needed to label them."""

    num_experts: int
    top_k: int
    moe_layers: list[int]
    num_classes: int
    grid_size: Optional[tuple[int, int]]
    timesteps: np.ndarray  # [U] sorted distinct timestep tags
    by_class: np.ndarray
    by_position: np.ndarray
    by_timestep: np.ndarray
    tokens_by_class: np.ndarray
    tokens_by_position: np.ndarray
    tokens_by_timestep: np.ndarray
    weight_sum: Optional[np.ndarray]  # [L, E] summed gate weights of each expert's assignments, if recorded
    num_tokens: int
    source: str = "recording"

    @property
    def expert_totals(self) -> np.ndarray:
        """[L, E] assignments per expert (every token counted once per chosen expert)."""
        return self.by_position.sum(axis=1)

    def layer_slots(self, layers: Optional[Iterable[int]]) -> list[int]:
        """Positions in `moe_layers` of the requested layer indices (all when None)."""
        if layers is None:
            return list(range(len(self.moe_layers)))
        slots = []
        for layer in layers:
            if layer not in self.moe_layers:
                raise RoutingFileError(f"MoE layer {layer} is not in {self.source}; it holds layers {self.moe_layers}.")
            slots.append(self.moe_layers.index(layer))
        return slots


class _Tally:
    """Running histograms of routed tokens: per (layer, class | position | timestep, expert)."""

    def __init__(self, meta: dict, source: str, with_weights: bool):
        self.E, self.k, self.layers = int(meta["num_experts"]), int(meta["top_k"]), list(meta["moe_layers"])
        self.timesteps = np.asarray(meta["timesteps"], dtype=np.float32)
        self.grid = tuple(meta["grid_size"]) if meta.get("grid_size") else None
        self.num_classes, self.source = int(meta["num_classes"]), source
        self.empty_slots = bool(meta.get("empty_slots"))
        self.P = self.grid[0] * self.grid[1] if self.grid else int(meta.get("num_positions", 0))
        if self.P < 1:
            raise RoutingFileError(f"{source} records neither a patch grid nor a number of positions; re-record it.")
        L, E, self.C1, self.U = len(self.layers), self.E, self.num_classes + 1, len(self.timesteps)
        self.by_class = np.zeros(L * self.C1 * E, np.int64)
        self.by_position = np.zeros(L * self.P * E, np.int64)
        self.by_timestep = np.zeros(L * max(self.U, 1) * E, np.int64)
        self.tokens_by_class, self.tokens_by_position = np.zeros(self.C1, np.int64), np.zeros(self.P, np.int64)
        self.tokens_by_timestep = np.zeros(max(self.U, 1), np.int64)
        self.weight_sum = np.zeros(L * E, np.float64) if with_weights else None
        self.layer_offset = np.arange(L).reshape(1, L, 1)  # broadcasts over [R, L, k]
        self.num_tokens = 0

    def add(self, chunk: dict[str, np.ndarray]) -> None:
        E, C1, P, L, source = self.E, self.C1, self.P, len(self.layers), self.source
        ids = chunk["ids"].astype(np.int64)
        label, position = chunk["label"].astype(np.int64), chunk["position"].astype(np.int64)
        _check_range(ids, E + self.empty_slots, "expert ids", source)
        _check_range(label, C1, "labels", source)
        _check_range(position, P, "patch positions", source)
        routed = ids < E  # [R, L, k]; False: an empty slot
        self.num_tokens += len(label)
        self.by_class += _bincount(((self.layer_offset * C1 + label[:, None, None]) * E + ids), L * C1 * E, routed)
        self.by_position += _bincount(((self.layer_offset * P + position[:, None, None]) * E + ids), L * P * E, routed)
        self.tokens_by_class += np.bincount(label, minlength=C1)
        self.tokens_by_position += np.bincount(position, minlength=P)
        self._add_timesteps(chunk, ids, routed)
        if self.weight_sum is not None:
            weights = chunk["weights"].astype(np.float64)
            flat = (self.layer_offset * E + ids)[routed]
            self.weight_sum += np.bincount(flat, weights=weights[routed], minlength=L * E)

    def _add_timesteps(self, chunk: dict[str, np.ndarray], ids: np.ndarray, routed: np.ndarray) -> None:
        known = np.isfinite(chunk["timestep"])
        U, E, L = self.U, self.E, len(self.layers)
        if not U or not known.any():
            return
        index = np.searchsorted(self.timesteps, chunk["timestep"][known])
        if (index >= U).any() or not np.array_equal(self.timesteps[np.minimum(index, U - 1)], chunk["timestep"][known]):
            raise RoutingFileError(f"{self.source} has timestep tags that its metadata does not list; re-record it.")
        flat = (self.layer_offset * U + index[:, None, None]) * E + ids[known]
        self.by_timestep += _bincount(flat, L * U * E, routed[known])
        self.tokens_by_timestep += np.bincount(index, minlength=U)

    def counts(self) -> RoutingCounts:
        L, E, U = len(self.layers), self.E, self.U
        return RoutingCounts(
            num_experts=E,
            top_k=self.k,
            moe_layers=self.layers,
            num_classes=self.num_classes,
            grid_size=self.grid,
            timesteps=self.timesteps,
            by_class=self.by_class.reshape(L, self.C1, E),
            by_position=self.by_position.reshape(L, self.P, E),
            by_timestep=self.by_timestep.reshape(L, max(U, 1), E)[:, :U],
            tokens_by_class=self.tokens_by_class,
            tokens_by_position=self.tokens_by_position,
            tokens_by_timestep=self.tokens_by_timestep[:U],
            weight_sum=None if self.weight_sum is None else self.weight_sum.reshape(L, E),
            num_tokens=self.num_tokens,
            source=self.source,
        )


def count_routing(chunks: Iterable[dict[str, np.ndarray]], meta: dict, source: str = "the recording") -> RoutingCounts:
    """Accumulate RoutingCounts over row chunks (from RoutingRecorder.chunks or RoutingFile.chunks)."""
    chunks = iter(chunks)
    first = next(chunks, None)
    tally = _Tally(meta, source, with_weights=first is not None and "weights" in first)
    if first is None:
        raise RoutingFileError(f"{source} holds no token rows; record at least one forward.")
    for chunk in _prepend(first, chunks):
        tally.add(chunk)
    return tally.counts()


def load_counts(path: str) -> RoutingCounts:
    """RoutingCounts of a routing file, read in row slices."""
    with RoutingFile(path) as routing:
        return count_routing(routing.chunks(), routing.meta, source=str(routing.path))


def _prepend(first, rest):
    yield first
    yield from rest


def _bincount(index: np.ndarray, size: int, routed: np.ndarray) -> np.ndarray:
    return np.bincount(index[routed], minlength=size)


def _check_range(values: np.ndarray, upper: int, what: str, source: str) -> None:
    if values.size and (values.min() < 0 or values.max() >= upper):
        raise RoutingFileError(
            f"{source} has {what} outside 0..{upper - 1} (found {values.min()}..{values.max()}), "
            "so its metadata does not match its rows; re-record it."
        )


def frequencies(counts: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """counts [L, R, E] / tokens [R]: the fraction of each row's tokens choosing each expert (NaN for empty rows)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return counts / np.where(tokens > 0, tokens, np.nan)[None, :, None]


def summarize(counts: RoutingCounts) -> dict:
    """Per layer: load share per expert, coefficient of variation of the loads, entropy of the
    shares normalised by log E (1 = perfectly balanced), unused experts, mean gate weight per expert."""
    layers = []
    E = counts.num_experts
    for slot, layer in enumerate(counts.moe_layers):
        load = counts.expert_totals[slot].astype(np.float64)
        share = load / max(load.sum(), 1.0)
        nonzero = share[share > 0]
        entropy = float(-(nonzero * np.log(nonzero)).sum() / math.log(E)) if E > 1 else 1.0
        entry = dict(
            layer=layer,
            load_share=[round(float(s), 6) for s in share],
            cv=float(load.std() / load.mean()) if load.mean() > 0 else 0.0,
            entropy=entropy,
            unused_experts=[int(e) for e in np.flatnonzero(load == 0)],
        )
        if counts.weight_sum is not None:
            with np.errstate(invalid="ignore", divide="ignore"):
                mean_weight = counts.weight_sum[slot] / load
            entry["mean_weight"] = [None if not np.isfinite(w) else round(float(w), 6) for w in mean_weight]
        layers.append(entry)
    return dict(num_experts=E, top_k=counts.top_k, num_tokens=int(counts.num_tokens), layers=layers)


def format_summary(summary: dict) -> str:
    """The summary as a plain-text table, one line per layer."""
    E = summary["num_experts"]
    lines = [
        f"{summary['num_tokens']} tokens, {E} experts, top-{summary['top_k']}; "
        "load share per expert (%), CV of loads, entropy / log E, unused experts",
        f"{'layer':>5}  " + " ".join(f"{f'e{e}':>5}" for e in range(E)) + f"  {'cv':>6}  {'entropy':>7}  unused",
    ]
    for entry in summary["layers"]:
        shares = " ".join(f"{100 * s:5.1f}" for s in entry["load_share"])
        unused = ",".join(map(str, entry["unused_experts"])) or "-"
        lines.append(f"{entry['layer']:>5}  {shares}  {entry['cv']:6.3f}  {entry['entropy']:7.3f}  {unused}")
    return "\n".join(lines)
