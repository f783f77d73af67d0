"""Giving freed memory back to the OS, and how often the cycle collector runs.

glibc's malloc keeps what a program frees for its next allocations; after a model's build (its probes and
measurements allocate hundreds of megabytes for a moment) that is tens of megabytes resident for nothing.
`malloc_trim(0)` returns the free pages. Elsewhere (musl, macOS) there is nothing to call, and nothing happens.

glibc also raises its mmap threshold each time a large mapped block is freed (up to 32 MB), so after `auto`'s
trials hand a model's 17 MB to a child process, the next model's weights and graphs come from the heap and
leave holes there that `malloc_trim` cannot return: 33 MB a further model instead of 20 (measured,
benchmarks/README.md "Footprint"). A fixed threshold keeps blocks of 4 MB and more mapped, and given back
when freed; the steps' states (512 KB at 64 rows) stay on the heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc


GC_YOUNG_THRESHOLD = 10_000  # allocations between collections of the youngest generation (CPython's default: 700)
M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
MMAP_THRESHOLD = 4 << 20  # bytes: a block this large is mapped on its own


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return libc if libc is not None and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def fix_mmap_threshold() -> None:
    """Keep glibc's mmap threshold at MMAP_THRESHOLD for good (a server calls it once, at its start)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def collect_young_less_often() -> None:
    """The cycle collector's youngest generation every GC_YOUNG_THRESHOLD allocations (a server calls it
    once, at its start). A server keeps about 100,000 objects from its start (the framework, the models'
    schemas). At CPython's 700, enough of the requests' short-lived objects outlive two young collections
    to set off a full collection every few seconds under load, and each walks all of those objects: 2% of
    the server's CPU at 64 clients, and a pause of the thread that runs it (measured, benchmarks/README.md).
    At 10,000 most of a request's objects are freed by their counts before any collection sees them;
    garbage cycles are still collected, a few seconds later."""
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def give_back() -> None:
    """Collect cycles, then return the allocator's free pages to the OS (where the C library can)."""
    gc.collect()
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)
