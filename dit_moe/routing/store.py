"""The routing file: one uncompressed `.npz` of per-token rows plus a JSON metadata record.

Members (R token rows, L recorded MoE layers, k experts per token; see recorder.py):

    ids [R, L, k]   weights [R, L, k] (optional)   label [R]   position [R]   timestep [R]   step [R]
    meta            0-d unicode array holding JSON: format, num_experts, top_k, moe_layers,
                    num_classes, grid_size ([rows, cols] or null), num_positions, timesteps
                    (sorted distinct tags), and whatever the collector adds
                    (checkpoint, sampler settings, class list)

It is written member by member from the recorder's chunks and read back in row slices,
so neither side holds more than one chunk; the write goes through `dit_moe.utils.atomic`,
so a crash never leaves a half-written file under the final name. Everything that does
not look like such a file stops with one `RoutingFileError` sentence.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from ..utils.atomic import atomic_path
from ..utils.npy_header import read_npy_header

FORMAT = "dit-moe-routing/1"
ROW_ARRAYS = ("ids", "label", "position", "timestep", "step")
OPTIONAL_ARRAYS = ("weights",)
META_KEYS = ("format", "num_experts", "top_k", "moe_layers", "num_classes", "grid_size", "num_positions", "timesteps")
_REMAKE = "re-create it with analysis/expert_data.py"


class RoutingFileError(ValueError):
    """A routing file is missing, truncated, or does not hold what its metadata describes."""


def write_routing(
    path: str | os.PathLike, chunks: Callable[[], Iterable[dict[str, np.ndarray]]], num_rows: int, metadata: dict
) -> Path:
    """Write the rows `chunks()` yields (called once per member) and `metadata` to `path`, atomically."""
    path = Path(path)
    first = next(iter(chunks()))
    meta = {"format": FORMAT, **metadata}
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key in [k for k in ROW_ARRAYS + OPTIONAL_ARRAYS if k in first]:
            _write_member(zf, key, chunks, num_rows, first[key])
        with zf.open("meta.npy", "w") as fp:
            np.lib.format.write_array(fp, np.array(json.dumps(meta)), allow_pickle=False)
    return path


def _write_member(zf: zipfile.ZipFile, key: str, chunks, num_rows: int, example: np.ndarray) -> None:
    """Stream one [num_rows, ...] array into `key.npy`: header first, then each chunk's bytes."""
    header = {
        "descr": np.lib.format.dtype_to_descr(example.dtype),
        "fortran_order": False,
        "shape": (num_rows, *example.shape[1:]),
    }
    written = 0
    with zf.open(f"{key}.npy", "w", force_zip64=True) as fp:
        np.lib.format.write_array_header_1_0(fp, header)
        for chunk in chunks():
            fp.write(np.ascontiguousarray(chunk[key], dtype=example.dtype).tobytes())
            written += len(chunk[key])
    if written != num_rows:
        raise RuntimeError(f"The recorder promised {num_rows} rows of {key} but its chunks held {written}.")


