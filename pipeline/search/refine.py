"""Widths for a latency target, refined by local search on held-out shots.

Predicting the whole network's error from per-group losses assumes the cuts do not interact,
and they do, enough for such an allocation to be worse than one ratio for all. So the
search here starts from widths already known to meet the goal (one ratio for all) and only
ever measures. Each round narrows every group by one step alone and scores the result: how
much error a millisecond saved there costs, in the context of all the other cuts. Then one
step of width goes to the group where narrowing hurt most per millisecond, paid for by
narrowing the groups where it hurt least until the predicted latency is back within budget
(the start's measured room under the goal may be spent). Before a move is scored it is timed
against what is allowed, since a per-layer prediction can be 10-20% off for one width change.
A paid trade is kept if the held-out error falls by GAIN; width bought with room alone, if it
falls at all. The result must beat the start by GAIN again on the shots the search never scored
on, so the start is never made worse by luck on one split, and every score is a real pruning.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from pipeline.search.allocate import Curves

TRADES = 3  # trades scored per round without a gain before the search stops, most promising first
MIN_PROBES = 4  # groups probed per round at least
GAIN = 0.02  # a trade must lower the held-out error by this share: smaller is within the shots' noise

Widths = dict[int, int]


def beats(score: float, other: float) -> bool:
    """Lower than `other` by GAIN: what a move, a confirmation or a rival's widths must show."""
    return score < (1 - GAIN) * other


@dataclass
class Refinement:
    start: Widths
    keep: Widths
    start_score: float  # relative squared output error on held-out shots
    score: float
    budget: float  # predicted cost the widths had to stay within
    evaluations: int
    moves: list[dict] = field(default_factory=list)
    misses: list[dict] = field(default_factory=list)  # trades the measurement rejected
    confirmation: dict | None = None  # start and result scored on the shots the search never scored on

    def to_json(self) -> dict:
        return {"start": {str(k): v for k, v in self.start.items()}, "keep": {str(k): v for k, v in self.keep.items()},
                "start_holdout_relative_squared_error": self.start_score,
                "holdout_relative_squared_error": self.score, "predicted_budget": self.budget,
                "evaluations": self.evaluations, "moves": self.moves, "misses": self.misses,
                "confirmation": self.confirmation}


