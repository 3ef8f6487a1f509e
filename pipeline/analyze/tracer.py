"""The trace that grows each channel group over the ONNX graph.

A group is one set of channels written by linear layers (its *producers*: one in a plain chain,
several where a residual Add or a gating Mul joins their outputs), carried through channel-wise
ops and read by the linear layers that consume it. The trace follows the channels forward to
every reader and backward to every writer, crossing each node by its op type's rule (rules.py).
Whatever the trace does not understand freezes the group, with the reason kept, so that an
unknown graph yields fewer pruned channels, never a wrong model.
"""
from __future__ import annotations

from dataclasses import replace
from typing import NoReturn

from onnx import NodeProto

from pipeline.analyze.attention import find_blocks, head_group
from pipeline.analyze.checks import producer_start
from pipeline.analyze.model import ChannelGroup, Divide, Frozen, ParamSlice, Place, Repeat, ShapeEdit
from pipeline.analyze.rules import rule_for
from pipeline.graph import GraphView


def find_groups(view: GraphView) -> list[ChannelGroup]:
    """Every channel group in order of its first producer, prunable or frozen with a reason.

    A producer's channels may be claimed a part at a time: a group traced from elsewhere can
    reach one Slice of its output backward (DPN's residual part); the rest of its channels are
    traced when the loop comes to it."""
    groups: list[ChannelGroup] = []
    claimed: dict[str, list[tuple[int, int]]] = {}  # producer -> (first channel, channels) held by groups
    blocks, frozen = find_blocks(view)
    heads = {min(block.projections, key=view.order.get): (att, block) for att, block in blocks}
    for att, block in blocks:
        for name in block.projections:
            claimed[name] = [(0, producer_start(view, view.nodes[name])[0])]
    for node in view.graph.node:
        start = producer_start(view, node)
        if start is None:
            continue
        if node.name in heads:
            groups.append(head_group(view, *heads[node.name], len(groups)))
        for window in _unclaimed(start[0], claimed.get(node.name, [])):
            try:
                traced = [_trace(view, node, len(groups), window)]
            except Divide as split:  # a Split or channel Slices cut these channels into parts: a group each
                parts = [p for p in split.parts if window[0] <= p[0] and p[0] + p[1] <= window[0] + window[1]]
                if sum(p[1] for p in parts) != window[1]:  # parts straddling what others claimed
                    parts = [window]
                traced = [_trace(view, node, len(groups) + k, part, divisible=False) for k, part in enumerate(parts)]
            for group, windows in traced:
                for producer, held in windows.items():
                    claimed.setdefault(producer, []).append(held)
                if group.reason and node.name in frozen:  # say what the attention around it lacks
                    group.reason = frozen[node.name]
                groups.append(group)
    return groups


