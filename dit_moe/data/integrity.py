"""Integrity of extracted features (latent shards, fast-DiT `.npy` files): the one error a bad file
raises, the header-and-size check of one `.npy` file, and the way that error crosses a DataLoader worker.

Policy: stop. The trainer checks every file once at start-up, before the process group starts
(`DataConfig.check`: headers and sizes only, no array is loaded), and the readers raise the same
error if a file turns out bad while training (changed since, or damaged where no header shows it).
Either way the run ends with one sentence naming the file, what is wrong and what to do.
Skipping instead was rejected: it would train on a different data set than the one named (an epoch
shorter than the data, classes thinned unevenly), and the loaders' exact resume is arithmetic on the
recorded sample counts, which skipped samples would silently break.
"""

from __future__ import annotations

import functools
import io
import math
import os
import tarfile
import tokenize
from typing import BinaryIO, Tuple

import numpy as np

from dit_moe.utils.npy_header import read_npy_header


class DataIntegrityError(ValueError):
    """A data file is unreadable or does not hold what its format promises; the message names the file and the fix."""


# What numpy, tarfile and webdataset raise for a damaged file: numpy parses a garbled .npy header with
# Python's tokenizer (TokenError, SyntaxError); a missing tar member shows as a KeyError.
READ_ERRORS = (OSError, EOFError, KeyError, ValueError, SyntaxError, tokenize.TokenError, tarfile.TarError)


def check_npy_file(path: str, fix: str) -> Tuple[Tuple[int, ...], np.dtype]:
    """(shape, dtype) of the `.npy` file `path`, from its header; raises unless the file is exactly that array.

    Reads the header only: the file must hold a plain (not pickled) array whose data fill the rest of the
    file. `fix` ends the error sentence, telling the user what to do about this file.
    """
    try:
        with open(path, "rb") as fp:
            shape, dtype, data_start = _parse_npy_header(_npy_header_bytes(fp))
            size = os.fstat(fp.fileno()).st_size
    except READ_ERRORS as err:
        raise DataIntegrityError(f"{path!r} is not a readable .npy file ({err}); {fix}.") from None
    if dtype.hasobject:
        raise DataIntegrityError(f"{path!r} holds pickled Python objects ({dtype}), not a numeric array; {fix}.")
    expected = data_start + math.prod(shape) * dtype.itemsize
    if size != expected:
        raise DataIntegrityError(
            f"{path!r} is {size} bytes but its header ({dtype} {shape}) needs {expected} (truncated or padded); {fix}."
        )
    return shape, dtype


def _npy_header_bytes(fp: BinaryIO) -> bytes:
    """The raw header at the start of a `.npy` stream: magic, version, length field and the padded dict.

    Version 1 stores the dict's length in 2 bytes, later versions in 4 (numpy's `.npy` format).
    """
    start = fp.read(12)
    if len(start) < 12:
        return start
    length = int.from_bytes(start[8:10], "little") + 10 if start[6] == 1 else int.from_bytes(start[8:12], "little") + 12
    return start + fp.read(max(0, length - 12))


@functools.lru_cache(maxsize=64)
def _parse_npy_header(header: bytes) -> Tuple[Tuple[int, ...], np.dtype, int]:
    """(shape, dtype, offset of the first data byte) of a raw `.npy` header.

    Memoised because parsing (numpy evaluates the dict's text) costs more than reading the file's first
    block, and the files of a features folder all share one or two headers.
    """
    stream = io.BytesIO(header)
    shape, _, dtype = read_npy_header(stream)
    if stream.tell() != len(header):
        raise ValueError("the header's length field does not match its text")
    return tuple(shape), dtype, stream.tell()


def without_worker_traceback(err: DataIntegrityError) -> DataIntegrityError:
    """The worker's own sentence of an error a DataLoader worker raised.

    A DataLoader re-raises a worker's exception as the same type whose message is the worker's whole
    traceback (torch's `ExceptionWrapper`); its last line is `<module>.DataIntegrityError: <sentence>`.
    An error raised in this process is returned unchanged.
    """
    prefix = f"{DataIntegrityError.__module__}.{DataIntegrityError.__qualname__}: "
    last = (str(err).strip().splitlines() or [""])[-1]
    return DataIntegrityError(last[len(prefix) :]) if last.startswith(prefix) else err
