"""What the CPU running the job says about widths: onnxruntime's channel block, and its name.

MLAS, onnxruntime's CPU kernel library, runs float convolutions in a blocked layout (NCHWc)
whose block is 16 channels where the CPU has AVX-512 and 8 with AVX2 or less: a width between
two multiples is padded to the next one and costs as much. On an AVX-512 CPU, ResNet-18 at keep
ratio 0.6 and batch 32 runs about 2.7x faster than its teacher with widths on multiples of 16 and
about 2.1x on multiples of 8, for 2.85x and 2.57x fewer FLOPs (docs/BENCHMARKS.md).
"""
from __future__ import annotations

import functools
import os
import platform
from pathlib import Path


@functools.lru_cache(maxsize=None)
def channel_block() -> int:
    """Channels per NCHWc block of onnxruntime's CPU convolutions on this machine."""
    return 16 if "avx512f" in _cpuinfo("flags").split() else 8


def cpu_name() -> str:
    """Model name and core count: part of the key under which latency measurements are cached."""
    name = _cpuinfo("model name") or platform.processor() or platform.machine()
    return f"{name} x{os.cpu_count()}"


def _cpuinfo(field: str) -> str:
    """The first value of `field` in /proc/cpuinfo; '' where there is none (not Linux, or ARM)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == field:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""
