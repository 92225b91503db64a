"""Write a safetensors file one tensor at a time, so the writer never holds more than one tensor.

    write_streamed(path, {"a": ((2, 3), torch.float32), ...}, tensors, metadata)   # tensors: (name, tensor) pairs

The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length, a JSON
header of every tensor's dtype, shape and byte range plus "__metadata__", padded with spaces to a multiple
of 8 bytes, then the tensors' bytes in that order. The shapes are known before the tensors arrive (they
come one at a time from a collective gather), so the header is written first. `safetensors.torch.save_file`
needs the whole dict in memory instead.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterable, Optional

import torch

DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}


def _header(specs: dict[str, tuple[tuple[int, ...], torch.dtype]], metadata: Optional[dict[str, str]]) -> bytes:
    entries: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, (shape, dtype) in specs.items():
        size = dtype.itemsize
        for dim in shape:
            size *= dim
        entries[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(entries, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8)


def write_streamed(
    path: Path,
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: Optional[dict[str, str]] = None,
) -> None:
    """Write `tensors`, which must arrive in the order and with the shapes and dtypes of `specs`.

    Every tensor is taken from `tensors` even after a write failed (the iterable may be a collective that
    other processes wait on); the first failure is raised at the end."""
    failure: Optional[BaseException] = None
    order = iter(specs.items())
    try:
        handle = open(path, "wb")
    except OSError:
        for _ in tensors:
            pass
        raise
    with handle:
        try:
            header = _header(specs, metadata)
            handle.write(struct.pack("<Q", len(header)) + header)
        except OSError as err:
            failure = err
        for name, tensor in tensors:
            expected, (shape, dtype) = next(order)
            if name != expected or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise ValueError(
                    f"{path}: got {name} {tuple(tensor.shape)} {tensor.dtype}, expected {expected} {shape}."
                )
            if failure is None:
                try:
                    handle.write(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())  # no copy
                except OSError as err:
                    failure = err
    if failure is not None:
        raise failure
