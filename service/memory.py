"""Giving freed memory back to the OS.

glibc's malloc keeps what a program frees for its next allocations; after a model's build (its probes and
measurements allocate hundreds of megabytes for a moment) that is tens of megabytes resident for nothing.
`malloc_trim(0)` returns the free pages. Elsewhere (musl, macOS) there is nothing to call, and nothing happens.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def give_back() -> None:
    """Collect cycles, then return the allocator's free pages to the OS (where the C library can)."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