class RoutingFile:
    """A routing file opened for reading: `meta` (dict), `num_rows`, `shapes`, and `chunks()` of rows.

    Opening checks the zip, the metadata and every array's shape against the metadata, so a
    corrupt or mismatched file fails here, in one sentence, before any plotting starts.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise RoutingFileError(f"No routing file at {self.path}; create one with analysis/expert_data.py.")
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as err:
            raise RoutingFileError(
                f"{self.path} is truncated or not an .npz routing file ({err}); {_REMAKE}."
            ) from None
        names = {n[: -len(".npy")] for n in self._zip.namelist() if n.endswith(".npy")}
        missing = [k for k in ("meta",) + ROW_ARRAYS if k not in names]
        if missing:
            raise RoutingFileError(
                f"{self.path} lacks {', '.join(missing)}, so it is not a complete routing file; {_REMAKE}."
            )
        self.meta = self._read_meta()
        self.arrays = [k for k in ROW_ARRAYS + OPTIONAL_ARRAYS if k in names]
        self._headers = {k: self._header(k) for k in self.arrays}
        self.shapes = {k: shape for k, (shape, _) in self._headers.items()}
        self.num_rows = self.shapes["ids"][0] if len(self.shapes["ids"]) == 3 else 0
        self._check_shapes()

    @property
    def has_weights(self) -> bool:
        return "weights" in self.arrays

    def _read_meta(self) -> dict:
        try:
            with self._zip.open("meta.npy") as fp:
                meta = json.loads(str(np.lib.format.read_array(fp, allow_pickle=False)))
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as err:
            raise RoutingFileError(f"{self.path} has unreadable metadata ({err}); {_REMAKE}.") from None
        if not isinstance(meta, dict):
            raise RoutingFileError(f"{self.path} has metadata that is not a JSON object; {_REMAKE}.")
        missing = [k for k in META_KEYS if k not in meta]
        if missing:
            raise RoutingFileError(f"{self.path} metadata lacks {', '.join(missing)}; {_REMAKE}.")
        if meta["format"] != FORMAT:
            raise RoutingFileError(f"{self.path} is in format {meta['format']!r}, not {FORMAT!r}; {_REMAKE}.")
        return meta

    def _header(self, key: str) -> tuple[tuple[int, ...], np.dtype]:
        try:
            with self._zip.open(f"{key}.npy") as fp:
                shape, _, dtype = read_npy_header(fp)
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as err:
            raise RoutingFileError(f"{self.path} has an unreadable {key} array ({err}); {_REMAKE}.") from None
        return shape, dtype

    def _check_shapes(self) -> None:
        ids_shape = self.shapes["ids"]
        layers, top_k = len(self.meta["moe_layers"]), self.meta["top_k"]
        if len(ids_shape) != 3 or ids_shape[2] != top_k:
            raise RoutingFileError(
                f"{self.path} has ids of shape {ids_shape} where [rows, layers, top_k={top_k}] was expected; {_REMAKE}."
            )
        if ids_shape[1] != layers:
            raise RoutingFileError(
                f"{self.path} holds {ids_shape[1]} MoE layers but its metadata lists {layers} "
                f"({self.meta['moe_layers']}); {_REMAKE}."
            )
        for key in self.arrays:
            expected = ids_shape if key in ("ids", "weights") else (self.num_rows,)
            if self.shapes[key] != expected:
                raise RoutingFileError(
                    f"{self.path} has {key} of shape {self.shapes[key]}, expected {expected}; {_REMAKE}."
                )
        if self.num_rows == 0:
            raise RoutingFileError(f"{self.path} holds no token rows; {_REMAKE} with at least one sample.")

    def chunks(self, rows: int = 1 << 16, keys: Optional[Iterable[str]] = None) -> Iterator[dict[str, np.ndarray]]:
        """The rows in slices of at most `rows`, as dicts of arrays (`keys`: which arrays; default all)."""
        keys = [k for k in (keys or self.arrays) if k in self.arrays]
        handles = {k: self._zip.open(f"{k}.npy") for k in keys}
        try:
            for fp in handles.values():
                read_npy_header(fp)
            done = 0
            while done < self.num_rows:
                n = min(rows, self.num_rows - done)
                yield {k: self._read_rows(fp, k, n) for k, fp in handles.items()}
                done += n
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise RoutingFileError(f"{self.path} is corrupt ({err}); {_REMAKE}.") from None
        finally:
            for fp in handles.values():
                fp.close()

    def _read_rows(self, fp, key: str, n: int) -> np.ndarray:
        shape, dtype = self._headers[key]
        row_shape = shape[1:]
        size = n * int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
        data = fp.read(size)
        if len(data) != size:
            raise RoutingFileError(f"{self.path} ends inside its {key} array (truncated); {_REMAKE}.")
        return np.frombuffer(data, dtype=dtype).reshape(n, *row_shape)

    def close(self) -> None:
        self._zip.close()

    def __enter__(self) -> "RoutingFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
