"""What the rules read from the graph: functions of the view and a node that return a fact (a
linear layer's width, a block, bounds, a matched pattern) or raise Frozen with the reason.
A few also record on the group the edits that the fact implies (a per-channel constant's
slice, a written-out shape entry)."""
from __future__ import annotations

from dataclasses import dataclass, replace

from onnx import NodeProto

from pipeline.analyze.model import ChannelGroup, Consumer, Frozen, ParamSlice, Place, ShapeEdit
from pipeline.graph import GraphView


def producer_start(view: GraphView, node: NodeProto) -> tuple[int, list[ParamSlice]] | None:
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
class GroupNorm:
    """GroupNorm as both torch exporters write it: Reshape(x, (N, G, -1)), InstanceNormalization
    of those G rows, Reshape back to x's shape (read at run time, or written out); the
    per-channel scale and shift follow as a Mul and an Add."""

    split: NodeProto
    norm: NodeProto
    merge: NodeProto
    groups: int


def group_norm(view: GraphView, node: NodeProto) -> GroupNorm | None:
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
    return GroupNorm(split, norm, merge, target[1])


def _sole_reader(view: GraphView, tensor: str, op: str) -> NodeProto | None:
    """The one node reading `tensor`, as its data input, if it is an `op`."""
    readers = view.consumers.get(tensor, [])
    if tensor in view.outputs or len(readers) != 1 or readers[0].op_type != op or readers[0].input[0] != tensor:
        return None
    return readers[0]


def conv_unit(view: GraphView, node: NodeProto) -> int:
    """Channels per group of a grouped Conv that writes as many channels as it reads: 1 for a
    depthwise Conv, the group width for ResNeXt's and RegNet's (C -> C in groups); 0 for any
    other node. Such a Conv is channel-wise at the scale of its groups: removing a whole group
    of inputs removes the matching outputs (its weights sliced along axis 0) and nothing else."""
    if node.op_type != "Conv" or len(node.input) < 2 or not view.is_const(node.input[1]):
        return 0
    w = view.initializers[node.input[1]].dims
    groups = view.attr(node, "group", 1)
    return int(w[1]) if groups > 1 and len(w) >= 3 and w[0] == groups * w[1] else 0


def carries_channels(view: GraphView, other: str, tensor: str, place: Place, where: str) -> bool:
    """Whether a computed operand of a binary op holds these channels (True) or is broadcast
    over them (False: a scalar or a one-channel map, left alone by pruning)."""
    tshape, oshape = view.shape(tensor), view.shape(other)
    if tshape is None or oshape is None:
        raise Frozen(f"shapes unknown at node '{where}'")
    if place.block > 1:
        raise Frozen(f"node '{where}' joins flattened channels with another tensor")
    pos = len(oshape) - (len(tshape) - 1) if len(tshape) > 2 and not place.last else len(oshape) - 1
    if pos < 0 or oshape[pos] == 1:
        return False
    if oshape[pos] != place.width:
        raise Frozen(f"node '{where}' joins these channels with '{other}' of another width")
    return True


def only_first_output_used(view: GraphView, node: NodeProto) -> None:
    """Freezes a node whose outputs past the first are read (only the first carries the channels)."""
    for extra in node.output[1:]:
        if extra and (view.consumers.get(extra) or extra in view.outputs):
            raise Frozen(f"{node.op_type} node '{node.name}' has a second output in use")


def per_channel_const(view: GraphView, node: NodeProto, idx: int, tensor: str,
                      group: ChannelGroup, place: Place) -> None:
    """A constant operand broadcast against the channels: scalar-like, or sliced per channel."""
    cshape = view.shape(node.input[idx]) or ()
    tshape = view.shape(tensor)
    if tshape is None:
        raise Frozen(f"rank of '{tensor}' unknown at {node.op_type} node '{node.name}'")
    block = place.block
    axis_from_right = len(tshape) - 2 if block == 1 and len(tshape) > 2 and not place.last else 0  # H, W of NCHW
    pos = len(cshape) - 1 - axis_from_right
    if pos < 0 or cshape[pos] == 1:
        if block > 1 and cshape and cshape[-1] != 1:
            raise Frozen(f"{node.op_type} node '{node.name}' has a per-feature constant on flattened channels")
        return
    if node.op_type == "PRelu" and len(cshape) == 1 and pos == 0 and len(tshape) > 2:
        raise Frozen(f"PRelu node '{node.name}' slope broadcasts over the last axis")
    if cshape[pos] != place.width * block:
        raise Frozen(f"{node.op_type} node '{node.name}' constant of shape {cshape} does not "
                     f"broadcast per channel")
    group.slices.append(ParamSlice(node.name, idx, pos, block, place.offset))


