"""How the trace crosses each op type: one Rule per op type in RULES, looked up by `rule_for`.

A rule holds the handler run when the trace reaches a node from an input that carries the
channels (`forward`) or from its output (`backward`), and which of the tracer's generic
guards apply first. Supporting an op is one registration: a name in an op set below, or a
`@channelwise`, `@layout` or `@rule` line over its handler. Op types without a rule are not
understood either way, which freezes the group.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Literal

from onnx import NodeProto

from pipeline.analyze.checks import (GroupNorm, carries_channels, consumer, conv_unit, group_norm,
                                     only_first_output_used, pad_keeps_channels, per_channel_const,
                                     recurrent_consumer, reduce_block, reshape_block, resize_keeps_channels,
                                     shape_batch_only, slice_bounds, spatial, squeeze_block, transposed_place)
from pipeline.analyze.model import Consumer, Frozen, ParamSlice, Place, ShapeEdit
from pipeline.graph import GraphView

if TYPE_CHECKING:
    from pipeline.analyze.tracer import Tracer

# Ops that act on each channel alone, with a single data input (others are attributes or scalars).
UNARY = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu",
         "Softplus", "Softsign", "Gelu", "Erf", "Identity", "Dropout", "Neg", "Abs", "Exp", "Log",
         "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Mish", "ThresholdedRelu", "Cast",
         "Clip", "Swish"}
POOL = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}
BINARY = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "PRelu"}
PER_CHANNEL_PARAMS = {"BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2)}
LINEAR = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
RECURRENT = {"LSTM", "GRU", "RNN"}  # read the channels through their input weights W

Handler = Callable[["Tracer", NodeProto, str], None]  # (tracer, node reached, tensor it was reached by)
Operands = Callable[["Tracer", NodeProto, str, Place, bool], "list[str] | None"]  # (..., place, flat) -> data inputs
Picker = Callable[[GraphView, NodeProto], "Rule | None"]  # the rule for this node, where not its op type's


@dataclass(frozen=True)
class Rule:
    """What the trace does at one op type. Each guard left False makes the tracer freeze that
    case before the handler runs; `once` None leaves repeated visits to the handler."""

    forward: Handler  # reached from an input
    backward: Handler  # reached from its output
    once: Literal["node", "direction"] | None = "node"  # handled once per node, or once from each side
    repeats: bool = False  # guard: may read a Concat that holds the channels more than once
    channels_last: bool = False  # guard: may run on channels-last data
    when: Picker | None = None  # a rule for particular nodes (a pattern, an attribute), over this one


RULES: dict[str, Rule] = {}


def rule_for(view: GraphView, node: NodeProto) -> Rule:
    """The rule for `node`: its op type's, or the one that rule's `when` picks for this node."""
    found = RULES.get(node.op_type, UNKNOWN)
    return (found.when(view, node) if found.when else None) or found


def _register(ops: Iterable[str], entry: Rule) -> None:
    for op in ops:
        if op in RULES:
            raise ValueError(f"two channel-analysis rules for {op}")
        RULES[op] = entry


def rule(*ops: str, backward: Handler | None = None, once: Literal["node", "direction"] = "node",
         repeats: bool = False, channels_last: bool = False,
         when: Picker | None = None) -> Callable[[Handler], Handler]:
    """Registers the decorated forward handler for `ops`, with the Rule's other fields; without
    `backward` they are not understood when reached from their output."""
    def decorate(forward: Handler) -> Handler:
        _register(ops, Rule(forward, backward or _writes_unknown, once, repeats, channels_last, when))
        return forward
    return decorate


def channelwise(*ops: str, channels_last: bool = False,
                when: Picker | None = None) -> Callable[[Operands], Operands]:
    """Registers `ops` as channel-wise, either way; the decorated function checks their other
    inputs and returns their data inputs (None: the first input alone)."""
    def decorate(operands: Operands) -> Operands:
        _register(ops, _channelwise_rule(operands, channels_last, when))
        return operands
    return decorate


def layout(*ops: str, when: Picker | None = None) -> Callable[[Handler], Handler]:
    """Registers `ops` as forward-only ops that change how the channels are laid out (flatten,
    reduce) or only read the shape; the channels must be their data input."""
    def decorate(step: Handler) -> Handler:
        _register(ops, Rule(_data_input_only(step), _writes_unknown, when=when))
        return step
    return decorate


def _writes_unknown(t: Tracer, node: NodeProto, tensor: str) -> None:
    raise Frozen(f"{node.op_type} node '{node.name}' writes these channels and is not understood by the analysis")


def _data_input_only(step: Handler) -> Handler:
    def forward(t: Tracer, node: NodeProto, tensor: str) -> None:
        if node.input[0] != tensor:
            raise Frozen(f"{node.op_type} node '{node.name}' takes these channels as a parameter input")
        step(t, node, tensor)
    return forward


def _not_understood(t: Tracer, node: NodeProto, tensor: str) -> None:
    raise Frozen(f"{node.op_type} node '{node.name}' is not understood by the channel analysis")


UNKNOWN = Rule(_data_input_only(_not_understood), _writes_unknown)


# GroupNorm as exported: a pattern of three nodes, crossed as one.

def _as_group_norm(view: GraphView, node: NodeProto) -> Rule | None:
    """Where `node` is part of a GroupNorm, the rule that crosses the whole of it."""
    norm = group_norm(view, node)
    if norm is None:
        return None
    handle = partial(_through_group_norm, norm=norm)
    return Rule(handle, handle, once=None, repeats=True, channels_last=True)  # the handler checks all three


def _through_group_norm(t: Tracer, node: NodeProto, tensor: str, norm: GroupNorm) -> None:
    """Through a GroupNorm, either way: its input and output carry the same channels, removed
    a whole normalisation group at a time so that the groups kept see the same statistics."""
    place = t.layout[tensor]
    if place.block != 1 or place.last or place.also or tensor not in (norm.split.input[0], norm.merge.output[0]):
        raise Frozen(f"GroupNorm at Reshape node '{norm.split.name}' on flattened or repeated channels")
    if (norm.split.name, "") in t.seen:
        return
    t.seen.add((norm.split.name, ""))
    unit = place.width // norm.groups
    if unit > 1:
        t.units.setdefault(unit, f"GroupNorm at Reshape node '{norm.split.name}'")
    t.per_unit += [(unit, ShapeEdit(norm.split.name, 1, 1, 1)),
                   (unit, ParamSlice(norm.norm.name, 1, 0, offset=place.offset)),
                   (unit, ParamSlice(norm.norm.name, 2, 0, offset=place.offset))]
    if t.view.is_const(norm.merge.input[1]):  # the shape back written out (a fixed batch)
        t.group.shape_edits.append(ShapeEdit(norm.merge.name, 1, 1, 1))
    t.add(norm.split.input[0], place, norm.split.name)
    t.add(norm.merge.output[0], place, norm.merge.name)


# Channel-wise ops: the data inputs and the first output carry the same channels.

def _channelwise_rule(operands: Operands, channels_last: bool = False, when: Picker | None = None) -> Rule:
    handle = partial(_channelwise, operands=operands)
    return Rule(handle, handle, channels_last=channels_last, when=when)


def _channelwise(t: Tracer, node: NodeProto, tensor: str, operands: Operands) -> None:
    """Through an op whose data inputs and first output all carry the same channels."""
    view, op, name = t.view, node.op_type, node.name
    place = t.layout[tensor]
    shape = view.shape(tensor)
    flat = place.block > 1 or (shape is not None and len(shape) == 2)
    only_first_output_used(view, node)
    data = [node.input[0]]
    found = operands(t, node, tensor, place, flat)
    if found is not None:
        data = found
    if tensor not in data and tensor != node.output[0]:
        raise Frozen(f"{op} node '{name}' takes these channels as a parameter input")
    for x in data:
        t.add(x, place, name)
    t.add(node.output[0], place, name)


@channelwise(*BINARY, channels_last=True)
def _binary(t: Tracer, node: NodeProto, tensor: str, place: Place, flat: bool) -> list[str]:
    """Constant operands are broadcast or sliced per channel; computed ones carry the channels
    (data inputs) or are broadcast over them."""
    data = []
    for idx, other in enumerate(node.input):
        if not other:
            continue
        if t.view.is_const(other):
            per_channel_const(t.view, node, idx, tensor, t.group, place)
        elif other == tensor or other in t.layout or carries_channels(t.view, other, tensor, place, node.name):
            data.append(other)
    return data


@channelwise("InstanceNormalization", when=_as_group_norm)
@channelwise("BatchNormalization")
@channelwise(*UNARY, channels_last=True)
def _const_params(t: Tracer, node: NodeProto, tensor: str, place: Place, flat: bool) -> None:
    """Parameters must be constants; a norm's are sliced per channel."""
    if any(not t.view.is_const(i) for i in node.input[1:] if i):
        raise Frozen(f"{node.op_type} node '{node.name}' takes a computed parameter")
    t.group.slices += [ParamSlice(node.name, idx, 0, offset=place.offset)
                       for idx in PER_CHANNEL_PARAMS.get(node.op_type, ())]


