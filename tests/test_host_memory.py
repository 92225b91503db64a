"""keep_freed_memory: blocks of any size come from the heap (no fresh mapping per step) once it is set."""

import argparse
import os
import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, os, sys
import torch

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    from dit_moe.utils.host_memory import keep_freed_memory
    applied = keep_freed_memory()
elif sys.argv[1] == "trainer":  # as a training process sets itself up on a CPU
    os.environ.update(DS_ACCELERATOR="cpu", WORLD_SIZE="1", RANK="0", LOCAL_RANK="0")
    from dit_moe.train.engine import init_distributed
    init_distributed()
    applied = None
elif sys.argv[1] in ("sampling", "sampling-own-process"):  # a library caller, then an entry point
    from dit_moe.sampling import SamplingRequest, prepare_sampling
    own = sys.argv[1] == "sampling-own-process"
    prepare_sampling(SamplingRequest(sys.argv[2], device="cpu", keep_freed_host_memory=own))
    applied = None
else:
    applied = False
mapped = []
for mib in (16, 256):  # an activation-sized block, and one like ZeRO's flat gradient buffers
    before = libc.mallinfo2().hblkhd
    block = torch.empty(mib * 2**18)
    mapped.append(libc.mallinfo2().hblkhd - before >= mib * 2**20)
    del block
# A step's 2.5 GiB buffer (one float per 4 KiB page touched): is it served from the heap and is the
# heap's top kept after the free (mallopt's int cannot set a trim threshold above 2 GiB, so only
# "never trim" keeps it)? Whether a second such request reuses the block depends on its alignment,
# so only the first free is asked about.
block = torch.empty(5 * 2**27)
block[::1024].fill_(1.0)
del block
kept = libc.mallinfo2().arena >= 5 * 2**29
print(applied, *mapped, kept)
"""


def probe(mode: str, *args: str, **env) -> list[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode, *args], capture_output=True, text=True, check=True, env={**environ, **env}
    )
    return out.stdout.splitlines()[-1].split()  # DeepSpeed may print before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_large_blocks_are_mapped_by_default_and_served_from_the_heap_once_set():
    # glibc's default: fresh mappings (page faults on first touch), unmapped again on free
    assert probe("default") == ["False", "True", "True", "False"]
    assert probe("keep") == ["True", "False", "False", "True"]
    assert probe("trainer") == ["None", "False", "False", "True"]  # the CPU trainer sets it up
    # a user's own malloc setting wins
    assert probe("keep", MALLOC_MMAP_MAX_="65536") == ["False", "True", "True", "False"]
    assert probe("keep", MALLOC_TRIM_THRESHOLD_="131072") == ["False", "True", "True", "False"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_prepare_sampling_leaves_malloc_alone_unless_the_process_is_the_callers_own(tiny_export):
    # [applied, 16 MiB block mapped, 256 MiB block mapped]: fresh mappings are glibc's default behaviour
    assert probe("sampling", str(tiny_export))[:3] == ["None", "True", "True"]
    assert probe("sampling-own-process", str(tiny_export))[:3] == ["None", "False", "False"]


def test_command_line_requests_own_their_process_and_library_requests_do_not():
    from dit_moe.sampling import SamplingRequest
    from dit_moe.sampling.flags import add_sampling_flags, request_from_args

    parser = argparse.ArgumentParser()
    add_sampling_flags(parser)
    assert request_from_args(parser.parse_args(["--ckpt", "x.pt"])).keep_freed_host_memory
    assert not SamplingRequest("x.pt").keep_freed_host_memory
