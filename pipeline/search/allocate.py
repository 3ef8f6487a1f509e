"""Non-uniform widths for a FLOPs target: which groups give up channels, and how many.

A uniform ratio removes as much from a layer that everything depends on as from one that
barely matters. Here every eligible group first gets a removal curve (the solver's own
relative loss after removing 1, 2, ... channels, on teacher statistics). A layer's own loss
says little about the network's output: a layer whose error the next ones amplify costs more
than the same loss elsewhere. So each curve is scaled by what it does end to end: the group is
pruned alone to the uniform ratio, refit as usual, and the relative squared error of the model's
outputs is divided by the curve's loss at that width. Then channels are taken, `step` at a time,
from the group whose next removal costs the least loss per unit of cost saved, until the model's
cost reaches the target share. The cost is the linear layers' FLOPs (FlopsModel, exact) or a
latency prediction (search/latency.py). The real, sequential pruning then runs with those counts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from pipeline import prune
from pipeline.analyze import ChannelGroup
from pipeline.augment import Augmenter
from pipeline.convert import TorchModel, relative_squared_error, run_torch, spread
from pipeline.errors import NothingToPruneError
from pipeline.flops import layer_costs
from pipeline.graph import GraphView
from pipeline.solve import removal_curve

MIN_SHARE = 0.1  # no group is cut below this share of its channels
WEIGHT_INPUTS = 32  # inputs each group's output weight is measured on
JOBS_PER_WALK = 4  # single-group prunings walked together: each student holds its own activations


class CostModel(Protocol):
    def cost(self, keep: dict[int, int]) -> float: ...


@dataclass
class Allocation:
    keep: dict[int, int]
    target_share: float
    share: float  # share of the cost (FLOPs or predicted latency) the allocation reaches, by the model
    cost: str = "flops"

    def to_json(self) -> dict:
        return {"cost": self.cost, "target_share": self.target_share, "share": self.share,
                "keep": {str(k): v for k, v in self.keep.items()}}


class FlopsModel:
    """Linear-layer FLOPs as a function of each group's kept channels (bilinear per layer)."""

    def __init__(self, view: GraphView, groups: list[ChannelGroup]):
        self.layers: dict[str, dict] = {c.node: {"flops": c.flops - c.fixed, "fixed": c.fixed, "in": [], "out": []}
                                        for c in layer_costs(view)}
        self.size = {g.id: g.size for g in groups}
        dims = lambda node: view.initializers[view.nodes[node].input[1]].dims  # the layer's weight shape
        for g in groups:
            for c in g.consumers:
                self.layers[c.node]["in"] += [(g.id, dims(c.node)[c.in_axis] // c.block)] * len(c.offsets)
            for s in g.slices:
                if s.index == 1 and s.node in self.layers and s.node not in g.group_attrs:  # (several after a Split)
                    self.layers[s.node]["out"].append((g.id, dims(s.node)[s.axis % len(dims(s.node))] // s.block))
            for name in g.group_attrs:  # depthwise or grouped: cost follows its channels
                self.layers[name]["out"] = [(g.id, dims(name)[0] // g.unit)]
            for name in g.follows:  # attention's products and Softmax: one share per head kept
                self.layers[name]["in"].append((g.id, g.size))

    def fractions(self, keep: dict[int, int]) -> dict[str, tuple[float, float]]:
        """Per layer: the share of its input and of its output channels left."""
        out = {}
        for name, layer in self.layers.items():
            fin = fout = 1.0
            if layer["in"]:
                width = layer["in"][0][1]
                fin = (width - sum(self.size[g] - keep.get(g, self.size[g]) for g, _ in layer["in"])) / width
            if layer["out"]:
                width = layer["out"][0][1]
                fout = (width - sum(self.size[g] - keep.get(g, self.size[g]) for g, _ in layer["out"])) / width
            out[name] = (fin, fout)
        return out

    def cost(self, keep: dict[int, int]) -> float:
        return sum(self.layers[n]["flops"] * fin * fout + self.layers[n]["fixed"]
                   for n, (fin, fout) in self.fractions(keep).items())


@dataclass
class Curves:
    """What each eligible group's removals cost, from the solver on teacher statistics."""

    groups: list[ChannelGroup]
    floor: dict[int, int]  # fewest channels a group may keep
    loss: dict[int, np.ndarray]  # output loss after removing 0, 1, 2, ... channels (layer loss x weight); may be empty
    step: dict[int, int]  # channels removed at a time (the group's alignment)

    @property
    def sizes(self) -> dict[int, int]:
        """Every eligible group at full width: where allocation and search start from."""
        return {g.id: g.size for g in self.groups}


def eligible_groups(teacher: TorchModel, groups: list[ChannelGroup], config: prune.PruneConfig) -> list[ChannelGroup]:
    """The groups a pruning under `config` may cut: prunable, and not skipped (prune.skip_reason)."""
    return [g for g in groups if g.prunable and not prune.skip_reason(teacher, g, config)]


def curves(view: GraphView, teacher: TorchModel, groups: list[ChannelGroup], x: np.ndarray,
           config: prune.PruneConfig, augmenter: Augmenter | None = None,
           progress: Callable[[str], None] = lambda _: None, losses: bool = True) -> Curves:
    """Without `losses`, only the groups, floors and steps: what one ratio for all and the
    refinement need (the loss curves take a pruning per group)."""
    eligible = eligible_groups(teacher, groups, config)
    if not eligible:
        raise NothingToPruneError("no prunable group to allocate a target over")
    floor, loss, step = {}, {}, {}
    grams = prune.TeacherGrams()
    for g in eligible:
        step[g.id] = config.step(g.size, g.unit)
        floor[g.id] = min(g.size, max(step[g.id], math.ceil(MIN_SHARE * g.size)))
        if losses and config.method == "l1":
            loss[g.id] = np.linspace(0, 1, g.size - floor[g.id] + 1)

    def curve(g: ChannelGroup, problems: list) -> None:
        loss[g.id] = removal_curve(problems, floor[g.id], config.method, config.mu, config.damp)
        progress(f"allocation: removal curve of group {g.id} ({g.channels} channels)")

    if losses and config.method != "l1":
        prune.teacher_problems(view, teacher, eligible, x, config, augmenter, grams, curve)
        weights = _output_weights(view, teacher, groups, eligible, floor, x, config, progress)
        loss = {gid: curve * weights[gid] for gid, curve in loss.items()}
    return Curves(eligible, floor, loss, step)


def _output_weights(view: GraphView, teacher: TorchModel, groups: list[ChannelGroup], eligible: list[ChannelGroup],
                    floor: dict[int, int], x: np.ndarray, config: prune.PruneConfig,
                    progress: Callable[[str], None]) -> dict[int, float]:
    """Per group: output loss over layer loss, with the group alone pruned to the uniform ratio.
    Both come from the same few inputs (WEIGHT_INPUTS, no variants): the ratio of two losses is
    steady on few, and each group's pruning costs a forward pass from its layers to the output.
    The prunings are walked JOBS_PER_WALK at a time, the teacher's values shared among them."""
    xs = spread(x, WEIGHT_INPUTS)
    reference = run_torch(teacher, xs)
    alone = [g for g in eligible if g.size > 1]
    counts = {g.id: min(g.size - 1, max(floor[g.id], config.kept_count(g.size, g.unit))) for g in alone}
    grams, found = prune.TeacherGrams(), {}
    for i in range(0, len(alone), JOBS_PER_WALK):
        chunk = alone[i:i + JOBS_PER_WALK]
        jobs = [prune.Job(config, {g.id: counts[g.id]}) for g in chunk]
        for g, result in zip(chunk, prune.prune_jobs(view, teacher, groups, xs, jobs, cache=grams)):
            layer_loss = result.outcomes[0].loss if result.outcomes else 0.0
            if layer_loss <= 0:
                continue
            output_loss = np.mean([relative_squared_error(r, o) for r, o in zip(reference, run_torch(result.student, xs))])
            found[g.id] = float(output_loss) / layer_loss
            progress(f"allocation: group {g.id} alone at {counts[g.id] * g.unit}/{g.channels}: output loss "
                     f"{output_loss:.4f}, {found[g.id]:.2f}x its layer loss")
    typical = float(np.median(list(found.values()))) if found else 1.0
    return {g.id: found.get(g.id, typical) for g in eligible}


def read_widths_floor(view: GraphView, c: Curves) -> dict[int, int]:
    """Per group: where every layer writing it writes more channels than it reads numbers per
    output (input channels x kernel: 9 for a 3x3 stem on a grey image, 27 on colour), the fewest
    units, on the group's step, that still hold as many channels as that; elsewhere, as for
    nearly every group, its usual floor. Narrower, such a layer's outputs no longer span its
    input patches, and no later layer can get the lost directions back. Held-out shots do not
    show it (a few shots span few directions), so a search scored on them narrows such a stem
    readily and loses test accuracy: this floor is the only guard."""
    out = {}
    for g in c.groups:
        reads = [_reads(view, view.nodes[name]) for name in g.producers if name in view.nodes]
        need = max(reads) if reads and max(reads) < g.channels else 0  # every writer widens what it reads
        units = -(-need // g.unit)
        out[g.id] = max(c.floor[g.id], min(g.size, -(-units // c.step[g.id]) * c.step[g.id]))
    return out


def _reads(view: GraphView, node) -> int:
    """Numbers a Conv, Gemm or MatMul reads per output value (a large number where unknown or
    grouped, so that no floor follows)."""
    w = view.initializers.get(node.input[1]) if len(node.input) > 1 else None
    if w is None or (node.op_type == "Conv" and view.attr(node, "group", 1) != 1):
        return 1 << 30
    if node.op_type == "Conv":
        return int(np.prod(w.dims[1:]))
    if node.op_type == "Gemm":
        return int(w.dims[1] if view.attr(node, "transB", 0) else w.dims[0])
    return int(w.dims[-2]) if node.op_type == "MatMul" and len(w.dims) >= 2 else 1 << 30


def uniform(c: Curves, ratio: float) -> dict[int, int]:
    """Every eligible group at `ratio` of its channels, on its step, not below its floor."""
    return {g.id: min(g.size, max(c.floor[g.id], round(ratio * g.size / c.step[g.id]) * c.step[g.id]))
            for g in c.groups}


def widest_uniform(c: Curves, cost: Callable[[dict[int, int]], float], budget: float, high: float = 1.0,
                   low: float = 0.0, skip: dict[int, int] | None = None) -> tuple[float, dict[int, int]] | None:
    """The widest one ratio for all from `high` down to `low` (exclusive), in steps of 0.01, whose
    widths (other than `skip`) `cost` at most `budget`, with those widths."""
    for ratio in np.arange(high, low, -0.01):
        keep = uniform(c, float(ratio))
        if keep != skip and cost(keep) <= budget:
            return float(ratio), keep
    return None


def allocate(c: Curves, model: CostModel, target_share: float, cost: str = "flops",
             strict: bool = True) -> Allocation:
    """Take channels, `step` at a time, where the next removal costs the least loss per unit of
    cost saved, until the model's cost is `target_share` of the original (or, not `strict`,
    until every group is at its floor)."""
    keep = c.sizes
    total = current = model.cost(keep)
    if total <= 0:
        raise NothingToPruneError(f"the {cost} model gives the network no cost to reduce")
    while current > target_share * total:
        best, best_score, best_cost = None, math.inf, current
        for g in c.groups:
            n = min(c.step[g.id], keep[g.id] - c.floor[g.id])
            if n <= 0:
                continue
            trial = model.cost({**keep, g.id: keep[g.id] - n})
            saved = current - trial
            removed = g.size - keep[g.id]
            score = (c.loss[g.id][removed + n] - c.loss[g.id][removed]) / saved if saved > 0 else math.inf
            if score < best_score:
                best, best_score, best_cost = g, score, trial
        if best is None and not strict:
            break
        if best is None:
            raise NothingToPruneError(f"the prunable groups can bring {cost} down to {current / total:.1%} of "
                                      f"the original at most, not {target_share:.1%}")
        keep[best.id] -= min(c.step[best.id], keep[best.id] - c.floor[best.id])
        current = best_cost
    return Allocation({g.id: keep[g.id] for g in c.groups if keep[g.id] < g.size}, target_share, current / total, cost)