@channelwise(*POOL)
def _pool(t: Tracer, node: NodeProto, tensor: str, place: Place, flat: bool) -> None:
    if flat:
        raise Frozen(f"{node.op_type} node '{node.name}' on flattened channels")


@channelwise("Pad")
def _pad(t: Tracer, node: NodeProto, tensor: str, place: Place, flat: bool) -> None:
    pad_keeps_channels(t.view, node)


@channelwise("Resize", "Upsample")
def _resize(t: Tracer, node: NodeProto, tensor: str, place: Place, flat: bool) -> None:
    resize_keeps_channels(t.view, node, tensor, t.group)


def _grouped_conv(t: Tracer, node: NodeProto, tensor: str, place: Place, flat: bool) -> None:
    """A depthwise or grouped Conv that writes as many channels as it reads (see `conv_unit`)."""
    name, group, unit = node.name, t.group, conv_unit(t.view, node)
    if flat:
        raise Frozen(f"depthwise or grouped Conv node '{name}' on flattened channels")
    group.slices += [ParamSlice(name, 1, 0, offset=place.offset), ParamSlice(name, 2, -1, offset=place.offset)]
    group.group_attrs.append(name)
    if unit > 1:
        t.units.setdefault(unit, f"Conv node '{name}'")


GROUPED_CONV = _channelwise_rule(_grouped_conv)


