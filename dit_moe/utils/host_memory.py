"""Keep freed host memory in the process for reuse, rather than handing it back to the OS each step.

A CPU training or sampling step frees and reallocates the same activation, gradient and flat
buffers every time, and each page the kernel hands out afresh costs a page fault on first touch
(in a virtual machine especially). glibc's malloc serves blocks above its mmap threshold (128 KiB
to 32 MiB) with fresh mappings that it unmaps on free, and trims the heap's free top. Serving
every block from the heap and never trimming it keeps them all for reuse:
  - blocks up to 32 MiB (activations, per-parameter gradients): bench/step_profile.py measured a
    DiT-MoE-S/2 CPU training step about a quarter faster, ours and the reference-style model alike;
  - larger ones, such as the flat buffers DeepSpeed's ZeRO fills from every step's gradients. An
    aligned request cannot reuse a freed block of exactly its own size, so such a buffer extends the
    heap's top each step, and glibc trims a top above the threshold (mallopt's int caps it at 2 GiB
    unless trimming is off altogether). On one CPU rank a DiT-MoE-S/2 ZeRO-2 step went from
    ~1,500,000 page faults (glibc's defaults) to ~195,000 (trim threshold 2 GiB) to none, at about
    1.5x (16x16 latents) to 2x (32x32) the resident memory (bench/train.py's `glibc-malloc` setting).
The process's resident memory then stays at its peak instead of shrinking between steps. (torch's
THP_MEM_ALLOC_ENABLE, huge pages for blocks of 2 MiB and more, was measured too: it cut the
faults but slowed the forward and backward.) A user's own MALLOC_MMAP_MAX_, MALLOC_MMAP_THRESHOLD_ or
MALLOC_TRIM_THRESHOLD_ (or a non-glibc allocator) is left alone.

Being process-wide and without undo, it is applied only where the process is ours: the CPU trainer
(`init_distributed`) and the sampling command lines (`SamplingRequest.keep_freed_host_memory`, set by
their flag parser); library calls such as `prepare_sampling` and `collect_routing` leave malloc alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers from glibc's malloc.h
M_MMAP_MAX = -4
NEVER_TRIM = -1  # mallopt(3): -1 disables trimming (2**31 - 1 would still trim a top above 2 GiB)
USER_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Serve every block from the heap and never trim it; False where this is not glibc or the user chose."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
