"""What compress prunes to: one mode, chosen once.

    Ratio          every group at PruneConfig.ratio (the default); its FLOPs spread under --scope all
    FlopsShare     at most a share of the FLOPs (--target-flops)
    LatencyTarget  a measured speedup or latency (--target-speedup, --target-latency-ms)
    WidthsFrom     the widths of an earlier report, replayed (--widths)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Union

from pipeline.errors import UsageError

REFINE_EVALS = 24  # held-out prunings a target spends refining its widths, unless told otherwise


@dataclass(frozen=True)
class Ratio:
    """PruneConfig.ratio of every eligible group's channels. Under --scope all, unless `spread` is
    off (--uniform), the FLOPs those widths keep are spread over the groups by their loss curves
    where that is closer to the teacher on held-out shots (search/spread.py)."""

    spread: bool = True


@dataclass(frozen=True)
class FlopsShare:
    """--target-flops: keep at most `share` of the FLOPs, with widths found across groups."""

    share: float
    refine_evals: int = REFINE_EVALS  # held-out prunings refining the widths; 0: allocated from loss curves
    given_as: ClassVar[str] = "--target-flops"


@dataclass(frozen=True)
class LatencyTarget:
    """--target-speedup / --target-latency-ms, measured on one provider and batch size. Its fields
    are the report's `allocation.target`."""

    speedup: float | None = None
    latency_ms: float | None = None
    provider: str = "cpu"
    batch: int = 1
    attempts: int = 4  # prune-and-measure rounds per candidate, each correcting by what was measured
    refine_evals: int = REFINE_EVALS  # held-out prunings spent refining the widths by local search; 0: none

    @property
    def given_as(self) -> str:
        return "--target-speedup" if self.speedup is not None else "--target-latency-ms"


@dataclass(frozen=True)
class WidthsFrom:
    """--widths: every group at its width in an earlier report, matched by the layers that write it."""

    report: Path  # as given: named in messages and in the allocation's cost
    given_as: ClassVar[str] = "--widths"


Mode = Union[Ratio, FlopsShare, LatencyTarget, WidthsFrom]
Target = Union[FlopsShare, LatencyTarget, WidthsFrom]


def one(*given: Target | None, ratio: Ratio = Ratio()) -> Mode:
    """The one target given (None: not given), or `ratio` where none is. Two or more raise a
    UsageError naming each, so that neither silently wins."""
    named = [mode for mode in given if mode is not None]
    if len(named) > 1:
        raise UsageError(f"give one target, not {' and '.join(mode.given_as for mode in named)}")
    return named[0] if named else ratio
