"""keep_freed_memory: large blocks come from the heap (no fresh mapping per step) once it is set."""

import os
import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, sys
import torch
from dit_moe.host_memory import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
before = libc.mallinfo2().hblkhd
block = torch.empty(4 * 2**20)  # 16 MiB
print(applied, libc.mallinfo2().hblkhd - before >= 16 * 2**20)
"""


def probe(mode: str, **env) -> str:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=env or None
    )
    return out.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_16_mib_block_is_mapped_by_default_and_served_from_the_heap_once_set():
    assert probe("default") == ["False", "True"]  # glibc's default: a fresh mapping (page faults on first touch)
    assert probe("keep") == ["True", "False"]
    # a user's own malloc setting wins
    assert probe("keep", **os.environ, MALLOC_TRIM_THRESHOLD_="131072") == ["False", "True"]
