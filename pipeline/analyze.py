"""Channel groups traced on the ONNX graph: which channels can go, and where they live.

A group is one set of channels made by a linear layer (its *producer*), carried through
channel-wise ops, and read by the linear layers that consume it. Removing channel j means
slicing index j out of every producer-side parameter and every consumer's input weights.
Whatever the trace does not understand freezes the group, with the reason kept, so that an
unknown graph yields fewer pruned channels, never a wrong model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

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
    """Input `index` of `node` holds one entry (or `block` entries) per channel along `axis`."""

    node: str
    index: int
    axis: int
    block: int = 1


@dataclass(frozen=True)
class Consumer:
    """A linear layer reading the group: Conv (kind 'conv') or Gemm/MatMul (kind 'gemm').

    `in_axis` is the axis of its ONNX weight that holds input channels, `block` how many
    consecutive input features one channel spans (H*W after a Flatten, else 1).
    """

    node: str
    kind: str
    in_axis: int
    block: int = 1


@dataclass(frozen=True)
class ShapeEdit:
    """Entry `position` of the constant shape at input `index` of `node` is channels x `block`."""

    node: str
    index: int
    position: int
    block: int


@dataclass
class ChannelGroup:
    id: int
    producer: str
    size: int
    tensors: list[str] = field(default_factory=list)
    slices: list[ParamSlice] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    shape_edits: list[ShapeEdit] = field(default_factory=list)
    reason: str = ""  # why it is frozen; empty when prunable

    @property
    def prunable(self) -> bool:
        return not self.reason

    def to_json(self) -> dict:
        return {"id": self.id, "producer": self.producer, "channels": self.size,
                "consumers": [c.node for c in self.consumers], "prunable": self.prunable,
                "reason": self.reason or None, "tensors": len(self.tensors)}


class _Frozen(Exception):
    """Raised inside a trace to freeze the group with a reason."""


def find_groups(view: GraphView) -> list[ChannelGroup]:
    """Every channel group in producer order, prunable or frozen with a reason."""
    groups = []
    for node in view.graph.node:
        start = _producer_start(view, node)
        if start is None:
            continue
        size, slices = start
        group = ChannelGroup(id=len(groups), producer=node.name, size=size, slices=slices)
        try:
            _trace(view, node, group)
        except _Frozen as why:
            group.reason = str(why)
        except (IndexError, KeyError, ValueError, TypeError) as exc:  # a malformed node the checker let by
            group.reason = f"malformed graph near '{node.name}' ({type(exc).__name__}: {exc})"
        groups.append(group)
    return groups


def _producer_start(view: GraphView, node: NodeProto) -> tuple[int, list[ParamSlice]] | None:
    """(channels, output-side slices) for a linear layer with constant weights, else None.

    The bias slot (input 2) is always listed, on its last axis: a consumer refit may add a
    bias the exported model did not have, and a broadcast bias of length 1 is left alone.
    """
    if len(node.input) < 2 or not view.is_const(node.input[1]) or not node.output:
        return None
    rank = len(view.initializers[node.input[1]].dims)
    if node.op_type == "Conv" and rank >= 3:
        if view.attr(node, "group", 1) != 1:
            return None  # output channels of a grouped conv are tied to its inputs
        w = view.initializers[node.input[1]]
        return int(w.dims[0]), [ParamSlice(node.name, 1, 0), ParamSlice(node.name, 2, -1)]
    if node.op_type == "Gemm" and rank == 2 and not view.attr(node, "transA", 0):
        if len(node.input) > 2 and node.input[2] and not view.is_const(node.input[2]):
            return None
        w = view.initializers[node.input[1]]
        axis = 0 if view.attr(node, "transB", 0) else 1
        return int(w.dims[axis]), [ParamSlice(node.name, 1, axis), ParamSlice(node.name, 2, -1)]
    if node.op_type == "MatMul" and rank == 2:
        w = view.initializers[node.input[1]]
        if view.shape(node.input[0]) is not None and len(view.shape(node.input[0])) == 2:
            return int(w.dims[1]), [ParamSlice(node.name, 1, 1)]
    return None


def _trace(view: GraphView, producer: NodeProto, group: ChannelGroup) -> None:
    """Walk forward from the producer through channel-wise ops to the consuming layers."""
    start = producer.output[0]
    rank = len(view.shape(start) or ())
    layout = {start: 1}  # tensor -> features per channel: 1 on the channel axis of an NC... tensor
    pending = [start]
    binary_inputs: list[tuple[NodeProto, str]] = []
    while pending:
        tensor = pending.pop()
        group.tensors.append(tensor)
        if tensor in view.outputs:
            raise _Frozen(f"tensor '{tensor}' is a graph output")
        for node in view.consumers.get(tensor, []):
            for out, block in _step(view, node, tensor, layout[tensor], group, rank, binary_inputs):
                if out in layout:
                    if layout[out] != block:
                        raise _Frozen(f"node '{node.name}' mixes layouts of the same channels")
                    continue
                layout[out] = block
                pending.append(out)
    for node, other in binary_inputs:
        if other not in layout:
            raise _Frozen(f"{node.op_type} node '{node.name}' joins these channels with tensor "
                          f"'{other}' from another producer (residual-style coupling)")
    if not group.consumers:
        raise _Frozen("no linear layer consumes these channels")


def _step(view: GraphView, node: NodeProto, tensor: str, block: int, group: ChannelGroup,
          rank: int, binary_inputs: list) -> list[tuple[str, int]]:
    """Where the channels go through `node`: [(output tensor, block)], or freeze."""
    op, name = node.op_type, node.name
    flat = block > 1 or rank == 2
    if op in UNARY or op in PER_CHANNEL_PARAMS:
        if node.input[0] != tensor or any(not view.is_const(i) for i in node.input[1:] if i):
            raise _Frozen(f"{op} node '{name}' takes these channels as a parameter input")
        for idx in PER_CHANNEL_PARAMS.get(op, ()):
            group.slices.append(ParamSlice(name, idx, 0))
        _only_first_output_used(view, node)
        return [(node.output[0], block)]
    if op in POOL:
        if flat:
            raise _Frozen(f"{op} node '{name}' on flattened channels")
        _only_first_output_used(view, node)
        return [(node.output[0], block)]
    if op in BINARY:
        for idx, other in enumerate(node.input):
            if other == tensor or not other:
                continue
            if view.is_const(other):
                _per_channel_const(view, node, idx, tensor, group, block)
            else:
                binary_inputs.append((node, other))
        return [(node.output[0], block)]
    if op in ("Conv", "Gemm", "MatMul"):
        group.consumers.append(_consumer(view, node, tensor, block))
        return []
    if op == "Flatten":
        if view.attr(node, "axis", 1) != 1:
            raise _Frozen(f"Flatten node '{name}' with axis != 1")
        return [(node.output[0], block * _spatial(view, tensor, name))]
    if op == "Reshape":
        return [(node.output[0], _reshape_block(view, node, tensor, block, group))]
    if op in ("ReduceMean", "ReduceMax", "ReduceSum"):
        return [(node.output[0], _reduce(view, node, tensor, block))]
    if op in ("Pad", "Resize", "Upsample"):
        _channel_axis_untouched(view, node, tensor)
        return [(node.output[0], block)]
    if op == "Shape":
        return _shape_batch_only(view, node)
    raise _Frozen(f"{op} node '{name}' is not understood by the channel analysis")


def _only_first_output_used(view: GraphView, node: NodeProto) -> None:
    for extra in node.output[1:]:
        if extra and (view.consumers.get(extra) or extra in view.outputs):
            raise _Frozen(f"{node.op_type} node '{node.name}' has a second output in use")


def _per_channel_const(view: GraphView, node: NodeProto, idx: int, tensor: str,
                       group: ChannelGroup, block: int) -> None:
    """A constant operand broadcast against the channels: scalar-like, or sliced per channel."""
    cshape = view.shape(node.input[idx]) or ()
    tshape = view.shape(tensor)
    if tshape is None:
        raise _Frozen(f"rank of '{tensor}' unknown at {node.op_type} node '{node.name}'")
    axis_from_right = len(tshape) - 1 if block == 1 and len(tshape) > 2 else 0
    pos = len(cshape) - 1 - axis_from_right
    if pos < 0 or cshape[pos] == 1:
        if block > 1 and cshape and cshape[-1] != 1:
            raise _Frozen(f"{node.op_type} node '{node.name}' has a per-feature constant on flattened channels")
        return
    if node.op_type == "PRelu" and len(cshape) == 1 and pos == 0 and len(tshape) > 2:
        raise _Frozen(f"PRelu node '{node.name}' slope broadcasts over the last axis")
    if cshape[pos] != group.size * block:
        raise _Frozen(f"{node.op_type} node '{node.name}' constant of shape {cshape} does not "
                      f"broadcast per channel")
    group.slices.append(ParamSlice(node.name, idx, pos, block))


def _consumer(view: GraphView, node: NodeProto, tensor: str, block: int) -> Consumer:
    name = node.name
    if node.input[0] != tensor or len(node.input) < 2 or not view.is_const(node.input[1]):
        raise _Frozen(f"{node.op_type} node '{name}' reads these channels other than as its data input")
    if node.op_type == "Conv":
        w = view.initializers[node.input[1]]
        if view.attr(node, "group", 1) != 1:
            raise _Frozen(f"grouped Conv node '{name}' couples input and output channels")
        if len(w.dims) != 4 or block != 1:
            raise _Frozen(f"Conv node '{name}' is not a 2-D convolution on channels")
        return Consumer(name, "conv", in_axis=1)
    if node.op_type == "Gemm":
        if view.attr(node, "transA", 0):
            raise _Frozen(f"Gemm node '{name}' uses transA")
        return Consumer(name, "gemm", in_axis=1 if view.attr(node, "transB", 0) else 0, block=block)
    if len(view.initializers[node.input[1]].dims) != 2 or len(view.shape(tensor) or ()) != 2:
        raise _Frozen(f"MatMul node '{name}' is not a 2-D matrix product")
    return Consumer(name, "gemm", in_axis=0, block=block)


def _spatial(view: GraphView, tensor: str, where: str) -> int:
    shape = view.shape(tensor)
    if shape is None or any(d is None for d in shape[2:]):
        raise _Frozen(f"spatial size of '{tensor}' unknown at '{where}'")
    size = 1
    for d in shape[2:]:
        size *= d
    return size


def _reshape_block(view: GraphView, node: NodeProto, tensor: str, block: int,
                   group: ChannelGroup) -> int:
    """Reshape to (batch, -1) or (-1, C*H*W) flattens channels; anything else is frozen."""
    if node.input[0] != tensor or not view.is_const(node.input[1]):
        raise _Frozen(f"Reshape node '{node.name}' has a computed target shape")
    target = [int(v) for v in view.const(node.input[1]).ravel()]
    batch = (view.shape(tensor) or (None,))[0]
    per_channel = block * _spatial(view, tensor, node.name)
    if len(target) == 2 and target[1] == -1 and (target[0] == 0 or (batch and target[0] == batch)):
        return per_channel
    if len(target) == 2 and target[0] == -1 and target[1] == group.size * per_channel:
        group.shape_edits.append(ShapeEdit(node.name, 1, 1, per_channel))
        return per_channel
    raise _Frozen(f"Reshape node '{node.name}' to {target} is not a plain flatten")


def _reduce(view: GraphView, node: NodeProto, tensor: str, block: int) -> int:
    axes = view.attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        if not view.is_const(node.input[1]):
            raise _Frozen(f"{node.op_type} node '{node.name}' has computed axes")
        axes = [int(a) for a in view.const(node.input[1]).ravel()]
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


def _channel_axis_untouched(view: GraphView, node: NodeProto, tensor: str) -> None:
    """Pad and Resize are channel-wise only if they leave axes 0 and 1 alone."""
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
        raise _Frozen(f"Resize node '{node.name}' gives output sizes, which include the channels")
    scales = node.input[scales_idx] if len(node.input) > scales_idx else ""
    if not scales or not view.is_const(scales):
        raise _Frozen(f"{node.op_type} node '{node.name}' has computed scales")
    values = view.const(scales).ravel()
    if len(values) < 2 or values[0] != 1 or values[1] != 1:
        raise _Frozen(f"{node.op_type} node '{node.name}' scales the batch or channel axis")


def _shape_batch_only(view: GraphView, node: NodeProto) -> list:
    """Shape -> Gather(index 0) reads only the batch size, which pruning leaves alone."""
    for user in view.consumers.get(node.output[0], []):
        ok = (user.op_type == "Gather" and view.attr(user, "axis", 0) == 0
              and view.is_const(user.input[1]) and view.const(user.input[1]).ravel().tolist() == [0])
        if not ok:
            raise _Frozen(f"Shape node '{node.name}' reads the channel count")
    if node.output[0] in view.outputs:
        raise _Frozen(f"Shape node '{node.name}' is a graph output")
    return []
