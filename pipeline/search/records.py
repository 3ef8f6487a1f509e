"""What the search hands around: attempts, candidates, picks and the outcome.

Records hold the search's own values and become the report's `allocation` section only through
their `to_json`, whose layout the report keeps.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from pipeline.search.allocate import Allocation

if TYPE_CHECKING:
    import onnx

    from pipeline.prune import PruneResult
    from pipeline.search.refine import Refinement
    from pipeline.search.steering import Steering

Progress = Callable[[str], None]
Stage = Callable[[str], AbstractContextManager]  # times the work inside it under a stage's name
Keep = dict[int, int]  # units kept per group id


@dataclass
class Attempt:
    """One prune-and-time round of a latency target: widths predicted to cost `predicted_share`
    of the teacher's time, measured with the teacher in one run."""

    predicted_share: float
    predicted_ms: float
    measured_ms: float
    teacher_ms: float
    goal_ms: float
    aim_ms: float  # the goal less the steering's margin: what counts as met
    ratio: float | None = None  # one ratio for all's ratio; None for allocated widths
    steered: bool = True  # False: refined widths timed once, whose row has no ratio
    missed_later: tuple[float, float] | None = None  # (ms, teacher ms) timed together again, over the goal

    @property
    def met(self) -> bool:
        return self.measured_ms <= self.aim_ms and self.missed_later is None

    def __getitem__(self, key: str) -> Any:
        """The value as the attempt's report row holds it: attempt["measured_ms"]."""
        return self.to_json()[key]

    def to_json(self) -> dict:
        row: dict = {"predicted_share": self.predicted_share, "predicted_ms": self.predicted_ms}
        if self.steered:
            row["ratio"] = self.ratio
        row.update(measured_ms=self.measured_ms, teacher_ms=self.teacher_ms, goal_ms=self.goal_ms,
                   aim_ms=self.aim_ms)
        if self.missed_later is not None:
            row["missed_later"] = dict(zip(("measured_ms", "teacher_ms"), self.missed_later))
        return row


@dataclass
class Candidate:
    """Widths a latency target may keep: allocated, pruned and exported, with how they were found.
    `attempts` is the steering's own list, so rounds and marks added later show; `kept_attempt`
    and `target_met` are as they were when the candidate was taken."""

    alloc: Allocation
    result: PruneResult
    slim: onnx.ModelProto
    steering: Steering
    attempts: list[Attempt]
    kept_attempt: int  # 1-based
    target_met: bool

    @property
    def kept(self) -> Attempt:
        return self.attempts[self.kept_attempt - 1]

    def to_json(self) -> dict:
        return {"latency_model": self.steering.model.to_json(), "attempts": [a.to_json() for a in self.attempts],
                "kept_attempt": self.kept_attempt, "target": self.steering.target, "target_met": self.target_met}


@dataclass
class Pick:
    """The candidates timed again together with the teacher, and the one kept."""

    chosen: str
    ms: dict[str, float]  # median per model of the joint timing, the teacher's included
    goal_ms: float  # against the teacher of that timing
    met: list[str]  # met the goal in the joint timing
    twice: list[str]  # of those, also met it when found
    confirmation: dict | None  # target.allocation_confirmed's answer, where allocated widths were best
    candidates: dict[str, Candidate]  # as they stood when picked
    scores: dict[str, float]  # held-out relative squared error per candidate scored

    def to_json(self) -> dict:
        return {"chosen": self.chosen, "timed_together": {"ms": self.ms, "goal_ms": self.goal_ms, "met": self.met,
                                                          "met_when_found_too": self.twice},
                "allocation_confirmation": self.confirmation,
                "target_met_timed_together": self.chosen in self.met, "candidates": {
                    name: {"keep": {str(k): v for k, v in c.alloc.keep.items()}, "target_met": c.target_met,
                           "attempts": [a.to_json() for a in c.attempts], "kept_attempt": c.kept_attempt,
                           "holdout_relative_squared_error": self.scores.get(name)}
                    for name, c in self.candidates.items()}}


@dataclass
class LatencyChoice:
    """How a latency target's widths were chosen."""

    pick: Pick
    chosen: Candidate
    refinement: Refinement | None  # local search from one ratio for all, where it ran
    one_thread: dict | None  # target.one_thread's timing, where it ran

    def to_json(self) -> dict:
        return {**self.pick.to_json(), **self.chosen.to_json(),
                "refinement": self.refinement.to_json() if self.refinement else None, "one_thread": self.one_thread}


@dataclass
class FlopsChoice:
    """How a FLOPs target's widths were chosen: "allocated" from the loss curves, or one ratio for
    all ("uniform") and its local search ("refined")."""

    chosen: str
    ratio: float | None = None
    refinement: Refinement | None = None

    def to_json(self) -> dict:
        if self.refinement is None:
            return {"chosen": self.chosen}
        return {"chosen": self.chosen, "ratio": self.ratio, "refinement": self.refinement.to_json()}


SPREAD_COST = "flops of the ratio, spread"  # the report's allocation cost for a spread ratio, either choice


@dataclass
class SpreadChoice:
    """--ratio under --scope all: its FLOPs `share` allocated from the loss curves, kept
    ("allocated") or not ("uniform") by the held-out error of both."""

    chosen: str
    share: float
    scores: dict[str, float] | None = None  # held-out relative squared error of each; None: none held out

    def to_json(self) -> dict:
        return {"cost": SPREAD_COST, "chosen": self.chosen, "ratio_share": self.share,
                "holdout_relative_squared_error": self.scores}


@dataclass
class SearchOutcome:
    """The widths a mode led to, pruned and exported."""

    result: PruneResult
    slim: onnx.ModelProto
    alloc: Allocation | None = None  # None: one ratio for all
    choice: FlopsChoice | LatencyChoice | SpreadChoice | None = None

    def to_json(self) -> dict | None:
        """The report's `allocation` section."""
        if self.alloc is None:
            return None if self.choice is None else self.choice.to_json()
        return {**self.alloc.to_json(), **(self.choice.to_json() if self.choice else {})}
