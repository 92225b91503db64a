"""Crash-safe file writes: a file appears whole under its name or not at all.

    with atomic_path(path) as tmp:      # write to tmp by any means (np.savez, PIL, save_file)
        save_file(tensors, str(tmp))

The temporary file sits beside the target (same file system, so the rename is atomic), keeps
the target's suffix (numpy and PIL choose the format by it) and is hidden and named
`.<name>.<pid>.tmp<suffix>`, so concurrent writers never share one. It is flushed to disk before
the rename and removed when the write fails.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def temp_path_for(path: Path) -> Path:
    """The temporary name `atomic_path` writes `path` under."""
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success fsync it and rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a small text file atomically; returns its path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)
