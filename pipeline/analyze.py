"""Channel groups traced on the ONNX graph: which channels can go, and where they live.

A group is one set of channels written by linear layers (its *producers*: one in a plain chain,
several where a residual Add or a gating Mul joins their outputs), carried through channel-wise
ops (normalisation, activations, pooling, depthwise convolution) and read by the linear layers
that consume it. Removing channel j means slicing index j out of every producer-side parameter
and every consumer's input weights.
Whatever the trace does not understand freezes the group, with the reason kept, so that an
unknown graph yields fewer pruned channels, never a wrong model.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import NoReturn

from onnx import NodeProto

from pipeline.graph import GraphView

# Ops that act on each channel alone, with a single data input (others are attributes or scalars).
UNARY = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu",
         "Softplus", "Softsign", "Gelu", "Erf", "Identity", "Dropout", "Neg", "Abs", "Exp", "Log",
         "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Mish", "ThresholdedRelu", "Cast",
         "Clip", "Swish"}
POOL = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}
BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "PRelu"}
PER_CHANNEL_PARAMS = {"BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2)}


@dataclass(frozen=True)
class ParamSlice:
    """Input `index` of `node` holds one entry (or `block` entries) per channel along `axis`,
    the group's channels starting at entry `offset` (after a Concat, other channels come first)."""

    node: str
    index: int
    axis: int
    block: int = 1
    offset: int = 0


@dataclass(frozen=True)
class Consumer:
    """A linear layer reading the group: Conv (kind 'conv'), a ConvTranspose whose patches do not
    overlap (kind 'deconv') or Gemm/MatMul (kind 'gemm').

    `in_axis` is the axis of its ONNX weight that holds input channels, `block` how many
    consecutive input features one channel spans (H*W after a Flatten, else 1).
    """

    node: str
    kind: str
    in_axis: int
    block: int = 1
    offset: int = 0  # first input channel of the group (non-zero after a Concat)
    extra: tuple[int, ...] = ()  # further offsets where a Concat repeats the group (C2f, SPPF)

    @property
    def offsets(self) -> tuple[int, ...]:
        return (self.offset, *self.extra)


@dataclass(frozen=True)
class ShapeEdit:
    """Entry `position` of the constant shape at input `index` of `node` counts the group's
    channels `block` times each: it shrinks by `block` per channel dropped."""

    node: str
    index: int
    position: int
    block: int


@dataclass
class ChannelGroup:
    """Channels shared by every tensor in `tensors`: sliced in each producer, refit in each consumer.

    `coupling` says why the group is not a plain chain (several producers joined by a residual
    Add or a gating Mul); such groups are pruned only with scope 'all', as the paper left the
    channels tied by ResNet shortcuts alone.
    """

    id: int
    producers: list[str]
    size: int
    tensors: list[str] = field(default_factory=list)
    slices: list[ParamSlice] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    shape_edits: list[ShapeEdit] = field(default_factory=list)
    group_attrs: list[str] = field(default_factory=list)  # depthwise or grouped Convs: `group` follows the width
    unit: int = 1  # channels removed together: a grouped Conv's group width (ResNeXt, RegNet), else 1
    coupling: str = ""
    reason: str = ""  # why it is frozen; empty when prunable

    @property
    def prunable(self) -> bool:
        return not self.reason

    @property
    def channels(self) -> int:
        """Channels in the group (`size` counts units of `unit` channels)."""
        return self.size * self.unit

    def to_json(self) -> dict:
        return {"id": self.id, "producers": self.producers, "channels": self.channels, "unit": self.unit,
                "consumers": [c.node for c in self.consumers], "prunable": self.prunable,
                "coupling": self.coupling or None, "reason": self.reason or None, "tensors": len(self.tensors)}


class _Frozen(Exception):
    """Raised inside a trace to freeze the group with a reason."""


class _Repeat(Exception):
    """Raised when a Concat takes the group's channels more than once: trace again, knowing which
    of its inputs carry them (Concat name -> those inputs)."""

    def __init__(self, repeats: dict[str, list[str]]):
        super().__init__(repeats)
        self.repeats = repeats


class _Divide(Exception):
    """Raised when a producer's channels reach a Split: trace one group per part instead."""

    def __init__(self, parts: list[tuple[int, int]]):
        super().__init__(parts)
        self.parts = parts  # (first channel, channels) of each part


def find_groups(view: GraphView) -> list[ChannelGroup]:
    """Every channel group in order of its first producer, prunable or frozen with a reason.

    A producer's channels may be claimed a part at a time: a group traced from elsewhere can
    reach one Slice of its output backward (DPN's residual part); the rest of its channels are
    traced when the loop comes to it."""
    groups: list[ChannelGroup] = []
    claimed: dict[str, list[tuple[int, int]]] = {}  # producer -> (first channel, channels) held by groups
    for node in view.graph.node:
        start = _producer_start(view, node)
        if start is None:
            continue
        for window in _unclaimed(start[0], claimed.get(node.name, [])):
            try:
                traced = [_trace(view, node, len(groups), window)]
            except _Divide as split:  # a Split or channel Slices cut these channels into parts: a group each
                parts = [p for p in split.parts if window[0] <= p[0] and p[0] + p[1] <= window[0] + window[1]]
                if sum(p[1] for p in parts) != window[1]:  # parts straddling what others claimed
                    parts = [window]
                traced = [_trace(view, node, len(groups) + k, part, divisible=False) for k, part in enumerate(parts)]
            for group, windows in traced:
                for producer, held in windows.items():
                    claimed.setdefault(producer, []).append(held)
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
    tracer = _Tracer(view, group, window, divisible)
    try:
        try:
            tracer.run(node)
        except _Repeat as again:
            group = ChannelGroup(id=gid, producers=[], size=window[1])
            tracer = _Tracer(view, group, window, divisible, again.repeats)
            tracer.run(node)
    except _Frozen as why:
        group.reason = str(why)
    except (IndexError, KeyError, ValueError, TypeError) as exc:  # a malformed node the checker let by
        group.reason = f"malformed graph near '{node.name}' ({type(exc).__name__}: {exc})"
    if not group.producers:
        group.producers.append(node.name)
    return group, {node.name: window, **tracer.windows}