# Linear layers: read by the group (consumers) or writing it (producers).

def _as_grouped_conv(view: GraphView, node: NodeProto) -> Rule | None:
    return GROUPED_CONV if conv_unit(view, node) else None


def _write_linear(t: Tracer, node: NodeProto, tensor: str) -> None:
    t.produce(node)


@rule(*LINEAR, backward=_write_linear, once="direction", repeats=True, channels_last=True, when=_as_grouped_conv)
def _read_linear(t: Tracer, node: NodeProto, tensor: str) -> None:
    _reads(t, node, tensor, consumer(t.view, node, tensor, t.layout[tensor]))


@rule(*RECURRENT, channels_last=True)
def _read_recurrent(t: Tracer, node: NodeProto, tensor: str) -> None:
    """An LSTM, GRU or RNN reading the channels as the features of its input sequence: the
    input projection (W) is a linear layer like any other; the recurrence does not see them."""
    _reads(t, node, tensor, recurrent_consumer(t.view, node, tensor, t.layout[tensor]))


def _reads(t: Tracer, node: NodeProto, tensor: str, reader: Consumer) -> None:
    place = t.layout[tensor]
    t.group.consumers.append(reader)
    if place.offset or place.width != t.group.size:
        t.coupled(f"concatenated with other channels before '{node.name}'")


# Ops that join or part channels: Concat, Split, Slice.

def _concat_back(t: Tracer, node: NodeProto, tensor: str) -> None:
    """Reached from its output (a residual Add whose branch ends in a Concat of convs: MixNet's
    split pointwise convs): the channels come from the one input that holds them, or, where
    they span several, the first producer's channels are divided along the Concat's inputs."""
    view, place = t.view, t.layout[tensor]
    shape, axis = view.shape(tensor), view.attr(node, "axis", 1)
    widths = [(view.shape(i) or (None, None))[1] for i in node.input]
    if place.block != 1 or place.last or place.also or shape is None or len(shape) < 3 \
            or axis % len(shape) != 1 or None in widths:
        raise Frozen(f"Concat node '{node.name}' writes these channels and is not understood by the analysis")
    starts = [sum(widths[:k]) for k in range(len(widths))]
    first, end = place.offset, place.offset + t.group.size
    k = next((k for k, (s, w) in enumerate(zip(starts, widths)) if s <= first and end <= s + w), None)
    if k is None:
        t.divide(node, (first, end), place.width, list(zip(starts, widths)))
    if list(node.input).count(node.input[k]) > 1:
        raise Frozen(f"Concat node '{node.name}' writes these channels twice")
    t.add(node.input[k], Place(1, first - starts[k], widths[k]), node.name)
    _concat(t, node, node.input[k])


