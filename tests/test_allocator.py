"""Inside `reuse_freed` a large block comes from glibc's heap, not from pages mapped for it
alone (which the kernel zeroes on first touch); afterwards glibc maps large blocks again."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from pipeline import allocator

BLOCK = 64 << 20  # above every mmap threshold glibc would pick by itself (at most 32 MB)


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _mapped_bytes() -> int:
    """Bytes glibc holds in blocks mapped one by one."""
    libc = allocator._glibc()
    libc.mallinfo2.restype = _Mallinfo2
    return libc.mallinfo2().hblkhd


def _mapped_for(size: int) -> int:
    before = _mapped_bytes()
    block = np.ones(size, np.uint8)
    grown = _mapped_bytes() - before
    del block
    return grown


def test_large_blocks_come_from_the_heap_inside_and_are_mapped_again_after_the_outermost():
    if allocator._glibc() is None or not hasattr(allocator._glibc(), "mallinfo2"):
        pytest.skip("not glibc 2.33 or later")
    with allocator.reuse_freed():
        with allocator.reuse_freed():
            pass
        inside = _mapped_for(BLOCK)  # after an inner context ended, still inside the outer
    after = _mapped_for(2 * BLOCK)  # more than any block the context may have left free in the heap
    assert inside == 0
    assert after >= 2 * BLOCK
