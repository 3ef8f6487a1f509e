"""What every candidate is pruned from and scored on, and how it is pruned and exported."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from exporters.slim import slim as slim_model
from pipeline import choose, prune
from pipeline.analyze import ChannelGroup
from pipeline.augment import Augmenter
from pipeline.convert import TorchModel
from pipeline.errors import NothingToPruneError
from pipeline.graph import GraphView
from pipeline.search.allocate import Curves, read_widths_floor
from pipeline.search.records import Keep, Progress, Stage


@dataclass
class Problem:
    """What every candidate is pruned from and scored on."""

    view: GraphView
    teacher: TorchModel
    groups: list[ChannelGroup]
    x: np.ndarray  # the shots
    config: prune.PruneConfig
    seed: int
    augmenter: Augmenter | None
    threads: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        """One sample's shape: the size models with a dynamic input are timed at."""
        return self.x.shape[1:]


@dataclass
class Pruner:
    """Prunes the problem's model to given widths and exports the slim ONNX model."""

    problem: Problem
    proto: onnx.ModelProto  # the teacher as loaded
    source: Path  # the model's path, named where every group was left whole
    stage: Stage
    progress: Progress
    kept: dict[int, np.ndarray] | None = None  # channels --method auto chose at the ratio's widths: refit only

    def slim(self, keep: Keep | None) -> tuple[prune.PruneResult, onnx.ModelProto]:
        """Pruned for real (the ratio's widths where `keep` is None), in the prune and export stages."""
        p = self.problem
        with self.stage("prune"):
            result = prune.prune(p.view, p.teacher, p.groups, p.x, p.config, self.progress, p.augmenter, keep=keep,
                                 kept=self.kept)
            if not result.outcomes:
                raise NothingToPruneError(f"{self.source}: every channel group was left whole "
                                          f"({'; '.join(result.skipped.values())})")
        with self.stage("export"):
            return result, slim_model(self.proto, p.groups, result.kept, result.layers)

    def timing_model(self, keep: Keep) -> bytes:
        """Widths alone decide latency: magnitude pruning on one shot, no solve."""
        p = self.problem
        cut = prune.prune(p.view, p.teacher, p.groups, p.x[:1], replace(p.config, method="l1"), keep=keep)
        return slim_model(self.proto, p.groups, cut.kept, cut.layers).SerializeToString()


def refines(evaluations: int, samples: int) -> bool:
    """Whether a target refines one ratio for all: it needs evaluations to spend and a shot to
    hold out."""
    return bool(evaluations) and samples >= choose.MIN_SAMPLES


def guarded(curves: Curves, problem: Problem, start: Keep) -> Curves:
    """The refinement may not narrow a layer below the numbers it reads per output
    (allocate.read_widths_floor), unless one ratio for all already has."""
    floor = read_widths_floor(problem.view, curves)
    return replace(curves, floor={g: min(start.get(g, size), floor[g]) for g, size in curves.sizes.items()})


def splits(problem: Problem,
           progress: Progress) -> tuple[Callable[[Keep], float], Callable[[Keep, Keep], tuple[float, float]]]:
    """Held-out error of widths on the first fold of the shots, to search on, and of a start and
    a result on the other folds, to confirm."""
    holdout = choose.HoldOut(problem.view, problem.teacher, problem.groups, problem.x, problem.seed, problem.augmenter)

    def confirm(start: Keep, result: Keep) -> tuple[float, float]:
        scores = choose.unseen_scores(problem.view, problem.teacher, problem.groups, problem.x, problem.config,
                                      {"one ratio for all": start, "refined": result}, problem.seed,
                                      problem.augmenter, progress)
        return scores["one ratio for all"], scores["refined"]

    return (lambda keep: holdout.score(problem.config, keep)), confirm
