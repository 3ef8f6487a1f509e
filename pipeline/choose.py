"""`--method auto` / `--mu auto`: pick the objective without labels and without test data.

Most of the shots play the whole pruning: in one walk over the network, the selector (cross
distillation at the given mu) chooses each group's channels as the walk reaches it and every
other candidate objective refits the same channels, reading only the kept columns' statistics.
The one whose student stays closest to the teacher on the shots none of them saw (and their
augmented variants) wins, and refits the channels of the first split from all shots. Fidelity is
the relative error of the outputs, which needs no labels. The selection, the costly part of a
pruning, is paid once, inside the walk the candidates need anyway. Each candidate costs a
student's forward over the shots, and a method's mu moves its score far less than the methods
differ, so the selector's method walks at its other mu only where the selector beat the others.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from pipeline import prune
from pipeline.analyze import ChannelGroup
from pipeline.augment import Augmenter
from pipeline.convert import TorchModel, relative_squared_error, run_torch
from pipeline.graph import GraphView

HOLDOUT = 0.25  # share of the shots set aside to score candidates (at least one sample)
MIN_HELD_OUT = 8  # --method auto scores over more splits until this many shots were held out (at most 4)
MIN_SAMPLES = 2  # one to fit, one to hold out: fewer, and candidates cannot be compared
USUAL_MU = {"cross": 0.6, "soft": 0.3}  # a method given without --mu: the authors' cross, auto's soft
MU_GRID = {"cross": (0.3, 0.6, 0.9), "soft": (USUAL_MU["soft"],), "layerwise": (0.6,)}
AUTO_METHODS = ("cross", "soft", "layerwise")


def usual_mu(method: str) -> float:
    """The mu of `method` given without --mu; methods without one (and auto, which starts from
    cross) take cross's."""
    return USUAL_MU.get(method, USUAL_MU["cross"])


@dataclass
class Choice:
    config: prune.PruneConfig
    scores: dict[str, float]  # candidate -> relative squared output error on the held-out shots (mean of splits)
    kept: dict[int, np.ndarray]  # the channels the selector chose on the first split's fitted shots
    splits: int = 1
    first_split: float = float("nan")  # the chosen objective's error on the first split alone

    def to_json(self) -> dict:
        return {"method": self.config.method, "mu": self.config.mu, "holdout_relative_squared_error": self.scores,
                "holdout_splits": self.splits}


def candidates(config: prune.PruneConfig, auto_method: bool, auto_mu: bool) -> list[prune.PruneConfig]:
    methods = AUTO_METHODS if auto_method else (config.method,)
    return [replace(config, method=m, mu=mu) for m in methods
            for mu in (MU_GRID.get(m, (config.mu,)) if auto_mu else (config.mu,))]