def _unclaimed(size: int, held: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The runs of channels 0 .. size - 1 outside every (first, count) in `held`."""
    free, at = [], 0
    for first, count in sorted(held):
        if first > at:
            free.append((at, first - at))
        at = max(at, first + count)
    return free + [(at, size - at)] * (at < size)


def _trace(view: GraphView, node: NodeProto, gid: int, window: tuple[int, int],
           divisible: bool = True) -> tuple[ChannelGroup, dict[str, tuple[int, int]]]:
    """The group of channels window[0] .. window[0] + window[1] of `node`'s output, and the
    channels of each producer it holds."""
    group = ChannelGroup(id=gid, producers=[], size=window[1])
    tracer = Tracer(view, group, window, divisible)
    try:
        try:
            tracer.run(node)
        except Repeat as again:
            group = ChannelGroup(id=gid, producers=[], size=window[1])
            tracer = Tracer(view, group, window, divisible, again.repeats)
            tracer.run(node)
    except Frozen as why:
        group.reason = str(why)
    except (IndexError, KeyError, ValueError, TypeError) as exc:  # a malformed node the checker let by
        group.reason = f"malformed graph near '{node.name}' ({type(exc).__name__}: {exc})"
    if not group.producers:
        group.producers.append(node.name)
    return group, {node.name: window, **tracer.windows}


class Tracer:
    """Grows one group from a producer: forward to every reader of its channels, backward to
    every other layer that writes them (through residual Adds and gating Muls)."""

    def __init__(self, view: GraphView, group: ChannelGroup, window: tuple[int, int], divisible: bool = True,
                 repeats: dict[str, list[str]] | None = None):
        self.view, self.group, self.window = view, group, window  # window: the first producer's channels traced
        self.divisible = divisible  # a Split may still cut the group into parts (not when it is a part)
        self.windows: dict[str, tuple[int, int]] = {}  # producer -> (first channel, channels) in the group
        self.first_width = 0  # channels the first producer writes
        self.repeats = repeats or {}  # Concats known to take the group more than once, and from which inputs
        self.layout: dict[str, Place] = {}
        self.pending: list[str] = []
        self.seen: set[tuple[str, str]] = set()  # (node, role) already handled
        self.concats: list[NodeProto] = []
        self.units: dict[int, str] = {}  # channels removed together -> the node that asks it ("Conv node 'x'")
        self.per_unit: list[tuple[int, ParamSlice | ShapeEdit]] = []  # (u, entry with one value per u channels)

    def run(self, producer: NodeProto) -> None:
        """Traces from `producer` until no tensor is left; raises Frozen, Repeat or Divide."""
        self.produce(producer, self.window[0])
        while self.pending:
            tensor = self.pending.pop()
            self.group.tensors.append(tensor)
            if tensor in self.view.outputs:
                raise Frozen(f"tensor '{tensor}' is a graph output")
            source = self.view.producer.get(tensor)
            if source is None:
                raise Frozen(f"tensor '{tensor}' comes straight from a graph input")
            self.visit(source, tensor, forward=False)
            for node in self.view.consumers.get(tensor, []):
                self.visit(node, tensor, forward=True)
        repeats = {n.name: [i for i in n.input if i in self.layout] for n in self.concats
                   if sum(i in self.layout for i in n.input) > 1}
        if repeats and not self.repeats:
            raise Repeat(repeats)
        if repeats != self.repeats:
            raise Frozen(f"Concat node '{next(iter(repeats))}' joins these channels with themselves")
        if len(self.group.producers) > 1:
            self.group.coupling = f"{len(self.group.producers)} producers ({', '.join(self.group.producers[:4])}" + \
                ("..." if len(self.group.producers) > 4 else "") + ") joined by residual or gating ops"
        if not self.group.consumers:
            raise Frozen("no linear layer consumes these channels")
        if self.units:
            self._in_units()
        for u, entry in self.per_unit:  # one value per u channels: group.unit // u values per unit removed
            block = self.group.unit // u
            if isinstance(entry, ShapeEdit):
                self.group.shape_edits.append(replace(entry, block=block))
            else:
                self.group.slices.append(replace(entry, offset=entry.offset // self.group.unit, block=block))

    def _in_units(self) -> None:
        """A grouped Conv reads and writes its channels a group at a time, and a GroupNorm
        normalises them a group at a time: the group is pruned in whole groups of it, so every
        count and offset is restated in those units."""
        group = self.group
        if len(self.units) > 1:
            raise Frozen(f"{' and '.join(self.units.values())} work on groups of different widths "
                         f"({', '.join(map(str, self.units))} channels) of these channels")
        (unit, where), = self.units.items()
        offsets = [s.offset for s in group.slices] + [o for c in group.consumers for o in c.offsets] + \
            [s.offset for _, s in self.per_unit if isinstance(s, ParamSlice)]
        if group.size % unit or any(o % unit for o in offsets):
            raise Frozen(f"the groups of {unit} channels of {where} do not line up with these channels")
        if group.size == unit:  # GroupNorm(1, C), as PoolFormer normalises: nothing can go alone
            raise Frozen(f"{where} takes all {unit} of these channels as one group")
        group.size //= unit
        group.unit = unit
        group.slices = [replace(s, offset=s.offset // unit, block=s.block * unit) for s in group.slices]
        group.consumers = [replace(c, offset=c.offset // unit, extra=tuple(e // unit for e in c.extra),
                                   block=c.block * unit) for c in group.consumers]
        group.shape_edits = [replace(e, block=e.block * unit) for e in group.shape_edits]

    def add(self, tensor: str, place: Place, where: str) -> None:
        """Queues `tensor` as holding the group at `place`; freezes one already seen at another place."""
        if tensor in self.layout:
            if self.layout[tensor] != place:
                raise Frozen(f"node '{where}' mixes layouts of the same channels")
            return
        self.layout[tensor] = place
        self.pending.append(tensor)

    def produce(self, node: NodeProto, offset: int = 0) -> None:
        """A layer writing the group's channels, from channel `offset` of its output (a part of
        a Split's input) or all of them."""
        start = producer_start(self.view, node)
        if start is None:
            raise Frozen(f"{node.op_type} node '{node.name}' writes these channels but cannot be sliced")
        size, slices = start
        place = self.layout.get(node.output[0])  # known when reached backward from a reader
        if place is not None:
            offset, width = place.offset, place.width
        else:  # the first producer: the group is all its channels, or a part of them
            width = self.first_width = size
        if size != width or offset + self.group.size > size:
            raise Frozen(f"{node.op_type} node '{node.name}' writes {size} channels, not {width}")
        self.seen.add((node.name, "out"))
        self.group.producers.append(node.name)
        self.windows[node.name] = (offset, self.group.size)
        self.group.slices.extend(replace(s, offset=offset) for s in slices)
        last = node.op_type == "MatMul" and len(self.view.shape(node.input[0]) or ()) > 2
        self.add(node.output[0], Place(1, offset, size, last), node.name)

    def visit(self, node: NodeProto, tensor: str, forward: bool) -> None:
        """Cross `node`, reached from its input (forward) or its output `tensor`, by its rule:
        the guards the rule does not lift freeze the group first."""
        if node.domain not in ("", "ai.onnx"):
            raise Frozen(f"{node.domain}.{node.op_type} node '{node.name}' is not understood by the channel analysis")
        rule = rule_for(self.view, node)
        place = self.layout[tensor]
        if forward and place.also and not rule.repeats:
            raise Frozen(f"{node.op_type} node '{node.name}' reads a Concat that holds these channels more than once")
        if rule.once is not None:
            key = (node.name, ("in" if forward else "out") if rule.once == "direction" else "")
            if key in self.seen:
                return
            self.seen.add(key)
        if place.last and not rule.channels_last:
            raise Frozen(f"{node.op_type} node '{node.name}' on channels-last data is not understood by the analysis")
        (rule.forward if forward else rule.backward)(self, node, tensor)

    def divide(self, node: NodeProto, span: tuple[int, int], width: int, parts: list[tuple[int, int]]) -> NoReturn:
        """The group spans several parts of a Split or channel Slices: if it is the whole tensor
        (and not itself a part), each part becomes a group; otherwise it stays whole."""
        if self.divisible and span == (self.window[0], sum(self.window)) and width == self.first_width:
            raise Divide(parts)
        raise Frozen(f"{node.op_type} node '{node.name}' cuts these channels across its parts")

    def coupled(self, why: str) -> None:
        """Records the first reason the group is not a plain chain."""
        if not self.group.coupling:
            self.group.coupling = why
