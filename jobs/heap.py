"""Giving the driver's freed memory back to the system, between the segments of a long job.

The driver's native libraries (Ray's core worker, Arrow) allocate and free memory all the time, in small pieces, and
glibc's malloc keeps much of what is freed inside its heaps for reuse instead of returning it: the driver's private
memory then climbs with the images a job renders although little of it is live. `malloc_trim(0)` returns those free
pages. On a 40,000-image dry run in segments of 4,000 (docs/RELIABILITY.md), the driver grew by about 1.6 KB per
image from its third segment on without it, and by about 0.3 KB with it called at each segment's start.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (macOS, musl). Looked up in the process's own symbols
    first: `find_library` needs ldconfig or a compiler, which slim images lack."""
    for name in (None, "libc.so.6", ctypes.util.find_library("c")):
        try:
            function = ctypes.CDLL(name).malloc_trim
        except (OSError, AttributeError, TypeError):
            continue
        function.argtypes, function.restype = [ctypes.c_size_t], ctypes.c_int
        return function
    return None


def trim() -> bool:
    """Return the C heap's and Arrow's free memory to the system; False where there is no way to (not glibc)."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    malloc_trim = _malloc_trim()
    if malloc_trim is None:
        return False
    malloc_trim(0)
    return True
