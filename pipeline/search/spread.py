"""--ratio under --scope all: the ratio's FLOPs, spread over the groups by their loss curves.

One ratio for all cuts a residual stream that every block of a stage reads, or a gated SE
expansion, as deeply as a layer that carries little. Each such cut costs the network a little
alone, and together they compound: on squeeze-excitation networks one ratio for all collapses
(MobileNetV3-Small at 0.5: 32% top-1 from a 92% teacher, while no group pruned alone costs more
than 12 points). The same FLOPs spent where the output-weighted removal curves say a FLOP costs
least keep such networks working. The curves add per-group losses as if the cuts did not
interact, so both widths are pruned on part of the shots and scored on the rest, and the
allocation is kept only where it is closer to the teacher there by GAIN.
"""
from __future__ import annotations

import numpy as np

from pipeline import choose, prune
from pipeline.search import allocate
from pipeline.search.allocate import Allocation, FlopsModel
from pipeline.search.modes import Ratio
from pipeline.search.problem import Problem
from pipeline.search.records import SPREAD_COST, Progress, SpreadChoice, Stage
from pipeline.search.refine import beats

FOLDS = 1  # held-out folds the widths are scored on
SETTLED = 0.02  # one ratio for all this close to the teacher on held-out shots is kept without a search


def applies(mode: Ratio, problem: Problem) -> bool:
    """Spread where the ratio would cut channels tied across layers: --scope all, and a coupled
    group (residual, gating, Concat) among those it prunes."""
    return mode.spread and problem.config.scope == "all" and any(
        g.coupling for g in allocate.eligible_groups(problem.teacher, problem.groups, problem.config))


def widths(problem: Problem, stage: Stage, progress: Progress,
           auto_error: float | None = None) -> tuple[Allocation | None, SpreadChoice]:
    """The allocation at one ratio for all's FLOPs, where it beats one ratio for all on held-out
    shots (None: one ratio for all, pruned as without spreading). One ratio for all within
    SETTLED of the teacher there is kept as it is: the loss curves cost a pruning per group.

    `auto_error`: the first fold's error of one ratio for all that --method auto measured on its
    way, its channels chosen by auto's selector and refit by the winning objective. It only
    settles (a pruning saved): the allocation is compared with one ratio for all pruned by the
    winning objective alone, as the allocation is."""
    p = problem
    with stage("allocate"):
        model = FlopsModel(p.view, p.groups)
        uniform = {g.id: p.config.kept_count(g.size, g.unit) for g in allocate.eligible_groups(p.teacher, p.groups,
                                                                                              p.config)}
        share = model.cost(uniform) / model.cost({})
        held = len(p.x) >= choose.MIN_SAMPLES
        settles = auto_error is not None and auto_error <= SETTLED
        scores = {"uniform": auto_error if settles else _score(p, None, "uniform", progress)} if held else {}
        if held and scores["uniform"] <= SETTLED:
            progress(f"ratio {p.config.ratio}: one ratio for all is within {SETTLED} of the teacher on held-out "
                     f"shots ({scores['uniform']:.4f}{', --method auto' if settles else ''}); kept")
            return None, SpreadChoice("uniform", share, scores)
        curves = allocate.curves(p.view, p.teacher, p.groups, p.x, p.config, p.augmenter, progress)
        alloc = allocate.allocate(curves, model, share, SPREAD_COST, strict=False)
        progress(f"ratio {p.config.ratio} under --scope all: {share:.3f} of the FLOPs, spread over "
                 f"{len(curves.groups)} groups by their loss curves")
        if not held:
            return alloc, SpreadChoice("allocated", share)
        scores["allocated"] = _score(p, alloc.keep, "allocated", progress)
    chosen = "allocated" if beats(scores["allocated"], scores["uniform"]) else "uniform"
    progress(f"ratio {p.config.ratio}: {chosen} widths kept (held-out error allocated {scores['allocated']:.4f}, "
             f"one ratio for all {scores['uniform']:.4f})")
    return (alloc if chosen == "allocated" else None), SpreadChoice(chosen, share, scores)


def _score(p: Problem, keep: dict[int, int] | None, name: str, progress: Progress) -> float:
    """Mean held-out error of the widths (None: the ratio's) over the first FOLDS disjoint folds."""
    return float(np.mean([choose.holdout_scores(p.view, p.teacher, p.groups, p.x, {name: prune.Job(p.config, keep)},
                                                p.seed, p.augmenter, f"spread, held-out fold {fold + 1}", progress,
                                                fold)[name]
                          for fold in range(min(FOLDS, choose.disjoint_folds(len(p.x))))]))
