"""The widths compress prunes to: one ratio for all, a FLOPs share, a measured latency, or an
earlier report's widths. `widths` is the one entry point; the mode is chosen once (modes.py).

    modes.py        Ratio, FlopsShare, LatencyTarget, WidthsFrom: what is asked for
    records.py      attempts, candidates, picks and the outcome, as the report lays them out
    problem.py      what candidates are pruned from and scored on; pruning and export
    replay.py       --widths: an earlier report's widths, read and fitted to this model
    allocate.py     groups, floors, FLOPs cost, loss curves, allocation across groups
    latency.py      the per-layer latency table and its cache
    steering.py     prune-and-time rounds toward a latency goal
    refine.py       local search of widths on held-out shots
    flops_share.py  --target-flops
    target.py       --target-speedup / --target-latency-ms
    run.py          widths(): the entry point
"""
from pipeline.search.modes import FlopsShare, LatencyTarget, Mode, Ratio, WidthsFrom, one
from pipeline.search.records import Attempt, Candidate, SearchOutcome
from pipeline.search.replay import Replay
from pipeline.search.run import widths

__all__ = ["Attempt", "Candidate", "FlopsShare", "LatencyTarget", "Mode", "Ratio", "Replay", "SearchOutcome",
           "WidthsFrom", "one", "widths"]