@rule("Concat", backward=_concat_back)
def _concat(t: Tracer, node: NodeProto, tensor: str) -> None:
    """Concat on the channel axis: the same channels, shifted by the widths of earlier inputs."""
    view, place = t.view, t.layout[tensor]
    shape = view.shape(node.output[0])
    axis = view.attr(node, "axis", 1)
    if place.block != 1 or shape is None or len(shape) < 3 or axis % len(shape) != 1:
        raise Frozen(f"Concat node '{node.name}' joins along an axis other than the channels")
    widths = [(view.shape(i) or (None, None))[1] for i in node.input]
    if None in widths or shape[1] is None:
        raise Frozen(f"channel counts unknown at Concat node '{node.name}'")
    carriers = t.repeats.get(node.name, [tensor])  # every input holding the group, once traced
    offsets = [sum(widths[:k]) + place.offset for k, name in enumerate(node.input) if name in carriers]
    t.concats.append(node)
    t.coupled(f"concatenated with other channels at '{node.name}'")
    t.add(node.output[0], Place(1, offsets[0], int(shape[1]), also=tuple(offsets[1:])), node.name)


@rule("Split")
def _split(t: Tracer, node: NodeProto, tensor: str) -> None:
    """Split on the channel axis into parts of constant sizes (CSP and YOLO blocks): the group
    goes on in the part that holds it, whose size is edited as its channels go. A group that
    is the whole split tensor is divided: each part is traced as a group of its own."""
    view, place, group = t.view, t.layout[tensor], t.group
    shape = view.shape(tensor)
    if node.input[0] != tensor or shape is None or len(shape) < 2 or shape[1] is None or place.block != 1 \
            or view.attr(node, "axis", 0) % len(shape) != 1:
        raise Frozen(f"Split node '{node.name}' splits an axis other than the channels")
    if len(node.input) < 2 or not node.input[1] or not view.is_const(node.input[1]):
        raise Frozen(f"Split node '{node.name}' has no constant part sizes to edit")
    sizes = [int(v) for v in view.const(node.input[1]).ravel()]
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    first, end = place.offset, place.offset + group.size
    part = next((k for k, (s, n) in enumerate(zip(starts, sizes)) if s <= first and end <= s + n), None)
    if part is None:
        t.divide(node, (first, end), shape[1], list(zip(starts, sizes)))
    group.shape_edits.append(ShapeEdit(node.name, 1, part, 1))
    t.add(node.output[part], Place(1, first - starts[part], sizes[part]), node.name)


def _slice_back(t: Tracer, node: NodeProto, tensor: str) -> None:
    """Reached from its output: the channels are a part of the Slice's input (DPN adds one
    part of a conv's output to the residual stream and concatenates the other), placed at
    the Slice's start; from the input on, the Slice is traced as any other."""
    place, source = t.layout[tensor], node.input[0]
    bounds = slice_bounds(t.view, node, source)
    if bounds is not None:
        if place.block != 1 or place.last or place.also or place.width != bounds[1] - bounds[0]:
            raise Frozen(f"Slice node '{node.name}' writes flattened or repeated channels")
        place = Place(1, bounds[0] + place.offset, t.view.shape(source)[1])
    t.add(source, place, node.name)
    if bounds is not None:
        _slice(t, node, source)