def consumer(view: GraphView, node: NodeProto, tensor: str, place: Place) -> Consumer:
    """How a linear layer reads the group from `tensor`; freezes a read that cannot be refit."""
    name, block, offset = node.name, place.block, place.offset
    if node.input[0] != tensor or len(node.input) < 2 or not view.is_const(node.input[1]):
        raise Frozen(f"{node.op_type} node '{name}' reads these channels other than as its data input")
    if node.op_type == "ConvTranspose":
        return deconv_consumer(view, node, place)
    if place.last != (node.op_type == "MatMul" and len(view.shape(tensor) or ()) > 2):
        raise Frozen(f"{node.op_type} node '{name}' reads these channels on another axis")
    if node.op_type == "Conv":
        w = view.initializers[node.input[1]]
        if view.attr(node, "group", 1) != 1:
            raise Frozen(f"grouped Conv node '{name}' couples input and output channels")
        if len(w.dims) not in (3, 4) or block != 1:
            raise Frozen(f"Conv node '{name}' is not a 1-D or 2-D convolution on channels")
        return Consumer(name, "conv", in_axis=1, offset=offset, extra=place.also)
    if node.op_type == "Gemm":
        if view.attr(node, "transA", 0):
            raise Frozen(f"Gemm node '{name}' uses transA")
        return Consumer(name, "gemm", in_axis=1 if view.attr(node, "transB", 0) else 0, block=block, offset=offset,
                        extra=place.also)
    if len(view.initializers[node.input[1]].dims) != 2 or len(view.shape(tensor) or ()) < 2:
        raise Frozen(f"MatMul node '{name}' does not multiply by a constant matrix")
    return Consumer(name, "gemm", in_axis=0, block=block, offset=offset, extra=place.also)


def recurrent_consumer(view: GraphView, node: NodeProto, tensor: str, place: Place) -> Consumer:
    """An LSTM, GRU or RNN reading the group as the features (last axis) of its input sequence:
    its W, (directions, gates x hidden, inputs), holds a column per channel."""
    name = node.name
    if node.input[0] != tensor or not place.last or place.block != 1 or len(view.shape(tensor) or ()) != 3:
        raise Frozen(f"{node.op_type} node '{name}' reads these channels other than as the features of its sequence")
    if not view.is_const(node.input[1]) or (len(node.input) > 3 and node.input[3] and not view.is_const(node.input[3])):
        raise Frozen(f"{node.op_type} node '{name}' has computed weights")
    return Consumer(name, "rnn", in_axis=2, offset=place.offset, extra=place.also)


def transposed_place(view: GraphView, node: NodeProto, tensor: str, place: Place, forward: bool) -> Place:
    """Where a Transpose puts the channels of `tensor` (its input if `forward`, else its output):
    on axis 1 or on the last axis of the other side; anywhere else freezes."""
    shape = view.shape(tensor)
    if shape is None or place.block != 1:
        raise Frozen(f"Transpose node '{node.name}' of flattened channels or of unknown rank")
    rank = len(shape)
    perm = [int(p) for p in view.attr(node, "perm", list(range(rank))[::-1])]
    axis = rank - 1 if place.last else 1
    moved = perm.index(axis) if forward else perm[axis]
    if moved not in (1, rank - 1):
        raise Frozen(f"Transpose node '{node.name}' moves the channels to axis {moved}")
    return replace(place, last=moved != 1)


