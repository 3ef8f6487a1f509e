"""The search's entry point: the widths a mode asks for, pruned and exported."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pipeline.search import flops_share, spread, target
from pipeline.search.allocate import Allocation, FlopsModel
from pipeline.search.modes import FlopsShare, LatencyTarget, Ratio, WidthsFrom
from pipeline.search.problem import Problem, Pruner
from pipeline.search.records import FlopsChoice, Keep, Progress, SearchOutcome, SpreadChoice, Stage

if TYPE_CHECKING:
    from pipeline.workflow import CompressOptions, Prepared


def widths(ready: Prepared, options: CompressOptions, progress: Progress, stage: Stage,
           kept: dict[int, np.ndarray] | None = None, replayed: Keep | None = None,
           auto_error: float | None = None) -> SearchOutcome:
    """Prune `ready`'s model to the widths `options.mode` asks for, with `options.prune`'s
    objective, and export it; every step runs under `stage`.

    `kept`: channels --method auto chose at the ratio's widths, refit from every shot where those
    widths are pruned (Ratio, not spread) rather than chosen again. `replayed`: a WidthsFrom mode's
    widths, fitted to this model by Replay.fit.
    `auto_error`: --method auto's held-out error of those channels on the first fold."""
    mode = options.mode
    problem = Problem(ready.view, ready.teacher, ready.groups, ready.shots.calib.x, options.prune, options.seed,
                      ready.layer_augmenter(options.prune), options.threads)
    pruner = Pruner(problem, ready.model.proto, ready.model.path, stage, progress,
                    kept if isinstance(mode, Ratio) else None)
    if isinstance(mode, LatencyTarget):
        return target.search(mode, problem, ready.original, pruner, stage, progress)
    alloc: Allocation | None = None
    choice: FlopsChoice | SpreadChoice | None = None
    if isinstance(mode, Ratio) and spread.applies(mode, problem):
        alloc, choice = spread.widths(problem, stage, progress, auto_error)
        if alloc is not None:
            pruner.kept = None  # channels chosen at the ratio's widths, not these
    elif isinstance(mode, WidthsFrom):
        cost = FlopsModel(ready.view, ready.groups).cost
        share = cost(replayed) / cost({})
        alloc = Allocation(replayed, share, share, f"widths of {mode.report}")
    elif isinstance(mode, FlopsShare):
        alloc, choice = flops_share.widths(mode, problem, stage, progress)
    result, slim = pruner.slim(alloc.keep if alloc else None)
    return SearchOutcome(result, slim, alloc, choice)
