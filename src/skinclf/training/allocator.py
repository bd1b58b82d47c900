"""Keeping freed memory in the process, so that training steps reuse it instead of page-faulting."""

from __future__ import annotations

import ctypes
import sys

# glibc's <malloc.h> parameter numbers.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse; True where it took effect.

    By default glibc serves large allocations (a conv activation at batch 64 is tens of MB) with
    fresh ``mmap`` pages and gives them back on free, so every training step page-faults all its
    activations and gradients in again: about 40 % of the baseline's CPU step time. ``mallopt``
    with ``M_MMAP_MAX = 0`` serves them from the heap, and a high ``M_TRIM_THRESHOLD`` keeps the
    heap's freed memory for the next step. The price: the process holds on to its peak memory
    until it exits. Process-wide and lasting; off glibc (macOS, Windows, musl) nothing happens.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    # mallopt returns 1 on success; both, in this order, so the heap never shrinks under us.
    return mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1 and mallopt(_M_MMAP_MAX, 0) == 1
