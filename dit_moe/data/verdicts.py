"""Cached verdicts of the start-up data check, kept beside the data so an unchanged file is not read again.

A verdict says "this file passed the check while it had this size and modification time". It is stored in
`<features folder>/.dit_moe_checked/rank-R-of-W.json`, one file per rank of the launch shape that wrote it
(each rank checks its own share of the files, see `check.py`), under a context key: the size and mtime of
what the check compared against (the shards' manifest, the first feature's shape), so a re-extraction
invalidates every verdict. A file whose size or mtime differs from its verdict is checked again; a damaged
file that keeps both is still caught by the readers while training (see `integrity.py`).

A rank reads its own layout's file first (O(files / W) entries); under another launch shape it merges all of
them once. A folder it cannot write (read-only storage) just gets no cache.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Tuple

from dit_moe.utils.atomic import write_text

CACHE_DIR = ".dit_moe_checked"
FORMAT_VERSION = 1
Stamp = Tuple[int, int]  # (size in bytes, mtime in ns)


def stamp(path: str) -> Stamp:
    info = os.stat(path)
    return info.st_size, info.st_mtime_ns


class VerdictCache:
    """The verdicts of one rank's share of a data folder: which files passed, at which (size, mtime)."""

    def __init__(self, root: str, context: str, rank: int = 0, world_size: int = 1):
        self.root = Path(root)
        self.context = context
        self.path = self.root / CACHE_DIR / f"rank-{rank:05d}-of-{world_size:05d}.json"
        self.passed: Dict[str, Stamp] = {}
        self.known = self._load()

    def _read(self, path: Path) -> Dict[str, Stamp]:
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        if saved.get("format_version") != FORMAT_VERSION or saved.get("context") != self.context:
            return {}
        return {name: tuple(value) for name, value in saved.get("files", {}).items()}

    def _load(self) -> Dict[str, Stamp]:
        if self.path.is_file():
            return self._read(self.path)
        known: Dict[str, Stamp] = {}
        folder = self.root / CACHE_DIR
        for other in sorted(folder.glob("rank-*.json")) if folder.is_dir() else ():
            known.update(self._read(other))
        return known

    def unchanged(self, name: str, current: Stamp) -> bool:
        """Whether `name` (relative to the folder) passed before at exactly this size and mtime."""
        return self.known.get(name) == current

    def record(self, name: str, current: Stamp) -> None:
        self.passed[name] = current

    def save(self) -> bool:
        """Write this rank's verdicts atomically; False when the folder is not writable (no cache, no error)."""
        text = json.dumps({"format_version": FORMAT_VERSION, "context": self.context, "files": self.passed})
        try:
            self.path.parent.mkdir(exist_ok=True)
            write_text(self.path, text)
        except OSError:
            return False
        return True
