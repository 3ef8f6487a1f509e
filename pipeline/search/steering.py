"""Steering widths to a measured latency goal: predict, prune, measure, correct.

The per-layer table (search/latency.py) predicts what widths cost; every attempt is pruned and
timed with the teacher in one run, and the readings, not the table, decide where the next
attempt goes. Widths allocated from the loss curves and one ratio for all are steered alike.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

from pipeline.runtime import SessionConfig
from pipeline.search.allocate import Allocation, Curves, allocate, uniform, widest_uniform
from pipeline.search.records import Attempt

if TYPE_CHECKING:
    from pipeline.search.latency import LatencyModel

ALLOCATED = "allocated"  # the name of widths allocated from the loss curves, beside "uniform"
RATIO_STEP = 0.05  # one ratio for all: a bracket of measured ratios this narrow ends the search


@dataclass
class Steering:
    """Allocations for a measured goal: predict, prune, measure; after a miss ask the prediction
    for that much less, after a result well under the goal for more, and once both are known,
    close in on where the readings cross the aim. One ratio for all, once one has met, takes the
    widest ratio inside the bracket of measured ones that this prediction says meets, or else
    where the readings at the bracket's ends cross the aim. Misses and hits
    count against the aim, a margin under the goal. The attempt kept is the one that pruned least
    among those that met the aim: the widest ratio, or the slowest allocation against its
    teacher."""

    model: LatencyModel
    curves: Curves
    teacher_ms: float
    goal_ms: float
    session: SessionConfig
    batch: int
    target: dict
    uniform: bool = False  # one ratio for every group (the largest predicted to meet the goal)
    attempts: list[Attempt] = field(default_factory=list)
    close: float = 0.95  # a result at least this share of the aim ends the search
    margin: float = 0.03  # aimed this much under the goal: one timing of a model 1% under it is a coin toss later
    near: float = 0.05  # a miss by less than this share of the aim is worth timing again

    def __post_init__(self):
        self.aim_ms = self.goal_ms * (1 - self.margin)
        self.share = self.aim_ms / self.teacher_ms
        self.bounds = [0.0, math.inf]  # predicted shares known to meet / to miss the goal
        self.readings = [0.0, 1.0]  # their measured shares of the teacher's time
        self.ratios = [0.0, 1.0]  # one ratio for all: widest known to meet / narrowest known to miss
        self.read_at = {1.0: 1.0}  # one ratio for all: measured share of the teacher's time per ratio
        self.ratio = 1.0  # the one ratio of the last allocation

    @property
    def name(self) -> str:
        return "uniform" if self.uniform else ALLOCATED

    def allocation(self) -> Allocation:
        """Stops at the groups' floors if the prediction says the goal is out of reach: the
        prediction may be wrong (the rest of the network is taken as fixed), the measurement
        decides, and a miss is reported."""
        if not self.uniform:
            return allocate(self.curves, self.model, self.share, "latency", strict=False)
        sizes = self.curves.sizes
        full = self.model.cost(sizes)
        if self.ratios[0] > 0:  # a ratio met the aim: toward the widest that does, by measurement
            keep = self._predicted_inside(full) or self._bisected()
        else:
            self.ratio, keep = (widest_uniform(self.curves, self.model.cost, self.share * full)
                                or (0.01, uniform(self.curves, 0.01)))
        return Allocation({k: v for k, v in keep.items() if v < sizes[k]}, self.share,
                          self.model.cost(keep) / full, "latency, one ratio")

    def _predicted_inside(self, full: float) -> dict[int, int] | None:
        """The widest ratio inside the bracket that the prediction, corrected by what was measured
        (`share`), says meets the aim, if its widths are new: after a ratio that met with room to
        spare, halving the bracket would spend the rounds left on ratios far too wide to meet.
        None where the prediction has nothing new to offer: halving, by measurement alone, decides
        then (a latency flat in width misleads the prediction)."""
        low, high = self.ratios
        met, missed = (uniform(self.curves, r) for r in self.ratios)
        found = widest_uniform(self.curves, self.model.cost, self.share * full, high - 0.01, low, skip=missed)
        if found is None or found[1] == met:
            return None
        self.ratio, keep = found
        return keep

    def _bisected(self) -> dict[int, int]:
        """Widths of the ratio where the readings at the bracket's ends, interpolated, cross the aim
        (the teacher reads 1.0 at full width): the readings say where the aim lies, where the
        bracket's middle can be far off it with no round left to correct. Rounded to steps, a
        ratio can give the widths of one already measured, which would end the search at the
        narrower end although wider widths lie between; the bracket then shrinks to that side
        and its middle is taken, until the widths are new or the bracket is narrower than
        RATIO_STEP / 4."""
        low, high = self.ratios
        if low in self.read_at and high in self.read_at:
            self.ratio = _falsi((low, high), (self.read_at[low], self.read_at[high]), self.aim_ms / self.teacher_ms)
            keep = uniform(self.curves, self.ratio)
            if keep not in [uniform(self.curves, r) for r in self.ratios]:
                return keep
        while True:
            self.ratio = sum(self.ratios) / 2
            keep = uniform(self.curves, self.ratio)
            ends = [uniform(self.curves, r) for r in self.ratios]
            if keep not in ends or self.ratios[1] - self.ratios[0] <= RATIO_STEP / 4:
                return keep
            self.ratios[ends.index(keep)] = self.ratio

    def record(self, alloc: Allocation, measured_ms: float, teacher_ms: float,
               progress: Callable[[str], None]) -> bool:
        """Log an attempt, timed with the teacher in one run, and choose the next share; True when
        searching further cannot help. A speedup goal follows the teacher's time in that run: the
        same teacher timed alone minutes earlier can differ by a quarter at batch 1."""
        if self.target.get("speedup"):
            self.teacher_ms, self.goal_ms = teacher_ms, teacher_ms / self.target["speedup"]
            self.aim_ms = self._aim(teacher_ms)
        self.attempts.append(Attempt(self.share, alloc.share * self.teacher_ms, measured_ms, teacher_ms, self.goal_ms,
                                     self.aim_ms, ratio=self.ratio if self.uniform else None))
        progress(f"latency target ({self.name} widths): {measured_ms:.3f} ms measured for {self.goal_ms:.3f} ms "
                 f"asked (teacher {teacher_ms:.3f} ms in the same run, attempt {len(self.attempts)})")
        met = measured_ms <= self.aim_ms
        if self.uniform:
            self.read_at[self.ratio] = measured_ms / teacher_ms
            # where latency barely changes with width, "close to the aim" says nothing about how
            # much wider one ratio could be: stop on a narrow bracket of measured ratios instead
            self.ratios = [max(self.ratios[0], self.ratio), self.ratios[1]] if met else \
                [self.ratios[0], min(self.ratios[1], self.ratio)]
            if met and self.ratios[1] - self.ratios[0] <= RATIO_STEP:
                return True
        elif met and (measured_ms >= self.close * self.aim_ms or self.share >= 1.0):
            return True
        # from the share these widths are predicted to cost: asking the same prediction for less
        # than it already gave would return the same widths
        self.bounds[0 if met else 1] = alloc.share
        self.readings[0 if met else 1] = measured_ms / teacher_ms
        low, high = self.bounds
        self.share = self._between() if 0 < low and high < math.inf else \
            self._corrected(alloc.share, measured_ms, teacher_ms)
        return False

    def _between(self) -> float:
        """The predicted share, between one that met and one that missed, where their measured
        shares interpolated reach the aim (regula falsi), kept a tenth of the way from either end.
        The middle of the predicted shares would assume the prediction is right, and a per-layer
        table can be far off for narrow widths: the readings, not the table, say where the aim lies."""
        return _falsi(self.bounds, self.readings, self.aim_ms / self.teacher_ms)

    def _corrected(self, predicted: float, measured_ms: float, teacher_ms: float) -> float:
        """The share to ask the prediction for after one reading: the saving it predicted for those
        widths (1 - `predicted`) scaled to the saving measured, so that full width stays exact.
        Scaling the whole share by the reading instead would ask for about full width after any
        reading far under the goal, and spend the next round on a model barely pruned."""
        aim, measured = self._aim(teacher_ms) / teacher_ms, measured_ms / teacher_ms
        if measured >= 1.0:  # no faster than the teacher: no saving to scale
            return predicted * aim / measured
        return min(1.0, max(0.0, 1 - (1 - aim) * (1 - predicted) / (1 - measured)))

    def missed_later(self, measured_ms: float, teacher_ms: float) -> None:
        """The kept attempt, timed again with the teacher, missed the goal: it counts as missed from
        now on, one ratio for all narrows as after a miss and the allocation asks the prediction for
        the saving measured, so that the next attempt lies between the widest ratio still met and it."""
        kept = self.attempts[self.best]
        kept.missed_later = (measured_ms, teacher_ms)
        if self.uniform:
            self.read_at[kept.ratio] = measured_ms / teacher_ms
            self.ratios = [max((a.ratio for a in self.attempts if a.met), default=0.0), min(self.ratios[1], kept.ratio)]
        self.share = self._corrected(kept.predicted_ms / kept.teacher_ms, measured_ms, teacher_ms)

    def narrowly_missed(self, measured_ms: float, teacher_ms: float) -> bool:
        aim = self._aim(teacher_ms)
        return aim < measured_ms <= aim * (1 + self.near)

    def _aim(self, teacher_ms: float) -> float:
        """The aim against a teacher timed at `teacher_ms`: a speedup goal follows it."""
        goal = teacher_ms / self.target["speedup"] if self.target.get("speedup") else self.goal_ms
        return goal * (1 - self.margin)

    @property
    def best(self) -> int:
        """Index of the attempt to keep: of those that met their aim the widest one ratio for all,
        or the slowest allocation (against its teacher), since it pruned least; else the fastest."""
        met = [i for i, a in enumerate(self.attempts) if a.met]
        key = lambda i: self.attempts[i].measured_ms / self.attempts[i].teacher_ms
        if met and self.uniform:
            return max(met, key=lambda i: self.attempts[i].ratio)
        return max(met, key=key) if met else min(range(len(self.attempts)), key=key)

    @property
    def target_met(self) -> bool:
        return bool(self.attempts) and self.attempts[self.best].met


def _falsi(ends: Sequence[float], readings: Sequence[float], aim: float) -> float:
    """Between two ends (one met, one missed), where their readings interpolated reach `aim`, kept
    a tenth of the way from either end; the middle where the wider end read faster (noise)."""
    (low, high), (read_low, read_high) = ends, readings
    if read_high <= read_low:
        return (low + high) / 2
    t = (aim - read_low) / (read_high - read_low)
    return low + min(0.9, max(0.1, t)) * (high - low)
