"""glibc's allocator, told to keep freed memory for the next tensor rather than hand it back.

A pruning walk allocates and frees feature maps of tens to hundreds of MB at every node. By
default glibc serves each from freshly mapped pages and unmaps them on free, so every new tensor
page-faults on first touch while the kernel zeroes it: on ResNet-50 at 224x224 (64 samples,
`--scope all`) about a fifth of the whole command's time. Inside `reuse_freed`, large blocks come
from the heap and freed ones stay there for the next; on exit glibc's settings return to what
its own adaptive rule settles at, and the heap gives its free pages back to the system.
Elsewhere than glibc (macOS, musl) it does nothing.
"""
from __future__ import annotations

import ctypes
import functools
from collections.abc import Iterator
from contextlib import contextmanager

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # mallopt's parameters (malloc.h)
NEVER = -1  # a trim threshold of -1 turns trimming off
MMAP_THRESHOLD = 32 << 20  # glibc's adaptive limits on 64-bit systems, where it stops raising them
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD
MMAP_MAX = 65536  # glibc's default
_active = 0  # reuse_freed contexts entered and not left: only the outermost restores


@functools.lru_cache(maxsize=None)
def _glibc() -> ctypes.CDLL | None:
    libc = ctypes.CDLL(None)  # the process's own symbols, the C library's among them
    if not all(hasattr(libc, name) for name in ("mallopt", "malloc_trim", "gnu_get_libc_version")):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    return libc


@contextmanager
def reuse_freed() -> Iterator[None]:
    """Large blocks from the heap, freed ones kept there, until the outermost such context ends."""
    global _active
    libc = _glibc()
    if libc is None:
        yield
        return
    if not _active:
        libc.mallopt(M_MMAP_MAX, 0)
        libc.mallopt(M_TRIM_THRESHOLD, NEVER)
    _active += 1
    try:
        yield
    finally:
        _active -= 1
        if not _active:
            libc.mallopt(M_MMAP_MAX, MMAP_MAX)
            libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
            libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
            libc.malloc_trim(0)
