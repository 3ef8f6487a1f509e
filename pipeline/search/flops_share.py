"""--target-flops: the widest one ratio for all within a share of the FLOPs, refined by local search.

The same search as a latency target without the timing: the exact FLOPs are the cost, so
nothing is measured, and the refined widths are kept only if the shots the search never scored
on confirm them.
"""
from __future__ import annotations

from pipeline.errors import NothingToPruneError
from pipeline.search import allocate, refine
from pipeline.search.allocate import Allocation, Curves, FlopsModel
from pipeline.search.modes import FlopsShare
from pipeline.search.problem import Problem, guarded, refines, splits
from pipeline.search.records import FlopsChoice, Progress, Stage


def widths(mode: FlopsShare, problem: Problem, stage: Stage, progress: Progress) -> tuple[Allocation, FlopsChoice]:
    """The loss curves in the allocate stage (only groups, floors and steps where the widths are
    refined), then the widths, in the refine stage where they are refined."""
    p = problem
    with stage("allocate"):
        refining = refines(mode.refine_evals, len(p.x))
        curves = allocate.curves(p.view, p.teacher, p.groups, p.x, p.config, p.augmenter, progress,
                                 losses=not refining)
    with stage("refine" if refining else "allocate"):
        return _widths(mode.share, mode.refine_evals, problem, curves, progress)


def _widths(share: float, evaluations: int, problem: Problem, curves: Curves,
            progress: Progress) -> tuple[Allocation, FlopsChoice]:
    """The widest one ratio for all within `share` of the FLOPs, refined by the same local search
    as a latency target with the exact FLOPs as its cost; kept only if the shots the search never
    scored on confirm it. The allocation from the loss curves alone adds per-group losses as if
    the cuts did not interact and is checked by nothing, so it stands in only where nothing can
    be held out."""
    model = FlopsModel(problem.view, problem.groups)
    if not refines(evaluations, len(problem.x)):
        return allocate.allocate(curves, model, share), FlopsChoice("allocated")
    sizes = curves.sizes
    full = model.cost(sizes)
    budget = share * full
    found = allocate.widest_uniform(curves, model.cost, budget)
    if found is None:
        floors = model.cost(allocate.uniform(curves, 0.0))
        raise NothingToPruneError(f"--target-flops {share}: the prunable groups can bring the FLOPs down to "
                                  f"{floors / full:.1%} of the original at most")
    ratio, start = found
    progress(f"FLOPs target: one ratio for all, {ratio:.2f}, keeps {model.cost(start) / full:.3f} of the FLOPs")
    score, confirm = splits(problem, progress)
    refinement = refine.refine(guarded(curves, problem, start), start, budget, model.cost, score, evaluations,
                               lambda keep: model.cost(keep) / budget, confirm, progress)
    chosen = "refined" if refinement.keep != refinement.start else "uniform"
    keep = {k: v for k, v in refinement.keep.items() if v < sizes[k]}
    alloc = Allocation(keep, share, model.cost(refinement.keep) / full, f"flops, {chosen}")
    return alloc, FlopsChoice(chosen, ratio, refinement)
