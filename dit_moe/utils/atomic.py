"""Crash-safe file writes: a file appears whole under its name or not at all.

    with atomic_path(path) as tmp:      # write to tmp by any means (np.savez, PIL, save_file)
        save_file(tensors, str(tmp))

The temporary file sits beside the target (same file system, so the rename is atomic), keeps
the target's suffix (numpy and PIL choose the format by it) and is hidden and named
`.<name>.<pid>.tmp<suffix>`, so concurrent writers never share one. It is flushed to disk before
the rename and removed when the write fails.

A write that fails because the disk is full raises `DiskFull`, one sentence naming the file and
saying that the previous file of that name is unchanged, whatever the writer's own words for it were
(OSError ENOSPC; safetensors' SafetensorError "os error 28"; torch's zip writer's "unexpected pos",
taken as a full disk when the file system is then nearly full). `require_free_space` stops a large
write before it starts.
"""

from __future__ import annotations

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import UserError

NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
NO_SPACE_TEXTS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")
TORCH_ZIP_SHORT_WRITE = "unexpected pos"  # all torch's zip writer says when a write comes up short
NEARLY_FULL_BYTES = 16 * 2**20  # below this much free after a short write, the disk was full


class DiskFull(UserError):
    """A write that the disk had no room for; `errno` is ENOSPC, as an OSError's would be."""

    errno = errno.ENOSPC


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the file system that holds `path`, or its nearest existing parent (not created yet)."""
    path = Path(path)
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def is_disk_full(error: BaseException, path: str | os.PathLike) -> bool:
    """True for a write of `path` that failed for lack of space, however the writer worded it."""
    if getattr(error, "errno", None) in NO_SPACE_ERRNOS or any(text in str(error) for text in NO_SPACE_TEXTS):
        return True
    return TORCH_ZIP_SHORT_WRITE in str(error) and free_bytes(Path(path).parent) < NEARLY_FULL_BYTES


def _unchanged(path: Path, existed: bool) -> str:
    return f"the previous {path.name} there is unchanged" if existed else f"nothing was left under {path.name}"


def require_free_space(path: str | os.PathLike, needed: int) -> None:
    """Raise `DiskFull` before writing `path` when its file system has less than `needed` bytes free."""
    path = Path(path)
    free = free_bytes(path.parent)
    if free < needed:
        raise DiskFull(
            f"Not enough disk space to write {path}: {free:,} bytes free, about {needed:,} needed; nothing was "
            f"written ({_unchanged(path, path.exists())}); free space there or write it elsewhere, then run again."
        )


def temp_path_for(path: Path) -> Path:
    """The temporary name `atomic_path` writes `path` under."""
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success fsync it and rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, existed = temp_path_for(path), path.exists()
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except Exception as err:  # writers wrap a full disk in their own types (safetensors: SafetensorError)
        if not is_disk_full(err, path):
            raise
        tmp.unlink(missing_ok=True)
        raise DiskFull(
            f"Writing {path} failed because the disk is full ({' '.join(str(err).split())}); {_unchanged(path, existed)}; "
            "free space there or write it elsewhere, then run again."
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a small text file atomically; returns its path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)
