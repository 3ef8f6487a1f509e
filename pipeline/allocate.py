"""Non-uniform widths for a FLOPs target: which groups give up channels, and how many.

A uniform ratio removes as much from a layer that everything depends on as from one that
barely matters. Here every eligible group first gets a removal curve (the solver's own
relative loss after removing 1, 2, ... channels, on teacher statistics), then channels are
taken, `step` at a time, from the group whose next removal costs the least loss per FLOP
saved, until the model's linear-layer FLOPs reach the target share. The real, sequential
pruning then runs with those counts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from pipeline import prune
from pipeline.analyze import ChannelGroup
from pipeline.augment import Augmenter
from pipeline.convert import TorchModel
from pipeline.errors import NothingToPruneError
from pipeline.flops import layer_costs
from pipeline.graph import GraphView
from pipeline.solve import removal_curve

MIN_SHARE = 0.1  # no group is cut below this share of its channels


@dataclass
class Allocation:
    keep: dict[int, int]
    target_share: float
    share: float  # FLOPs share the allocation reaches, by the cost model

    def to_json(self) -> dict:
        return {"target_flops_share": self.target_share, "flops_share": self.share,
                "keep": {str(k): v for k, v in self.keep.items()}}


class FlopsModel:
    """Linear-layer FLOPs as a function of each group's kept channels (bilinear per layer)."""

    def __init__(self, view: GraphView, groups: list[ChannelGroup]):
        self.layers: dict[str, dict] = {c.node: {"flops": c.flops, "in": [], "out": None}
                                        for c in layer_costs(view)}
        self.size = {g.id: g.size for g in groups}
        dims = lambda node: view.initializers[view.nodes[node].input[1]].dims  # the layer's weight shape
        for g in groups:
            for c in g.consumers:
                self.layers[c.node]["in"].append((g.id, dims(c.node)[c.in_axis] // c.block))
            for s in g.slices:
                if s.index == 1 and s.node in self.layers and s.node not in g.group_attrs:
                    self.layers[s.node]["out"] = (g.id, dims(s.node)[s.axis % len(dims(s.node))])
            for name in g.group_attrs:  # depthwise: cost follows its channels
                self.layers[name]["out"] = (g.id, dims(name)[0])

    def flops(self, keep: dict[int, int]) -> float:
        total = 0.0
        for layer in self.layers.values():
            frac = 1.0
            if layer["in"]:
                width = layer["in"][0][1]
                frac *= (width - sum(self.size[g] - keep.get(g, self.size[g]) for g, _ in layer["in"])) / width
            if layer["out"]:
                g, width = layer["out"]
                frac *= (width - (self.size[g] - keep.get(g, self.size[g]))) / width
            total += layer["flops"] * frac
        return total


def allocate(view: GraphView, teacher: TorchModel, groups: list[ChannelGroup], x: np.ndarray,
             config: prune.PruneConfig, target_share: float, augmenter: Augmenter | None = None,
             progress: Callable[[str], None] = lambda _: None) -> Allocation:
    model = FlopsModel(view, groups)
    full = {g.id: g.size for g in groups}
    total = model.flops(full)
    eligible = [g for g in groups if g.prunable and not prune.skip_reason(teacher, g, config)]
    if not eligible or total <= 0:
        raise NothingToPruneError("no prunable group to allocate a FLOPs target over")
    step = max(1, config.round_to)
    curves, floor = {}, {}
    for g in eligible:
        floor[g.id] = min(g.size, max(step, math.ceil(MIN_SHARE * g.size)))
        problems = prune.group_problems(view, teacher, teacher, g, x, config, augmenter)
        curves[g.id] = (removal_curve(problems, floor[g.id], config.method, config.mu, config.damp)
                        if config.method != "l1" else np.linspace(0, 1, g.size - floor[g.id] + 1))
        progress(f"allocation: removal curve of group {g.id} ({g.size} channels)")
    keep = dict(full)
    current = total
    while current > target_share * total:
        best, best_score, best_flops = None, math.inf, current
        for g in eligible:
            n = min(step, keep[g.id] - floor[g.id])
            if n <= 0:
                continue
            trial = model.flops({**keep, g.id: keep[g.id] - n})
            saved = current - trial
            removed = g.size - keep[g.id]
            score = (curves[g.id][removed + n] - curves[g.id][removed]) / saved if saved > 0 else math.inf
            if score < best_score:
                best, best_score, best_flops = g, score, trial
        if best is None:
            raise NothingToPruneError(f"--target-flops {target_share}: the prunable groups can bring FLOPs "
                                      f"down to {current / total:.1%} of the original at most")
        keep[best.id] -= min(step, keep[best.id] - floor[best.id])
        current = best_flops
    return Allocation({g.id: keep[g.id] for g in eligible if keep[g.id] < g.size}, target_share, current / total)
