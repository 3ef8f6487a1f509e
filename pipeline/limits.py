"""Memory budget for untrusted inputs: declared sizes are checked before anything is allocated."""
from __future__ import annotations

import os
import re

_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def total_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_budget() -> int:
    """Half of physical memory: room for the tensor and the work done on it."""
    return total_memory() // 2


def parse_size(text: str) -> int:
    """'512M', '8G', '1.5g' or a plain byte count."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text.lower())
    if not m:
        raise ValueError(f"expected a size such as 512M or 8G, got '{text}'")
    return int(float(m.group(1)) * _UNITS[m.group(2)])
