"""The header of an `.npy` array read from an open stream, so a reader can check the shape and
dtype of an `.npz` member, or stream its rows, without loading the array."""

from __future__ import annotations

from typing import BinaryIO

import numpy as np


def read_npy_header(fp: BinaryIO) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the `.npy` data at `fp`, which is left at the first data byte."""
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fp)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(fp)
    raise ValueError(f"unsupported .npy version {version}")
