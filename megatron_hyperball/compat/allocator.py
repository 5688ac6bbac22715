"""Keep freed tensor memory in the process heap on CPU, as CUDA's caching allocator does on a GPU.

glibc serves an allocation above its mmap threshold with fresh pages and unmaps them on free, so
each optimizer step's temporaries (Adam's sqrt(v), the sphere update u, ...) fault their pages in
again: ``torch._foreach_div`` over 16 fp32 tensors of 1 MiB took 6.5 ms on fresh pages and 2.2 ms
on reused ones (2-core VM, one thread). Raising the mmap threshold to glibc's maximum (32 MiB) and
the trim threshold to 1 GiB lets the heap reuse them. Without glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3   # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024          # glibc's limit on 64-bit (HEAP_MAX_SIZE / 2)
TRIM_THRESHOLD = 1024 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Set glibc's thresholds (see module doc); True if they were set."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
