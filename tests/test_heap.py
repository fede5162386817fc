"""jobs/heap.py: freed C-heap memory goes back to the system."""

import ctypes

import pytest

from jobs.heap import _malloc_trim, trim


def rss_anon_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("RssAnon:"))


@pytest.mark.skipif(_malloc_trim() is None, reason="the C library has no malloc_trim (not glibc)")
def test_freed_small_allocations_are_returned_to_the_system():
    """200 MB in 2 KB pieces (below mmap's threshold, so on the heap), freed behind one piece still held: glibc keeps
    the freed pages for reuse, as it does with the driver's, until trim() hands them back."""
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    pieces = [libc.malloc(2048) for _ in range(100_000)]
    for p in pieces:
        libc.memset(p, 1, 2048)  # touched, so resident
    held = libc.malloc(2048)  # keeps the heap's top in use: the free pages below it are not released on free
    try:
        for p in pieces:
            libc.free(p)
        before = rss_anon_mb()
        assert trim()
        assert before - rss_anon_mb() > 150
    finally:
        libc.free(held)