def refine(curves: Curves, start: Widths, budget: float, cost: Callable[[Widths], float],
           score: Callable[[Widths], float], evaluations: int, measure: Callable[[Widths], float],
           confirm: Callable[[Widths, Widths], tuple[float, float]],
           progress: Callable[[str], None] = lambda _: None) -> Refinement:
    """Lower `score` from `start` in at most `evaluations` calls of it. A wider group is paid for
    until the predicted `cost` is within `budget`; `measure` then says how far over what is allowed
    the real cost is (1.0: exactly at it), and nothing over it is scored. The best of many
    candidates on a dozen held-out shots is partly the luckiest, so the result must also beat
    the start by GAIN on `confirm` (start, result -> their errors on other shots), or the start
    is returned."""
    sizes = curves.sizes
    keep = {gid: start.get(gid, size) for gid, size in sizes.items()}
    first = score(keep)
    result = Refinement(dict(keep), keep, first, first, budget, 1)

    def evaluate(trial: Widths) -> float:
        if result.evaluations >= evaluations:
            raise _Spent
        result.evaluations += 1
        return score(trial)

    try:
        while _round(result, sizes, curves, cost, evaluate, measure, max(MIN_PROBES, evaluations // 3), progress):
            pass
    except _Spent:
        pass
    progress(f"refine: held-out error {result.start_score:.4f} -> {result.score:.4f} "
             f"in {result.evaluations} evaluations")
    if result.keep != result.start:
        again = dict(zip(("start", "refined"), confirm(result.start, result.keep)))
        result.confirmation = {**again, "kept": beats(again["refined"], again["start"])}
        progress(f"refine: on the shots the search never scored on {again['start']:.4f} -> {again['refined']:.4f} "
                 f"({'kept' if result.confirmation['kept'] else 'not confirmed: one ratio for all kept'})")
        if not result.confirmation["kept"]:
            result.keep, result.score = dict(result.start), result.start_score
    return result


class _Spent(Exception):
    """The evaluations allowed are used up."""


def _round(result: Refinement, sizes: Widths, curves: Curves, cost: Callable[[Widths], float],
           evaluate: Callable[[Widths], float], measure: Callable[[Widths], float], probes: int,
           progress: Callable[[str], None]) -> bool:
    """Probe groups one step narrower, then try trades; True when a move was kept. Only the
    groups whose step saves the most are probed (a third of the evaluations allowed per round):
    a deep network has more groups than a round can score, and the cheap ones trade nothing."""
    keep, here = result.keep, cost(result.keep)
    narrower = {gid: _step(keep, gid, -curves.step[gid], curves, sizes) for gid in sizes}
    saving = {gid: here - cost(trial) for gid, trial in narrower.items() if trial is not None}
    probed = sorted((g for g in saving if saving[g] > 0), key=saving.get, reverse=True)[:probes]
    harm = {}  # group -> error added per unit of cost saved by narrowing it one step
    for gid in probed:
        trial, saved = narrower[gid], saving[gid]
        got = evaluate(trial)
        if beats(got, result.score):  # narrower and closer to the teacher: take it as it is
            _accept(result, trial, got, f"group {gid} narrowed to {trial[gid]}", progress)
            return True
        harm[gid] = (got - result.score) / saved
    scored = 0
    for receiver in sorted(harm, key=harm.get, reverse=True):
        trial = _measured_trade(result, keep, receiver, sorted(harm, key=harm.get), cost, measure, curves, sizes,
                                progress)
        if trial is None:
            continue
        got = evaluate(trial)
        paid = [f"{g} to {trial[g]}" for g in sizes if trial[g] < keep[g]]
        # width bought with room under the goal only adds capacity: any gain is taken
        if got < (1 - GAIN if paid else 1.0) * result.score:
            _accept(result, trial, got, f"group {receiver} widened to {trial[receiver]}"
                    + (f", paid by {', '.join(paid)}" if paid else ""), progress)
            return True
        scored += 1
        if scored == TRADES:
            break
    return False  # no move helped: a local optimum


def _step(keep: Widths, gid: int, by: int, curves: Curves, sizes: Widths) -> Widths | None:
    width = keep[gid] + by
    if not curves.floor[gid] <= width <= sizes[gid]:
        return None
    return {**keep, gid: width}


def _measured_trade(result: Refinement, keep: Widths, receiver: int, donors: list[int],
                    cost: Callable[[Widths], float], measure: Callable[[Widths], float], curves: Curves,
                    sizes: Widths, progress: Callable[[str], None]) -> Widths | None:
    """A trade that measures within what is allowed. After a miss the prediction was optimistic
    about these widths (a high-resolution layer, say): once more, asking it for that much less."""
    budget = result.budget
    for _ in range(2):
        trial = _trade(keep, receiver, donors, budget, cost, curves, sizes)
        if trial is None:
            return None
        over = measure(trial)
        if over <= 1.0:
            return trial
        result.misses.append({"keep": {str(k): v for k, v in trial.items()}, "measured_over_allowed": over})
        progress(f"refine: group {receiver} wider measured {over:.2f}x the time allowed")
        budget = cost(trial) / over
    return None


def _trade(keep: Widths, receiver: int, donors: list[int], budget: float, cost: Callable[[Widths], float],
           curves: Curves, sizes: Widths) -> Widths | None:
    """One step wider at `receiver`; donors, cheapest first, give a step each (round after round)
    until the predicted cost is within budget."""
    trial = _step(keep, receiver, curves.step[receiver], curves, sizes)
    donors = [d for d in donors if d != receiver]
    while trial is not None and cost(trial) > budget:
        before = dict(trial)
        for donor in donors:
            narrower = _step(trial, donor, -curves.step[donor], curves, sizes)
            if narrower is not None:
                trial = narrower
                if cost(trial) <= budget:
                    break
        if trial == before:
            return None  # every donor at its floor
    return trial


def _accept(result: Refinement, trial: Widths, got: float, move: str, progress: Callable[[str], None]) -> None:
    result.moves.append({"move": move, "holdout_relative_squared_error": got})
    progress(f"refine: {move}: held-out error {result.score:.4f} -> {got:.4f}")
    result.keep, result.score = trial, got
