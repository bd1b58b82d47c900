"""Keeping freed memory in the process, so that training steps reuse it instead of page-faulting."""

from __future__ import annotations

import ctypes
import platform

# glibc's <malloc.h> parameter numbers.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse; True where glibc accepted it.

    By default glibc serves large allocations (a conv activation at batch 64 is tens of MB) with
    fresh ``mmap`` pages and unmaps them on free, so every training step page-faults all its
    activations and gradients in again, a large share of a CPU step. ``mallopt`` with
    ``M_MMAP_MAX = 0`` serves them from the heap instead, and a trim threshold of 2 GiB keeps
    the heap's freed memory there for the next step. The price: a higher peak memory, held
    until the process exits. Process-wide and lasting. Off glibc (macOS, Windows, musl) it does
    nothing; under a preloaded allocator (jemalloc, tcmalloc) glibc's answer means nothing.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    trim_kept = mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1  # mallopt returns 1 on success
    return mallopt(_M_MMAP_MAX, 0) == 1 and trim_kept