def _producer_start(view: GraphView, node: NodeProto) -> tuple[int, list[ParamSlice]] | None:
    """(channels, output-side slices) for a linear layer with constant weights, else None.

    The bias slot (input 2) is always listed, on its last axis: a consumer refit may add a
    bias the exported model did not have, and a broadcast bias of length 1 is left alone.
    """
    if len(node.input) < 2 or not view.is_const(node.input[1]) or not node.output:
        return None
    w = view.initializers[node.input[1]]
    rank = len(w.dims)
    if node.op_type == "Conv" and rank >= 3:
        if view.attr(node, "group", 1) != 1:
            return None  # output channels of a grouped conv are tied to its inputs
        return int(w.dims[0]), [ParamSlice(node.name, 1, 0), ParamSlice(node.name, 2, -1)]
    if node.op_type == "ConvTranspose" and rank >= 3 and view.attr(node, "group", 1) == 1:
        if view.attr(node, "output_shape") is not None:
            return None
        return int(w.dims[1]), [ParamSlice(node.name, 1, 1), ParamSlice(node.name, 2, -1)]
    if node.op_type == "Gemm" and rank == 2 and not view.attr(node, "transA", 0):
        if len(node.input) > 2 and node.input[2] and not view.is_const(node.input[2]):
            return None
        axis = 0 if view.attr(node, "transB", 0) else 1
        return int(w.dims[axis]), [ParamSlice(node.name, 1, axis), ParamSlice(node.name, 2, -1)]
    if node.op_type == "MatMul" and rank == 2:
        if view.shape(node.input[0]) is not None and len(view.shape(node.input[0])) >= 2:
            return int(w.dims[1]), [ParamSlice(node.name, 1, 1)]
    return None


@dataclass(frozen=True)
class _Place:
    """Where the group's channels sit in a tensor: `block` features per channel, starting at
    channel `offset` of `width` (offset 0 and width = group size unless a Concat widened it)."""

    block: int
    offset: int
    width: int
    last: bool = False  # channels on the last axis (a MatMul over an N...C tensor), not axis 1
    also: tuple[int, ...] = ()  # further offsets of the same channels (a Concat that repeats them)


