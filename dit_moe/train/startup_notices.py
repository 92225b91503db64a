"""Warnings raised before a run's log exists (stale /dev/shm buffers removed, a resumed run's VAE found at
another path), held until the log is set up and then written into it once, by rank 0.

Without this they reach stderr through Python's last-resort handler on every rank that raises them, and a
start that then fails prints them above its one error line. A start that fails drops them: its error
sentence is what the user needs, and the housekeeping they report has been done either way."""

from __future__ import annotations

import logging


class _HeldNotices(logging.Handler):
    """Keeps WARNING and above until `take_startup_notices`."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def hold_startup_notices() -> None:
    """Hold this process's warnings from now until `take_startup_notices` (a second call changes nothing)."""
    root = logging.getLogger()
    if not any(isinstance(handler, _HeldNotices) for handler in root.handlers):
        root.addHandler(_HeldNotices())


def take_startup_notices() -> list[logging.LogRecord]:
    """Stop holding and return what was held (call before the run's logging is configured)."""
    root, held = logging.getLogger(), []
    for handler in [h for h in root.handlers if isinstance(h, _HeldNotices)]:
        root.removeHandler(handler)
        held.extend(handler.records)
    return held


def write_startup_notices(records: list[logging.LogRecord], rank: int) -> None:
    """On rank 0, pass held warnings to the logging now configured (one copy per run, not per rank)."""
    if rank == 0:
        for record in records:
            logging.getLogger(record.name).handle(record)