def deconv_consumer(view: GraphView, node: NodeProto, place: Place) -> Consumer:
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
        raise Frozen(f"ConvTranspose node '{node.name}' reads these channels with overlapping or padded "
                     f"patches; only a stride equal to its kernel is refit")
    return Consumer(node.name, "deconv", in_axis=0, offset=place.offset, extra=place.also)


def spatial(view: GraphView, tensor: str, where: str) -> int:
    """H*W (the product of the dims after the channels) of `tensor`; freezes if unknown."""
    shape = view.shape(tensor)
    if shape is None or any(d is None for d in shape[2:]):
        raise Frozen(f"spatial size of '{tensor}' unknown at '{where}'")
    size = 1
    for d in shape[2:]:
        size *= d
    return size


def reshape_block(view: GraphView, node: NodeProto, tensor: str, place: Place,
                  group: ChannelGroup) -> int:
    """A Reshape that keeps the batch and flattens the rest, as Flatten does: to (batch, -1),
    or to (batch or -1, C*H*W) with the feature count written out (edited when channels go;
    other groups concatenated into the same tensor edit it too); or (N, C) back to (N, C, 1, 1).
    Anything else is frozen."""
    if node.input[0] != tensor or not view.is_const(node.input[1]):
        raise Frozen(f"Reshape node '{node.name}' has a computed target shape")
    target = [int(v) for v in view.const(node.input[1]).ravel()]
    shape = view.shape(tensor) or (None, None)
    hw = spatial(view, tensor, node.name)
    keeps_batch = view.reshape_keeps_batch(node, target)
    trailing_ones = len(target) > 2 and hw == 1 and all(d == 1 for d in target[2:])  # (N, C) -> (N, C, 1, 1)
    if (len(target) == 2 or trailing_ones) and not place.last:
        if keeps_batch and target[1] == -1:
            return place.block * hw
        if (keeps_batch or target[0] == -1) and shape[1] is not None and target[1] == shape[1] * hw:
            group.shape_edits.append(ShapeEdit(node.name, 1, 1, place.block * hw))
            return place.block * hw
    raise Frozen(f"Reshape node '{node.name}' to {target} is not a plain flatten")


def _axes(view: GraphView, node: NodeProto) -> list[int] | None:
    """A reduce's or (un)squeeze's axes: an attribute before opset 13 (18 for reduces), then an input."""
    axes = view.attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        if not view.is_const(node.input[1]):
            raise Frozen(f"{node.op_type} node '{node.name}' has computed axes")
        axes = [int(a) for a in view.const(node.input[1]).ravel()]
    return axes


def squeeze_block(view: GraphView, node: NodeProto, tensor: str, place: Place) -> int:
    """Squeeze or Unsqueeze of size-1 axes after the channels ((N, C, 1, 1) <-> (N, C), as a
    global pool's output is reshaped for a classifier or a squeeze-excitation gate)."""
    shape = view.shape(tensor)
    axes = _axes(view, node)
    if shape is None or axes is None or place.last:
        raise Frozen(f"{node.op_type} node '{node.name}' without known axes and rank")
    rank = len(shape) + (len(axes) if node.op_type == "Unsqueeze" else 0)
    axes = [a % rank for a in axes]
    if min(axes) < 2 or (node.op_type == "Squeeze" and any(shape[a] != 1 for a in axes)):
        raise Frozen(f"{node.op_type} node '{node.name}' moves the batch or channel axis")
    return place.block


def reduce_block(view: GraphView, node: NodeProto, tensor: str, block: int) -> int:
    """The block after a Reduce over spatial axes only (1); freezes one over the batch or channels."""
    axes = _axes(view, node)
    rank = len(view.shape(tensor) or ())
    if not axes or block != 1 or rank < 3:
        raise Frozen(f"{node.op_type} node '{node.name}' reduces over the channels")
    axes = sorted(a % rank for a in axes)
    if 0 in axes or 1 in axes:
        raise Frozen(f"{node.op_type} node '{node.name}' reduces over the batch or channels")
    if view.attr(node, "keepdims", 1):
        return 1
    if axes != list(range(2, rank)):
        raise Frozen(f"{node.op_type} node '{node.name}' drops only some spatial axes")
    return 1