def choose(view: GraphView, teacher: TorchModel, groups: list[ChannelGroup], x: np.ndarray,
           options: list[prune.PruneConfig], selector: prune.PruneConfig, seed: int, augmenter: Augmenter | None,
           progress: Callable[[str], None] = lambda _: None) -> Choice:
    """The candidate with the least held-out error refitting the channels `selector` chooses on
    the first split; with few shots the error is averaged over disjoint held-out sets, since one
    split of a handful of shots can pick a method by chance (the later splits refit the first
    one's channels: a selection costs more than the refits)."""
    named = {f"{config.method} mu={config.mu}": config for config in [selector] + options}
    folds = min(disjoint_folds(len(x)), -(-MIN_HELD_OUT // _held(len(x))))
    first = [n for n, c in named.items() if c == selector or c.method != selector.method]
    rest = [n for n in named if n not in first] if len(first) > 1 else []
    per_fold: dict[str, list[float]] = {n: [] for n in named}
    kept: dict[int, np.ndarray] = {}

    def play(names: list[str]) -> None:
        """Score `names` on every split; until the selector has chosen, it is names[0] and the others follow it."""
        for fold in range(folds):
            jobs = {n: prune.Job(named[n], kept=kept, ranking=True) if kept else
                    prune.Job(named[n], ranking=True, follows=None if named[n] == selector else 0) for n in names}
            scores, results = holdout_results(view, teacher, groups, x, jobs, seed, augmenter,
                                              "auto" if folds == 1 else f"auto, split {fold + 1}/{folds}", progress,
                                              fold)
            if not kept:
                kept.update(results[0].kept)
            for n, score in scores.items():
                per_fold[n].append(score)

    def mean(name: str) -> float:
        """A candidate's held-out error over the splits; infinite where it was not scored."""
        return float(np.mean(per_fold[name])) if per_fold[name] and named[name] in options else np.inf

    play(first if rest else list(named))
    if rest and min(first, key=mean) == first[0]:
        play(rest)  # the selector's method won: its other mu
    scores = {n: mean(n) for n in named if mean(n) < np.inf}
    best = min(scores, key=scores.get)
    return Choice(named[best], scores, kept, folds, per_fold[best][0])


def _held(shots: int) -> int:
    return max(1, int(round(HOLDOUT * shots)))


def disjoint_folds(shots: int) -> int:
    """How many disjoint held-out sets one order of the shots gives."""
    return min(round(1 / HOLDOUT), shots // _held(shots))


class HoldOut:
    """Prunes from most of the shots and scores the student on the rest: the same split for
    every candidate, so their scores compare. Folds 0, 1, ... hold out disjoint shots."""

    def __init__(self, view: GraphView, teacher: TorchModel, groups: list[ChannelGroup], x: np.ndarray, seed: int,
                 augmenter: Augmenter | None, fold: int = 0):
        order = np.random.default_rng(seed).permutation(len(x))
        held = _held(len(x))
        out = np.zeros(len(x), bool)
        out[order[fold * held:(fold + 1) * held]] = True
        self.fit, self.check = x[~out], x[out]
        if augmenter is not None:
            self.check = np.concatenate(list(augmenter.variants(self.check, 0)))
        self.view, self.teacher, self.groups, self.augmenter = view, teacher, groups, augmenter
        self.reference = run_torch(teacher, self.check)
        self.grams = prune.TeacherGrams()
        self.prefixes = prune.Prefixes()  # the refinement's trials share most of their groups

    def score(self, config: prune.PruneConfig, keep: dict[int, int] | None = None) -> float:
        """Relative squared output error on the held-out inputs (the worst output's)."""
        return self.scores([prune.Job(config, keep)])[0]

    def scores(self, jobs: list[prune.Job], progress: Callable[[str], None] = lambda _: None) -> list[float]:
        """`score` of several prunings, pruned together in one walk over the fitted shots."""
        return self.errors(self.prune(jobs, progress))

    def prune(self, jobs: list[prune.Job], progress: Callable[[str], None] = lambda _: None) -> list[prune.PruneResult]:
        """Several prunings of the fitted shots in one walk."""
        return prune.prune_jobs(self.view, self.teacher, self.groups, self.fit, jobs, progress, self.augmenter,
                                cache=self.grams, reuse=self.prefixes)

    def errors(self, results: list[prune.PruneResult]) -> list[float]:
        """Each pruning's relative squared output error on the held-out inputs (the worst output's)."""
        return [max(relative_squared_error(r, s) for r, s in zip(self.reference, run_torch(res.student, self.check)))
                for res in results]


def unseen_scores(view: GraphView, teacher: TorchModel, groups: list[ChannelGroup], x: np.ndarray,
                  config: prune.PruneConfig, widths: dict[str, dict[int, int]], seed: int,
                  augmenter: Augmenter | None, progress: Callable[[str], None] = lambda _: None) -> dict[str, float]:
    """Mean held-out error of each named widths over the folds of split `seed` after the first: the
    shots a search that scored on fold 0 never saw. The best of two dozen candidates on one fold is
    partly the luckiest there, and a second random split would share a quarter of its held-out
    shots with the first, enough to confirm widths that are worse on independent images; the
    other folds of the same split share none."""
    jobs = {name: prune.Job(config, keep) for name, keep in widths.items()}
    per_fold = [holdout_scores(view, teacher, groups, x, jobs, seed, augmenter, f"unseen shots, split {fold + 1}",
                               progress, fold) for fold in range(1, disjoint_folds(len(x)))]
    return {name: float(np.mean([f[name] for f in per_fold])) for name in widths}


def holdout_scores(view: GraphView, teacher: TorchModel, groups: list[ChannelGroup], x: np.ndarray,
                   jobs: dict[str, prune.Job], seed: int, augmenter: Augmenter | None, label: str,
                   progress: Callable[[str], None] = lambda _: None, fold: int = 0) -> dict[str, float]:
    """Relative squared output error on held-out shots of each job, pruned together from the rest."""
    return holdout_results(view, teacher, groups, x, jobs, seed, augmenter, label, progress, fold)[0]


def holdout_results(view: GraphView, teacher: TorchModel, groups: list[ChannelGroup], x: np.ndarray,
                    jobs: dict[str, prune.Job], seed: int, augmenter: Augmenter | None, label: str,
                    progress: Callable[[str], None] = lambda _: None,
                    fold: int = 0) -> tuple[dict[str, float], list[prune.PruneResult]]:
    """`holdout_scores`, and the prunings they score."""
    holdout = HoldOut(view, teacher, groups, x, seed, augmenter, fold)
    results = holdout.prune(list(jobs.values()), lambda said: progress(f"{label}: {said}"))
    scores = dict(zip(jobs, holdout.errors(results)))
    for name, score in scores.items():
        progress(f"{label}: {name}: relative squared error {score:.4f} on {len(holdout.check)} held-out inputs")
    return scores, results