class _Tracer:
    """Grows one group from a producer: forward to every reader of its channels, backward to
    every other layer that writes them (through residual Adds and gating Muls)."""

    def __init__(self, view: GraphView, group: ChannelGroup, window: tuple[int, int], divisible: bool = True,
                 repeats: dict[str, list[str]] | None = None):
        self.view, self.group, self.window = view, group, window  # window: the first producer's channels traced
        self.divisible = divisible  # a Split may still cut the group into parts (not when it is a part)
        self.windows: dict[str, tuple[int, int]] = {}  # producer -> (first channel, channels) in the group
        self.first_width = 0  # channels the first producer writes
        self.repeats = repeats or {}  # Concats known to take the group more than once, and from which inputs
        self.layout: dict[str, _Place] = {}
        self.pending: list[str] = []
        self.seen: set[tuple[str, str]] = set()  # (node, role) already handled
        self.concats: list[NodeProto] = []
        self.units: dict[int, str] = {}  # channels removed together -> the node that asks it ("Conv node 'x'")
        self.per_unit: list[tuple[int, ParamSlice | ShapeEdit]] = []  # (u, entry with one value per u channels)

    def run(self, producer: NodeProto) -> None:
        self._produce(producer, self.window[0])
        while self.pending:
            tensor = self.pending.pop()
            self.group.tensors.append(tensor)
            if tensor in self.view.outputs:
                raise _Frozen(f"tensor '{tensor}' is a graph output")
            source = self.view.producer.get(tensor)
            if source is None:
                raise _Frozen(f"tensor '{tensor}' comes straight from a graph input")
            self._visit(source, tensor, forward=False)
            for node in self.view.consumers.get(tensor, []):
                self._visit(node, tensor, forward=True)
        repeats = {n.name: [i for i in n.input if i in self.layout] for n in self.concats
                   if sum(i in self.layout for i in n.input) > 1}
        if repeats and not self.repeats:
            raise _Repeat(repeats)
        if repeats != self.repeats:
            raise _Frozen(f"Concat node '{next(iter(repeats))}' joins these channels with themselves")
        if len(self.group.producers) > 1:
            self.group.coupling = f"{len(self.group.producers)} producers ({', '.join(self.group.producers[:4])}" + \
                ("..." if len(self.group.producers) > 4 else "") + ") joined by residual or gating ops"
        if not self.group.consumers:
            raise _Frozen("no linear layer consumes these channels")
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
            raise _Frozen(f"{' and '.join(self.units.values())} work on groups of different widths "
                          f"({', '.join(map(str, self.units))} channels) of these channels")
        (unit, where), = self.units.items()
        offsets = [s.offset for s in group.slices] + [o for c in group.consumers for o in c.offsets] + \
            [s.offset for _, s in self.per_unit if isinstance(s, ParamSlice)]
        if group.size % unit or any(o % unit for o in offsets):
            raise _Frozen(f"the groups of {unit} channels of {where} do not line up with these channels")
        if group.size == unit:  # GroupNorm(1, C), as PoolFormer normalises: nothing can go alone
            raise _Frozen(f"{where} takes all {unit} of these channels as one group")
        group.size //= unit
        group.unit = unit
        group.slices = [replace(s, offset=s.offset // unit, block=s.block * unit) for s in group.slices]
        group.consumers = [replace(c, offset=c.offset // unit, extra=tuple(e // unit for e in c.extra),
                                   block=c.block * unit) for c in group.consumers]
        group.shape_edits = [replace(e, block=e.block * unit) for e in group.shape_edits]

    def _add(self, tensor: str, place: _Place, where: str) -> None:
        if tensor in self.layout:
            if self.layout[tensor] != place:
                raise _Frozen(f"node '{where}' mixes layouts of the same channels")
            return
        self.layout[tensor] = place
        self.pending.append(tensor)

    def _produce(self, node: NodeProto, offset: int = 0) -> None:
        """A layer writing the group's channels, from channel `offset` of its output (a part of
        a Split's input) or all of them."""
        start = _producer_start(self.view, node)
        if start is None:
            raise _Frozen(f"{node.op_type} node '{node.name}' writes these channels but cannot be sliced")
        size, slices = start
        place = self.layout.get(node.output[0])  # known when reached backward from a reader
        if place is not None:
            offset, width = place.offset, place.width
        else:  # the first producer: the group is all its channels, or a part of them
            width = self.first_width = size
        if size != width or offset + self.group.size > size:
            raise _Frozen(f"{node.op_type} node '{node.name}' writes {size} channels, not {width}")
        self.seen.add((node.name, "out"))
        self.group.producers.append(node.name)
        self.windows[node.name] = (offset, self.group.size)
        self.group.slices.extend(replace(s, offset=offset) for s in slices)
        last = node.op_type == "MatMul" and len(self.view.shape(node.input[0]) or ()) > 2
        self._add(node.output[0], _Place(1, offset, size, last), node.name)

    def _visit(self, node: NodeProto, tensor: str, forward: bool) -> None:
        op, role = node.op_type, "in" if forward else "out"
        if node.domain not in ("", "ai.onnx"):
            raise _Frozen(f"{node.domain}.{op} node '{node.name}' is not understood by the channel analysis")
        if op in ("Reshape", "InstanceNormalization") and (norm := _group_norm(self.view, node)):
            self._group_norm(norm, tensor)
            return
        if forward and self.layout[tensor].also and (op not in LINEAR | {"Slice"} or _conv_unit(self.view, node)):
            raise _Frozen(f"{op} node '{node.name}' reads a Concat that holds these channels more than once")
        if op in LINEAR and not _conv_unit(self.view, node):
            if (node.name, role) in self.seen:
                return
            self.seen.add((node.name, role))
            if forward:
                self.group.consumers.append(_consumer(self.view, node, tensor, self.layout[tensor]))
                if self.layout[tensor].offset or self.layout[tensor].width != self.group.size:
                    self._coupled(f"concatenated with other channels before '{node.name}'")
            else:
                self._produce(node)
            return
        if (node.name, "") in self.seen:
            return
        self.seen.add((node.name, ""))
        if self.layout[tensor].last and op not in UNARY and op not in BINARY:
            raise _Frozen(f"{op} node '{node.name}' on channels-last data is not understood by the analysis")
        if _conv_unit(self.view, node) or op in UNARY or op in PER_CHANNEL_PARAMS or op in POOL \
                or op in BINARY or op in ("Pad", "Resize", "Upsample"):
            self._channelwise(node, tensor)
        elif op == "Slice" and not forward:
            self._slice_back(node, tensor)
        elif op == "Concat" and not forward:
            self._concat_back(node, tensor)
        elif not forward:
            raise _Frozen(f"{op} node '{node.name}' writes these channels and is not understood by the analysis")
        elif op == "Concat":
            self._concat(node, tensor)
        elif op == "Split":
            self._split(node, tensor)
        elif op == "Slice":
            self._slice(node, tensor)
        else:
            self._forward_only(node, tensor)

    def _channelwise(self, node: NodeProto, tensor: str) -> None:
        """Ops whose data inputs and first output all carry the same channels."""
        view, group, op, name = self.view, self.group, node.op_type, node.name
        place = self.layout[tensor]
        shape = view.shape(tensor)
        flat = place.block > 1 or (shape is not None and len(shape) == 2)
        _only_first_output_used(view, node)
        data = [node.input[0]]
        if op in BINARY:
            data = []
            for idx, other in enumerate(node.input):
                if not other:
                    continue
                if view.is_const(other):
                    _per_channel_const(view, node, idx, tensor, group, place)
                elif other == tensor or other in self.layout or _carries_channels(view, other, tensor, place, name):
                    data.append(other)
        elif unit := _conv_unit(view, node):
            if flat:
                raise _Frozen(f"depthwise or grouped Conv node '{name}' on flattened channels")
            group.slices += [ParamSlice(name, 1, 0, offset=place.offset), ParamSlice(name, 2, -1, offset=place.offset)]
            group.group_attrs.append(name)
            if unit > 1:
                self.units.setdefault(unit, f"Conv node '{name}'")
        elif op in UNARY or op in PER_CHANNEL_PARAMS:
            if any(not view.is_const(i) for i in node.input[1:] if i):
                raise _Frozen(f"{op} node '{name}' takes a computed parameter")
            group.slices += [ParamSlice(name, idx, 0, offset=place.offset) for idx in PER_CHANNEL_PARAMS.get(op, ())]
        elif op in POOL:
            if flat:
                raise _Frozen(f"{op} node '{name}' on flattened channels")
        else:
            _channel_axis_untouched(view, node, tensor, group)
        if tensor not in data and tensor != node.output[0]:
            raise _Frozen(f"{op} node '{name}' takes these channels as a parameter input")
        for t in data:
            self._add(t, place, name)
        self._add(node.output[0], place, name)

    def _group_norm(self, norm: _GroupNorm, tensor: str) -> None:
        """Through a GroupNorm, either way: its input and output carry the same channels, removed
        a whole normalisation group at a time so that the groups kept see the same statistics."""
        place = self.layout[tensor]
        if place.block != 1 or place.last or place.also or tensor not in (norm.split.input[0], norm.merge.output[0]):
            raise _Frozen(f"GroupNorm at Reshape node '{norm.split.name}' on flattened or repeated channels")
        if (norm.split.name, "") in self.seen:
            return
        self.seen.add((norm.split.name, ""))
        unit = place.width // norm.groups
        if unit > 1:
            self.units.setdefault(unit, f"GroupNorm at Reshape node '{norm.split.name}'")
        self.per_unit += [(unit, ShapeEdit(norm.split.name, 1, 1, 1)),
                          (unit, ParamSlice(norm.norm.name, 1, 0, offset=place.offset)),
                          (unit, ParamSlice(norm.norm.name, 2, 0, offset=place.offset))]
        if self.view.is_const(norm.merge.input[1]):  # the shape back written out (a fixed batch)
            self.group.shape_edits.append(ShapeEdit(norm.merge.name, 1, 1, 1))
        self._add(norm.split.input[0], place, norm.split.name)
        self._add(norm.merge.output[0], place, norm.merge.name)

    def _split(self, node: NodeProto, tensor: str) -> None:
        """Split on the channel axis into parts of constant sizes (CSP and YOLO blocks): the group
        goes on in the part that holds it, whose size is edited as its channels go. A group that
        is the whole split tensor is divided: each part is traced as a group of its own."""
        view, place, group = self.view, self.layout[tensor], self.group
        shape = view.shape(tensor)
        if node.input[0] != tensor or shape is None or len(shape) < 2 or shape[1] is None or place.block != 1 \
                or view.attr(node, "axis", 0) % len(shape) != 1:
            raise _Frozen(f"Split node '{node.name}' splits an axis other than the channels")
        if len(node.input) < 2 or not node.input[1] or not view.is_const(node.input[1]):
            raise _Frozen(f"Split node '{node.name}' has no constant part sizes to edit")
        sizes = [int(v) for v in view.const(node.input[1]).ravel()]
        starts = [sum(sizes[:k]) for k in range(len(sizes))]
        first, end = place.offset, place.offset + group.size
        part = next((k for k, (s, n) in enumerate(zip(starts, sizes)) if s <= first and end <= s + n), None)
        if part is None:
            self._divide(node, (first, end), shape[1], list(zip(starts, sizes)))
        group.shape_edits.append(ShapeEdit(node.name, 1, part, 1))
        self._add(node.output[part], _Place(1, first - starts[part], sizes[part]), node.name)

    def _slice(self, node: NodeProto, tensor: str) -> None:
        """A Slice of other axes passes the channels on. One of the channel axis (constant bounds,
        step 1) takes a part of them, as a Split would (torch.chunk through the TorchScript
        exporter): the group goes on if it lies in the part, is divided like a Split's input if
        it is the whole tensor, and every channel Slice of the tensor after the group shifts."""
        view, place, group = self.view, self.layout[tensor], self.group
        if node.input[0] != tensor:
            raise _Frozen(f"Slice node '{node.name}' takes these channels as a parameter input")
        bounds = _slice_bounds(view, node, tensor)
        if bounds is None:
            self._add(node.output[0], place, node.name)
            return
        if place.block != 1 or place.last:
            raise _Frozen(f"Slice node '{node.name}' takes part of flattened channels")
        width, (start, stop, _) = view.shape(tensor)[1], bounds
        first, end = place.offset, place.offset + group.size
        places = (first, *place.also)  # where a Concat that took these channels more than once holds them
        inside = [start <= p and p + group.size <= stop for p in places]
        if all(inside):
            if (tensor, "slices") not in self.seen:  # every channel Slice of this tensor, once
                self.seen.add((tensor, "slices"))
                for other in self.view.consumers.get(tensor, []):
                    other_bounds = _slice_bounds(view, other, tensor) if other.op_type == "Slice" else None
                    if other_bounds is None:
                        continue
                    o_start, o_stop, pos = other_bounds
                    o_end = int(view.const(other.input[2]).ravel()[pos])
                    before_start = sum(p + group.size <= o_start for p in places)
                    if before_start:
                        group.shape_edits.append(ShapeEdit(other.name, 1, pos, before_start))
                    before_end = sum(p + group.size <= o_end for p in places)
                    if before_end and o_end <= width:  # an end past the channel count stays "to the end"
                        group.shape_edits.append(ShapeEdit(other.name, 2, pos, before_end))
            self._add(node.output[0], _Place(1, first - start, stop - start,
                                             also=tuple(p - start for p in place.also)), node.name)
            return
        if place.also and (any(inside) or not all(p + group.size <= start or stop <= p for p in places)):
            raise _Frozen(f"Slice node '{node.name}' keeps only some of the places of these channels")
        if stop <= first or end <= start:
            return  # another part of the channels
        cuts = sorted({0, width} | {b for other in self.view.consumers.get(tensor, []) if other.op_type == "Slice"
                                    for b in (_slice_bounds(view, other, tensor) or (0, width, 0))[:2]})
        self._divide(node, (first, end), width, [(a, b - a) for a, b in zip(cuts, cuts[1:])])

    def _slice_back(self, node: NodeProto, tensor: str) -> None:
        """Reached from its output: the channels are a part of the Slice's input (DPN adds one
        part of a conv's output to the residual stream and concatenates the other), placed at
        the Slice's start; from the input on, the Slice is traced as any other."""
        place, source = self.layout[tensor], node.input[0]
        bounds = _slice_bounds(self.view, node, source)
        if bounds is not None:
            if place.block != 1 or place.last or place.also or place.width != bounds[1] - bounds[0]:
                raise _Frozen(f"Slice node '{node.name}' writes flattened or repeated channels")
            place = _Place(1, bounds[0] + place.offset, self.view.shape(source)[1])
        self._add(source, place, node.name)
        if bounds is not None:
            self._slice(node, source)

    def _divide(self, node: NodeProto, span: tuple[int, int], width: int, parts: list[tuple[int, int]]) -> NoReturn:
        """The group spans several parts of a Split or channel Slices: if it is the whole tensor
        (and not itself a part), each part becomes a group; otherwise it stays whole."""
        if self.divisible and span == (self.window[0], sum(self.window)) and width == self.first_width:
            raise _Divide(parts)
        raise _Frozen(f"{node.op_type} node '{node.name}' cuts these channels across its parts")

    def _concat(self, node: NodeProto, tensor: str) -> None:
        """Concat on the channel axis: the same channels, shifted by the widths of earlier inputs."""
        view, place = self.view, self.layout[tensor]
        shape = view.shape(node.output[0])
        axis = view.attr(node, "axis", 1)
        if place.block != 1 or shape is None or len(shape) < 3 or axis % len(shape) != 1:
            raise _Frozen(f"Concat node '{node.name}' joins along an axis other than the channels")
        widths = [(view.shape(i) or (None, None))[1] for i in node.input]
        if None in widths or shape[1] is None:
            raise _Frozen(f"channel counts unknown at Concat node '{node.name}'")
        carriers = self.repeats.get(node.name, [tensor])  # every input holding the group, once traced
        offsets = [sum(widths[:k]) + place.offset for k, name in enumerate(node.input) if name in carriers]
        self.concats.append(node)
        self._coupled(f"concatenated with other channels at '{node.name}'")
        self._add(node.output[0], _Place(1, offsets[0], int(shape[1]), also=tuple(offsets[1:])), node.name)

    def _concat_back(self, node: NodeProto, tensor: str) -> None:
        """Reached from its output (a residual Add whose branch ends in a Concat of convs: MixNet's
        split pointwise convs): the channels come from the one input that holds them, or, where
        they span several, the first producer's channels are divided along the Concat's inputs."""
        view, place = self.view, self.layout[tensor]
        shape, axis = view.shape(tensor), view.attr(node, "axis", 1)
        widths = [(view.shape(i) or (None, None))[1] for i in node.input]
        if place.block != 1 or place.last or place.also or shape is None or len(shape) < 3 \
                or axis % len(shape) != 1 or None in widths:
            raise _Frozen(f"Concat node '{node.name}' writes these channels and is not understood by the analysis")
        starts = [sum(widths[:k]) for k in range(len(widths))]
        first, end = place.offset, place.offset + self.group.size
        k = next((k for k, (s, w) in enumerate(zip(starts, widths)) if s <= first and end <= s + w), None)
        if k is None:
            self._divide(node, (first, end), place.width, list(zip(starts, widths)))
        if list(node.input).count(node.input[k]) > 1:
            raise _Frozen(f"Concat node '{node.name}' writes these channels twice")
        self._add(node.input[k], _Place(1, first - starts[k], widths[k]), node.name)
        self._concat(node, node.input[k])

    def _coupled(self, why: str) -> None:
        if not self.group.coupling:
            self.group.coupling = why

    def _forward_only(self, node: NodeProto, tensor: str) -> None:
        """Ops that change how the channels are laid out (flatten, reduce) or only read the shape."""
        view, group, op, name = self.view, self.group, node.op_type, node.name
        place = self.layout[tensor]
        if node.input[0] != tensor:
            raise _Frozen(f"{op} node '{name}' takes these channels as a parameter input")
        if op == "Flatten":
            if view.attr(node, "axis", 1) != 1:
                raise _Frozen(f"Flatten node '{name}' with axis != 1")
            self._add(node.output[0], replace(place, block=place.block * _spatial(view, tensor, name)), name)
        elif op == "Reshape":
            self._add(node.output[0], replace(place, block=_reshape_block(view, node, tensor, place, group)), name)
        elif op in ("Squeeze", "Unsqueeze"):
            self._add(node.output[0], replace(place, block=_squeeze_block(view, node, tensor, place)), name)
        elif op in ("ReduceMean", "ReduceMax", "ReduceSum"):
            self._add(node.output[0], replace(place, block=_reduce(view, node, tensor, place.block)), name)
        elif op == "Shape":
            _shape_batch_only(view, node)
        else:
            raise _Frozen(f"{op} node '{name}' is not understood by the channel analysis")


LINEAR = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


@dataclass(frozen=True)
class _GroupNorm:
    """GroupNorm as both torch exporters write it: Reshape(x, (N, G, -1)), InstanceNormalization
    of those G rows, Reshape back to x's shape (read at run time, or written out); the
    per-channel scale and shift follow as a Mul and an Add."""

    split: NodeProto
    norm: NodeProto
    merge: NodeProto
    groups: int


def _group_norm(view: GraphView, node: NodeProto) -> _GroupNorm | None:
    """The GroupNorm that `node` (any of its three nodes) is part of, or None."""
    split = node
    while split is not None and _sole_reader(view, split.output[0], "InstanceNormalization") is None:
        split = view.producer.get(split.input[0]) if split.op_type in ("Reshape", "InstanceNormalization") else None
    if split is None or split.op_type != "Reshape":
        return None
    norm = _sole_reader(view, split.output[0], "InstanceNormalization")
    merge = _sole_reader(view, norm.output[0], "Reshape")
    x, shape = split.input[0], view.shape(split.input[0])
    if merge is None or node.name not in (split.name, norm.name, merge.name) or len(norm.input) < 3 \
            or not all(view.is_const(i) for i in norm.input[1:3]) or not view.is_const(split.input[1]) \
            or shape is None or len(shape) < 3 or shape[1] is None:
        return None
    target = [int(v) for v in view.const(split.input[1]).ravel()]
    if len(target) != 3 or target[2] != -1 or target[1] < 1 or shape[1] % target[1] \
            or not view.reshape_keeps_batch(split, target) or view.const(norm.input[1]).shape != (target[1],):
        return None
    back = merge.input[1]
    if view.is_const(back):  # written out (a fixed batch, or Shape folded at load): edited as channels go
        written = [int(v) for v in view.const(back).ravel()]
        if written[1:] != list(shape[1:]) or not (written[0] == -1 or view.reshape_keeps_batch(merge, written)) \
                or len(view.consumers.get(back, [])) != 1:
            return None
    elif _own_leading_dims(view, back, x) < len(shape):
        return None
    return _GroupNorm(split, norm, merge, target[1])


def _sole_reader(view: GraphView, tensor: str, op: str) -> NodeProto | None:
    """The one node reading `tensor`, as its data input, if it is an `op`."""
    readers = view.consumers.get(tensor, [])
    if tensor in view.outputs or len(readers) != 1 or readers[0].op_type != op or readers[0].input[0] != tensor:
        return None
    return readers[0]


def _conv_unit(view: GraphView, node: NodeProto) -> int:
    """Channels per group of a grouped Conv that writes as many channels as it reads: 1 for a
    depthwise Conv, the group width for ResNeXt's and RegNet's (C -> C in groups); 0 for any
    other node. Such a Conv is channel-wise at the scale of its groups: removing a whole group
    of inputs removes the matching outputs (its weights sliced along axis 0) and nothing else."""
    if node.op_type != "Conv" or len(node.input) < 2 or not view.is_const(node.input[1]):
        return 0
    w = view.initializers[node.input[1]].dims
    groups = view.attr(node, "group", 1)
    return int(w[1]) if groups > 1 and len(w) >= 3 and w[0] == groups * w[1] else 0


def _carries_channels(view: GraphView, other: str, tensor: str, place: _Place, where: str) -> bool:
    """Whether a computed operand of a binary op holds these channels (True) or is broadcast
    over them (False: a scalar or a one-channel map, left alone by pruning)."""
    tshape, oshape = view.shape(tensor), view.shape(other)
    if tshape is None or oshape is None:
        raise _Frozen(f"shapes unknown at node '{where}'")
    if place.block > 1:
        raise _Frozen(f"node '{where}' joins flattened channels with another tensor")
    pos = len(oshape) - (len(tshape) - 1) if len(tshape) > 2 and not place.last else len(oshape) - 1
    if pos < 0 or oshape[pos] == 1:
        return False
    if oshape[pos] != place.width:
        raise _Frozen(f"node '{where}' joins these channels with '{other}' of another width")
    return True


def _only_first_output_used(view: GraphView, node: NodeProto) -> None:
    for extra in node.output[1:]:
        if extra and (view.consumers.get(extra) or extra in view.outputs):
            raise _Frozen(f"{node.op_type} node '{node.name}' has a second output in use")


def _per_channel_const(view: GraphView, node: NodeProto, idx: int, tensor: str,
                       group: ChannelGroup, place: _Place) -> None:
    """A constant operand broadcast against the channels: scalar-like, or sliced per channel."""
    cshape = view.shape(node.input[idx]) or ()
    tshape = view.shape(tensor)
    if tshape is None:
        raise _Frozen(f"rank of '{tensor}' unknown at {node.op_type} node '{node.name}'")
    block = place.block
    axis_from_right = len(tshape) - 2 if block == 1 and len(tshape) > 2 and not place.last else 0  # H, W of NCHW
    pos = len(cshape) - 1 - axis_from_right
    if pos < 0 or cshape[pos] == 1:
        if block > 1 and cshape and cshape[-1] != 1:
            raise _Frozen(f"{node.op_type} node '{node.name}' has a per-feature constant on flattened channels")
        return
    if node.op_type == "PRelu" and len(cshape) == 1 and pos == 0 and len(tshape) > 2:
        raise _Frozen(f"PRelu node '{node.name}' slope broadcasts over the last axis")
    if cshape[pos] != place.width * block:
        raise _Frozen(f"{node.op_type} node '{node.name}' constant of shape {cshape} does not "
                      f"broadcast per channel")
    group.slices.append(ParamSlice(node.name, idx, pos, block, place.offset))


def _consumer(view: GraphView, node: NodeProto, tensor: str, place: _Place) -> Consumer:
    name, block, offset = node.name, place.block, place.offset
    if node.input[0] != tensor or len(node.input) < 2 or not view.is_const(node.input[1]):
        raise _Frozen(f"{node.op_type} node '{name}' reads these channels other than as its data input")
    if node.op_type == "ConvTranspose":
        return _deconv_consumer(view, node, place)
    if place.last != (node.op_type == "MatMul" and len(view.shape(tensor) or ()) > 2):
        raise _Frozen(f"{node.op_type} node '{name}' reads these channels on another axis")
    if node.op_type == "Conv":
        w = view.initializers[node.input[1]]
        if view.attr(node, "group", 1) != 1:
            raise _Frozen(f"grouped Conv node '{name}' couples input and output channels")
        if len(w.dims) not in (3, 4) or block != 1:
            raise _Frozen(f"Conv node '{name}' is not a 1-D or 2-D convolution on channels")
        return Consumer(name, "conv", in_axis=1, offset=offset, extra=place.also)
    if node.op_type == "Gemm":
        if view.attr(node, "transA", 0):
            raise _Frozen(f"Gemm node '{name}' uses transA")
        return Consumer(name, "gemm", in_axis=1 if view.attr(node, "transB", 0) else 0, block=block, offset=offset,
                        extra=place.also)
    if len(view.initializers[node.input[1]].dims) != 2 or len(view.shape(tensor) or ()) < 2:
        raise _Frozen(f"MatMul node '{name}' does not multiply by a constant matrix")
    return Consumer(name, "gemm", in_axis=0, block=block, offset=offset, extra=place.also)


def _deconv_consumer(view: GraphView, node: NodeProto, place: _Place) -> Consumer:
    """A ConvTranspose whose stride equals its kernel (U-Net's 2x2 upsampling): each input pixel
    writes a patch of its own, so it is a matrix from input channels to (output channel, patch
    position), refit as such; overlapping patches are not."""
    w = view.initializers[node.input[1]].dims
    kernel = list(view.attr(node, "kernel_shape", w[2:]))
    plain = (len(w) == 4 and place.block == 1 and not place.last and view.attr(node, "group", 1) == 1
             and list(view.attr(node, "strides", [1] * len(kernel))) == kernel
             and not any(view.attr(node, "pads", [0]))
             and all(d == 1 for d in view.attr(node, "dilations", [1]))
             and not any(view.attr(node, "output_padding", [0]))
             and view.attr(node, "output_shape") is None
             and view.attr(node, "auto_pad", b"NOTSET") in (b"NOTSET", "NOTSET"))
    if not plain:
        raise _Frozen(f"ConvTranspose node '{node.name}' reads these channels with overlapping or padded "
                      f"patches; only a stride equal to its kernel is refit")
    return Consumer(node.name, "deconv", in_axis=0, offset=place.offset, extra=place.also)


def _spatial(view: GraphView, tensor: str, where: str) -> int:
    shape = view.shape(tensor)
    if shape is None or any(d is None for d in shape[2:]):
        raise _Frozen(f"spatial size of '{tensor}' unknown at '{where}'")
    size = 1
    for d in shape[2:]:
        size *= d
    return size


def _reshape_block(view: GraphView, node: NodeProto, tensor: str, place: _Place,
                   group: ChannelGroup) -> int:
    """A Reshape that keeps the batch and flattens the rest, as Flatten does: to (batch, -1),
    or to (batch or -1, C*H*W) with the feature count written out (edited when channels go;
    other groups concatenated into the same tensor edit it too); or (N, C) back to (N, C, 1, 1).
    Anything else is frozen."""
    if node.input[0] != tensor or not view.is_const(node.input[1]):
        raise _Frozen(f"Reshape node '{node.name}' has a computed target shape")
    target = [int(v) for v in view.const(node.input[1]).ravel()]
    shape = view.shape(tensor) or (None, None)
    spatial = _spatial(view, tensor, node.name)
    keeps_batch = view.reshape_keeps_batch(node, target)
    trailing_ones = len(target) > 2 and spatial == 1 and all(d == 1 for d in target[2:])  # (N, C) -> (N, C, 1, 1)
    if (len(target) == 2 or trailing_ones) and not place.last:
        if keeps_batch and target[1] == -1:
            return place.block * spatial
        if (keeps_batch or target[0] == -1) and shape[1] is not None and target[1] == shape[1] * spatial:
            group.shape_edits.append(ShapeEdit(node.name, 1, 1, place.block * spatial))
            return place.block * spatial
    raise _Frozen(f"Reshape node '{node.name}' to {target} is not a plain flatten")


def _axes(view: GraphView, node: NodeProto) -> list[int] | None:
    """A reduce's or (un)squeeze's axes: an attribute before opset 13 (18 for reduces), then an input."""
    axes = view.attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        if not view.is_const(node.input[1]):
            raise _Frozen(f"{node.op_type} node '{node.name}' has computed axes")
        axes = [int(a) for a in view.const(node.input[1]).ravel()]
    return axes


def _squeeze_block(view: GraphView, node: NodeProto, tensor: str, place: _Place) -> int:
    """Squeeze or Unsqueeze of size-1 axes after the channels ((N, C, 1, 1) <-> (N, C), as a
    global pool's output is reshaped for a classifier or a squeeze-excitation gate)."""
    shape = view.shape(tensor)
    axes = _axes(view, node)
    if shape is None or axes is None or place.last:
        raise _Frozen(f"{node.op_type} node '{node.name}' without known axes and rank")
    rank = len(shape) + (len(axes) if node.op_type == "Unsqueeze" else 0)
    axes = [a % rank for a in axes]
    if min(axes) < 2 or (node.op_type == "Squeeze" and any(shape[a] != 1 for a in axes)):
        raise _Frozen(f"{node.op_type} node '{node.name}' moves the batch or channel axis")
    return place.block


def _reduce(view: GraphView, node: NodeProto, tensor: str, block: int) -> int:
    axes = _axes(view, node)
    rank = len(view.shape(tensor) or ())
    if not axes or block != 1 or rank < 3:
        raise _Frozen(f"{node.op_type} node '{node.name}' reduces over the channels")
    axes = sorted(a % rank for a in axes)
    if 0 in axes or 1 in axes:
        raise _Frozen(f"{node.op_type} node '{node.name}' reduces over the batch or channels")
    if view.attr(node, "keepdims", 1):
        return 1
    if axes != list(range(2, rank)):
        raise _Frozen(f"{node.op_type} node '{node.name}' drops only some spatial axes")
    return 1


def _channel_axis_untouched(view: GraphView, node: NodeProto, tensor: str, group: ChannelGroup) -> None:
    """Pad and Resize are channel-wise only if they leave axes 0 and 1 alone (a Resize to constant
    sizes has its channel entry edited as the group loses channels)."""
    if node.op_type == "Pad":
        pads = view.attr(node, "pads")
        if pads is None:
            if len(node.input) < 2 or not view.is_const(node.input[1]):
                raise _Frozen(f"Pad node '{node.name}' has computed pads")
            if len(node.input) > 3 and node.input[3]:
                raise _Frozen(f"Pad node '{node.name}' pads selected axes only")
            pads = [int(p) for p in view.const(node.input[1]).ravel()]
        half = len(pads) // 2
        if any(pads[i] or pads[i + half] for i in (0, 1)):
            raise _Frozen(f"Pad node '{node.name}' pads the batch or channel axis")
        return
    scales_idx = 2 if node.op_type == "Resize" else 1
    sizes_idx = 3
    if node.op_type == "Resize" and len(node.input) > sizes_idx and node.input[sizes_idx]:
        sizes, shape = node.input[sizes_idx], view.shape(tensor)
        values = view.const(sizes).ravel() if view.is_const(sizes) else None
        if values is not None and shape is not None and len(values) == len(shape) and int(values[1]) == shape[1] \
                and len(view.consumers.get(sizes, [])) == 1:
            group.shape_edits.append(ShapeEdit(node.name, sizes_idx, 1, 1))  # the dynamo exporter, fixed batch
        elif not _sizes_keep_own_channels(view, node):
            raise _Frozen(f"Resize node '{node.name}' gives output sizes, which include the channels")
        return
    scales = node.input[scales_idx] if len(node.input) > scales_idx else ""
    if not scales or not view.is_const(scales):
        raise _Frozen(f"{node.op_type} node '{node.name}' has computed scales")
    values = view.const(scales).ravel()
    if len(values) < 2 or values[0] != 1 or values[1] != 1:
        raise _Frozen(f"{node.op_type} node '{node.name}' scales the batch or channel axis")


def _slice_bounds(view: GraphView, node: NodeProto, tensor: str) -> tuple[int, int, int] | None:
    """(first channel, end, position in the starts and ends inputs) of a Slice of the channel
    axis; None if it leaves the channel axis alone."""
    shape = view.shape(tensor)
    if view.attr(node, "starts") is not None or any(i and not view.is_const(i) for i in node.input[1:]):
        raise _Frozen(f"Slice node '{node.name}' has computed or attribute bounds")
    value = lambda k, default: ([int(v) for v in view.const(node.input[k]).ravel()]  # noqa: E731
                                if len(node.input) > k and node.input[k] else default)
    starts, ends = value(1, []), value(2, [])
    axes, steps = value(3, list(range(len(starts)))), value(4, [1] * len(starts))
    if shape is None or shape[1] is None:
        raise _Frozen(f"channel count unknown at Slice node '{node.name}'")
    for pos, (start, end, axis, step) in enumerate(zip(starts, ends, axes, steps)):
        if axis % len(shape) == 1:
            if step != 1 or start < 0 or end < 0:
                raise _Frozen(f"Slice node '{node.name}' takes channels backwards or from the end")
            return start, min(end, shape[1]), pos
    return None


def _own_leading_dims(view: GraphView, value: str, tensor: str) -> int:
    """How many leading dims of `tensor`'s run-time shape `value` holds: Shape(tensor) from 0
    (up to its `end`; the dynamo exporter), or a Slice(0:k) of it (the TorchScript exporter);
    0 for anything else."""
    node = view.producer.get(value)
    if node is not None and node.op_type == "Slice":
        if len(node.input) < 4 or not all(view.is_const(i) for i in node.input[1:4]) \
                or view.const(node.input[1]).ravel().tolist() != [0] or view.const(node.input[3]).ravel().tolist() != [0]:
            return 0
        return min(int(view.const(node.input[2]).ravel()[0]), _own_leading_dims(view, node.input[0], tensor))
    if node is None or node.op_type != "Shape" or node.input[0] != tensor or view.attr(node, "start", 0) != 0:
        return 0
    return view.attr(node, "end", len(view.shape(tensor) or ()) or 2**31)


def _feeds_own_resize_sizes(view: GraphView, value: str, tensor: str) -> bool:
    """`value` goes only, as the first part of a Concat, into the `sizes` of Resizes of `tensor`."""
    concats = view.consumers.get(value, [])
    return bool(concats) and all(
        c.op_type == "Concat" and c.input[0] == value and c.output[0] not in view.outputs
        and view.consumers.get(c.output[0]) and all(
            r.op_type == "Resize" and len(r.input) > 3 and r.input[3] == c.output[0] and r.input[0] == tensor
            and c.output[0] not in r.input[:3] for r in view.consumers[c.output[0]])
        for c in concats)


def _sizes_keep_own_channels(view: GraphView, resize: NodeProto) -> bool:
    """The Resize's sizes start with its input's own batch and channel count, read at run time
    (Concat(Shape(x)[0:k >= 2], target size)): they follow the pruned width."""
    concat = view.producer.get(resize.input[3])
    return (concat is not None and concat.op_type == "Concat" and bool(concat.input)
            and _own_leading_dims(view, concat.input[0], resize.input[0]) >= 2)


def _shape_batch_only(view: GraphView, node: NodeProto) -> list:
    """Shape -> Gather(index 0) reads only the batch size, which pruning leaves alone; a GroupNorm
    reshaping back to its input's shape reads the pruned shape at run time. The leading
    dims of the shape concatenated into the sizes of a Resize of that same tensor (how both
    exporters write F.interpolate(x, size=...)) read the channel count at run time, from the
    pruned tensor itself: the count they ask for is the one the tensor has."""
    tensor = node.input[0]
    for user in view.consumers.get(node.output[0], []):
        ok = (user.op_type == "Gather" and view.attr(user, "axis", 0) == 0
              and view.is_const(user.input[1]) and view.const(user.input[1]).ravel().tolist() == [0])
        sizes = user.output[0] if user.op_type == "Slice" else node.output[0]
        norm = _group_norm(view, user) if user.op_type == "Reshape" else None
        ok = ok or (norm is not None and norm.merge is user and user.input[1] == node.output[0]
                    and norm.split.input[0] == tensor)  # a GroupNorm reshaping back to its input's shape
        if not ok and not (_own_leading_dims(view, sizes, tensor) and _feeds_own_resize_sizes(view, sizes, tensor)):
            raise _Frozen(f"Shape node '{node.name}' reads the channel count")
    if node.output[0] in view.outputs:
        raise _Frozen(f"Shape node '{node.name}' is a graph output")
    return []
