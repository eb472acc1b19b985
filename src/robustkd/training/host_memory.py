"""Keep freed host memory inside the process, so training on a CPU reuses its pages.

A training step allocates and frees the same large activations (tens of MB) every step.
glibc's malloc serves such blocks with ``mmap`` and hands them back with ``munmap``, or trims
the heap's top once enough of it is free; either way the next step faults every page in
again, and the kernel zeroes each one (a visible share of a one-thread CPU step:
docs/RESULTS.md). Telling malloc never to ``mmap`` and to trim only above 2 GiB makes freed
blocks stay in the heap for the next step, the way CUDA's caching allocator keeps GPU memory.
The price is that the process keeps its peak heap, which a training process reaches anyway.

Process-wide and glibc-only (Linux); elsewhere, or with ``ROBUSTKD_KEEP_FREED_MEMORY=0``,
nothing changes.
"""

from __future__ import annotations

import ctypes
import os
import sys

OPT_OUT = "ROBUSTKD_KEEP_FREED_MEMORY"
# mallopt(3) parameter numbers (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_ABOVE = 2**31 - 1  # the largest int mallopt takes: 2 GiB free at the top before a trim

_kept = False


def keep_freed_memory() -> bool:
    """Switch glibc's malloc to keep freed memory (once per process); whether it is on."""
    global _kept
    if _kept:
        return True
    if os.environ.get(OPT_OUT, "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)  # the symbols the process already links: its libc
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only (not musl)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    _kept = mallopt(M_TRIM_THRESHOLD, TRIM_ABOVE) == 1 and mallopt(M_MMAP_MAX, 0) == 1
    return _kept
