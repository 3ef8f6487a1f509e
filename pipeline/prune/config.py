"""What one pruning is asked to do: how many channels each group keeps, by which objective."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from pipeline import hardware
from pipeline.analyze import ChannelGroup
from pipeline.solve import METHODS, SOLVERS

SCOPES = ("internal", "all")
ALIGN = 8  # channel multiple that onnxruntime's CPU (without AVX-512) and CUDA float kernels are fastest at
ROW_BUDGET = 4096  # patch rows per consumer that its statistics are taken from (sampled over every input)


@dataclass(frozen=True)
class PruneConfig:
    ratio: float = 0.5  # share of each group's channels kept
    method: str = "cross"
    mu: float = 0.6
    solver: str = "closed"
    damp: float = 0.01
    pgd_iters: int = 3000
    pgd_lr: float = 1e-3
    chunk: int = 16  # samples per forward pass while accumulating statistics
    round_to: int = 0  # kept channels a multiple of this; 0: by the group's size and the CPU (see step)
    scope: str = "internal"  # internal: single-producer groups only (the paper's choice); all: coupled too
    exclude: tuple[str, ...] = ()  # fnmatch patterns: groups with a producer or consumer matching stay whole
    rows: int = ROW_BUDGET  # rows per consumer for its statistics; 0: every row of every input

    def __post_init__(self):
        if not 0 < self.ratio < 1:
            raise ValueError("ratio must be in (0, 1)")
        if not 0 <= self.mu <= 1:
            raise ValueError("mu must be in [0, 1]")
        if self.method not in METHODS or self.solver not in SOLVERS or self.scope not in SCOPES:
            raise ValueError(f"method in {METHODS}, solver in {SOLVERS}, scope in {SCOPES}")
        if self.rows < 0:
            raise ValueError("rows must be 0 (all) or positive")

    def excludes(self, group: ChannelGroup) -> str:
        """The first layer of the group that an --exclude pattern names, or ''."""
        names = group.producers + [c.node for c in group.consumers]
        return next((n for n in names for pat in self.exclude if fnmatch.fnmatchcase(n, pat)), "")

    def step(self, size: int, unit: int = 1) -> int:
        """The multiple a group of `size` units of `unit` channels keeps, in units. onnxruntime's
        CPU convolutions pad every width to a multiple of their channel block (16 with AVX-512,
        else 8) and GPU kernels favour multiples of 8, so a group keeps multiples of the block if
        it has four blocks or more, of ALIGN if it has four of those; smaller groups are left
        unrounded, since multiples of 8 would leave a 16-channel group only 8 or 16. Units of a
        grouped Conv are already that many channels wide."""
        channels = self.round_to or next((s for s in (hardware.channel_block(), ALIGN) if size * unit >= 4 * s), 1)
        return max(1, channels // unit)

    def kept_count(self, size: int, unit: int = 1) -> int:
        keep = max(1, round(self.ratio * size))
        step = self.step(size, unit)
        if step > 1:
            keep = min(size, max(step, round(keep / step) * step))
        return keep