@rule("Slice", backward=_slice_back, repeats=True)
def _slice(t: Tracer, node: NodeProto, tensor: str) -> None:
    """A Slice of other axes passes the channels on. One of the channel axis (constant bounds,
    step 1) takes a part of them, as a Split would (torch.chunk through the TorchScript
    exporter): the group goes on if it lies in the part, is divided like a Split's input if
    it is the whole tensor, and every channel Slice of the tensor after the group shifts."""
    view, place, group = t.view, t.layout[tensor], t.group
    if node.input[0] != tensor:
        raise Frozen(f"Slice node '{node.name}' takes these channels as a parameter input")
    bounds = slice_bounds(view, node, tensor)
    if bounds is None:
        t.add(node.output[0], place, node.name)
        return
    if place.block != 1 or place.last:
        raise Frozen(f"Slice node '{node.name}' takes part of flattened channels")
    width, (start, stop, _) = view.shape(tensor)[1], bounds
    first, end = place.offset, place.offset + group.size
    places = (first, *place.also)  # where a Concat that took these channels more than once holds them
    inside = [start <= p and p + group.size <= stop for p in places]
    if all(inside):
        if (tensor, "slices") not in t.seen:  # every channel Slice of this tensor, once
            t.seen.add((tensor, "slices"))
            _shift_slices(t, tensor, places, width)
        t.add(node.output[0], Place(1, first - start, stop - start, also=tuple(p - start for p in place.also)),
              node.name)
        return
    if place.also and (any(inside) or not all(p + group.size <= start or stop <= p for p in places)):
        raise Frozen(f"Slice node '{node.name}' keeps only some of the places of these channels")
    if stop <= first or end <= start:
        return  # another part of the channels
    cuts = sorted({0, width} | {b for other in view.consumers.get(tensor, []) if other.op_type == "Slice"
                                for b in (slice_bounds(view, other, tensor) or (0, width, 0))[:2]})
    t.divide(node, (first, end), width, [(a, b - a) for a, b in zip(cuts, cuts[1:])])


def _shift_slices(t: Tracer, tensor: str, places: tuple[int, ...], width: int) -> None:
    """Every channel Slice of `tensor` whose bounds lie after places of the group has them
    edited, by one per place before them, as the group loses channels."""
    view, group = t.view, t.group
    for other in view.consumers.get(tensor, []):
        other_bounds = slice_bounds(view, other, tensor) if other.op_type == "Slice" else None
        if other_bounds is None:
            continue
        o_start, _, pos = other_bounds
        o_end = int(view.const(other.input[2]).ravel()[pos])
        before_start = sum(p + group.size <= o_start for p in places)
        if before_start:
            group.shape_edits.append(ShapeEdit(other.name, 1, pos, before_start))
        before_end = sum(p + group.size <= o_end for p in places)
        if before_end and o_end <= width:  # an end past the channel count stays "to the end"
            group.shape_edits.append(ShapeEdit(other.name, 2, pos, before_end))


# Layout ops: forward only, with the channels as their data input.

@layout("Flatten")
def _flatten(t: Tracer, node: NodeProto, tensor: str) -> None:
    if t.view.attr(node, "axis", 1) != 1:
        raise Frozen(f"Flatten node '{node.name}' with axis != 1")
    place = t.layout[tensor]
    t.add(node.output[0], replace(place, block=place.block * spatial(t.view, tensor, node.name)), node.name)


@layout("Reshape", when=_as_group_norm)
def _reshape(t: Tracer, node: NodeProto, tensor: str) -> None:
    place = t.layout[tensor]
    t.add(node.output[0], replace(place, block=reshape_block(t.view, node, tensor, place, t.group)), node.name)


@layout("Squeeze", "Unsqueeze")
def _squeeze(t: Tracer, node: NodeProto, tensor: str) -> None:
    place = t.layout[tensor]
    t.add(node.output[0], replace(place, block=squeeze_block(t.view, node, tensor, place)), node.name)


def _transpose_back(t: Tracer, node: NodeProto, tensor: str) -> None:
    t.add(node.input[0], transposed_place(t.view, node, tensor, t.layout[tensor], forward=False), node.name)


@rule("Transpose", backward=_transpose_back, channels_last=True)
def _transpose(t: Tracer, node: NodeProto, tensor: str) -> None:
    """A constant permutation moves the channel axis; the channels go on where it lands on axis
    1 or on the last axis (a sequence's features)."""
    t.add(node.output[0], transposed_place(t.view, node, tensor, t.layout[tensor], forward=True), node.name)


@layout("ReduceMean", "ReduceMax", "ReduceSum")
def _reduce(t: Tracer, node: NodeProto, tensor: str) -> None:
    place = t.layout[tensor]
    t.add(node.output[0], replace(place, block=reduce_block(t.view, node, tensor, place.block)), node.name)


@layout("Shape")
def _shape(t: Tracer, node: NodeProto, tensor: str) -> None:
    shape_batch_only(t.view, node)