def pad_keeps_channels(view: GraphView, node: NodeProto) -> None:
    """A Pad is channel-wise only if it leaves axes 0 and 1 alone."""
    pads = view.attr(node, "pads")
    if pads is None:
        if len(node.input) < 2 or not view.is_const(node.input[1]):
            raise Frozen(f"Pad node '{node.name}' has computed pads")
        if len(node.input) > 3 and node.input[3]:
            raise Frozen(f"Pad node '{node.name}' pads selected axes only")
        pads = [int(p) for p in view.const(node.input[1]).ravel()]
    half = len(pads) // 2
    if any(pads[i] or pads[i + half] for i in (0, 1)):
        raise Frozen(f"Pad node '{node.name}' pads the batch or channel axis")


def resize_keeps_channels(view: GraphView, node: NodeProto, tensor: str, group: ChannelGroup) -> None:
    """A Resize or Upsample is channel-wise only if it leaves axes 0 and 1 alone (a Resize to
    constant sizes has its channel entry edited as the group loses channels)."""
    scales_idx = 2 if node.op_type == "Resize" else 1
    sizes_idx = 3
    if node.op_type == "Resize" and len(node.input) > sizes_idx and node.input[sizes_idx]:
        sizes, shape = node.input[sizes_idx], view.shape(tensor)
        values = view.const(sizes).ravel() if view.is_const(sizes) else None
        if values is not None and shape is not None and len(values) == len(shape) and int(values[1]) == shape[1] \
                and len(view.consumers.get(sizes, [])) == 1:
            group.shape_edits.append(ShapeEdit(node.name, sizes_idx, 1, 1))  # the dynamo exporter, fixed batch
        elif not _sizes_keep_own_channels(view, node):
            raise Frozen(f"Resize node '{node.name}' gives output sizes, which include the channels")
        return
    scales = node.input[scales_idx] if len(node.input) > scales_idx else ""
    if not scales or not view.is_const(scales):
        raise Frozen(f"{node.op_type} node '{node.name}' has computed scales")
    values = view.const(scales).ravel()
    if len(values) < 2 or values[0] != 1 or values[1] != 1:
        raise Frozen(f"{node.op_type} node '{node.name}' scales the batch or channel axis")


def slice_bounds(view: GraphView, node: NodeProto, tensor: str) -> tuple[int, int, int] | None:
    """(first channel, end, position in the starts and ends inputs) of a Slice of the channel
    axis; None if it leaves the channel axis alone."""
    shape = view.shape(tensor)
    if view.attr(node, "starts") is not None or any(i and not view.is_const(i) for i in node.input[1:]):
        raise Frozen(f"Slice node '{node.name}' has computed or attribute bounds")
    value = lambda k, default: ([int(v) for v in view.const(node.input[k]).ravel()]  # noqa: E731
                                if len(node.input) > k and node.input[k] else default)
    starts, ends = value(1, []), value(2, [])
    axes, steps = value(3, list(range(len(starts)))), value(4, [1] * len(starts))
    if shape is None or shape[1] is None:
        raise Frozen(f"channel count unknown at Slice node '{node.name}'")
    for pos, (start, end, axis, step) in enumerate(zip(starts, ends, axes, steps)):
        if axis % len(shape) == 1:
            if step != 1 or start < 0 or end < 0:
                raise Frozen(f"Slice node '{node.name}' takes channels backwards or from the end")
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


def shape_batch_only(view: GraphView, node: NodeProto) -> None:
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
        norm = group_norm(view, user) if user.op_type == "Reshape" else None
        ok = ok or (norm is not None and norm.merge is user and user.input[1] == node.output[0]
                    and norm.split.input[0] == tensor)  # a GroupNorm reshaping back to its input's shape
        if not ok and not (_own_leading_dims(view, sizes, tensor) and _feeds_own_resize_sizes(view, sizes, tensor)):
            raise Frozen(f"Shape node '{node.name}' reads the channel count")
    if node.output[0] in view.outputs:
        raise Frozen(f"Shape node '{node.name}' is a graph output")
