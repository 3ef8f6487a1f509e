"""Multi-head attention blocks whose heads can be removed whole.

A block is found from its core, a product of two activations, a Softmax over the last axis and
a product of the weights with a third activation, and from the linear layers around it: the
projections that write queries, keys and values (one fused layer or three) and the layer that
reads the merged heads. How an exporter splits and merges the heads in between (Reshape targets
computed from Shape, Transposes, the Gathers of a stacked q/k/v axis) is not parsed: the graph is
run once by onnxruntime on synthetic inputs, and the block becomes a group of whole heads only
where the plain computation from the projections' outputs reproduces the merged heads. The export
then writes the block again in plain ops for the heads kept (exporters/heads.py), so a pattern
that is not understood costs a group, never a wrong model.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import NodeProto

from pipeline.analyze.checks import consumer, producer_start
from pipeline.analyze.model import Attention, ChannelGroup, Consumer, Frozen, ParamSlice, Place
from pipeline.graph import GraphView
from pipeline.load import onnx_opset
from pipeline.runtime import first_line, make_session

LAYOUT = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Gather", "Slice", "Split", "Identity", "Flatten"}
PASS = {"Identity", "Cast", "Dropout"}  # between the Softmax and the product with the values
MIN_OPSET = 13  # Softmax over one axis, Squeeze/Unsqueeze/Split axes as inputs
TOLERANCE = 1e-4  # relative difference of the plain computation from the graph's merged heads


@dataclass
class Block:
    """What the graph says of one attention core before the probe."""

    softmax: NodeProto
    scores: NodeProto  # the product Q K^T
    values: NodeProto  # the product of the weights with V
    sources: tuple[str, str, str]  # the q, k and v projections' output tensors (after a bias Add)
    projections: tuple[str, str, str]  # the linear nodes writing them
    biases: tuple[tuple[str, int] | None, ...]  # (Add node, slot of its constant) after each projection
    scalars: list[tuple[str, bool]]  # (tensor, divides) whose product scales the scores
    mask: str
    out: NodeProto
    merged: str
    width: int  # channels of each of q, k, v
    nan_guard: bool


def find_blocks(view: GraphView) -> tuple[list[tuple[Attention, Block]], dict[str, str]]:
    """The attention blocks that can lose heads, and for the projections of the others why not."""
    found, frozen = [], {}
    cores = [n for n in view.graph.node if n.op_type == "Softmax" and _is_core(view, n)]
    if not cores:
        return found, frozen
    blocks = []
    for node in cores:
        try:
            blocks.append(_block(view, node))
        except Frozen as why:
            for name in _projections_near(view, node):
                frozen.setdefault(name, f"attention at Softmax '{node.name}': {why}")
    failed = ""
    try:
        values = _probe(view, blocks) if blocks else {}
    except Exception as exc:  # noqa: BLE001 - whatever stops the probe leaves the heads whole
        values, failed = {}, f"the probe run failed ({first_line(exc)})"
    shared = {n for n, uses in Counter(n for b in blocks for n in set(b.projections)).items() if uses > 1}
    for block in blocks:
        try:
            if failed:
                raise Frozen(failed)
            if shared & set(block.projections):
                raise Frozen(f"'{next(iter(shared & set(block.projections)))}' writes for more than one attention")
            found.append((_confirmed(view, block, values), block))
        except Frozen as reason:
            for name in block.projections:
                frozen.setdefault(name, f"attention at Softmax '{block.softmax.name}': {reason}")
    return found, frozen


def head_group(view: GraphView, att: Attention, block: Block, gid: int) -> ChannelGroup:
    """The heads of `att` as a group of units of head_dim channels: each projection's output
    sliced per section (q, k, v of a fused layer sit side by side), the output layer refit."""
    h, d = att.heads, att.head_dim
    group = ChannelGroup(id=gid, producers=list(dict.fromkeys(block.projections)), size=h, unit=d,
                         tensors=list(dict.fromkeys(block.sources)) + [att.merged], attention=att)
    for section, (name, bias) in enumerate(zip(block.projections, block.biases)):
        offset = section * h if att.fused else 0
        _, slices = producer_start(view, view.nodes[name])
        group.slices += [replace(s, block=d, offset=offset) for s in slices]
        if bias is not None:
            group.slices.append(ParamSlice(bias[0], bias[1], -1, d, offset))
    group.consumers = [replace(_consumer(view, block, att.merged_rank), block=d)]
    group.follows = [block.scores.name, block.softmax.name, block.values.name]
    return group


def _consumer(view: GraphView, block: Block, rank: int) -> Consumer:
    """How the output layer reads the merged heads (Frozen where it cannot be refit)."""
    last = rank > 2 and block.out.op_type == "MatMul"
    return consumer(view, block.out, block.merged, Place(1, 0, block.width, last=last))


def _is_core(view: GraphView, softmax: NodeProto) -> bool:
    return _scores_product(view, softmax) is not None and _values_product(view, softmax) is not None


def _scores_product(view: GraphView, softmax: NodeProto) -> NodeProto | None:
    """The product of two activations whose scaled (and masked) result the Softmax reads: the
    nearest, searched back through scalings, additions and casts (a mask's own arithmetic too)."""
    level = [softmax.input[0]]
    for _ in range(6):
        nodes = [view.producer[t] for t in level if t in view.producer]
        for node in nodes:
            if node.op_type == "MatMul" and not any(view.is_const(i) for i in node.input):
                return node
        level = [i for n in nodes if n.op_type in ("Mul", "Div", "Add", "Where", *PASS) for i in n.input]
    return None


def _values_product(view: GraphView, softmax: NodeProto) -> NodeProto | None:
    return _weights_path(view, softmax)[0]


def _weights_path(view: GraphView, softmax: NodeProto) -> tuple[NodeProto | None, bool]:
    """The product of the attention weights with the values, and whether a guard sets weights
    that came out NaN (rows masked whole) to zero on the way, as torch's exports of
    scaled_dot_product_attention do."""
    tensor, guarded = softmax.output[0], False
    for _ in range(4):
        users = view.consumers.get(tensor, [])
        guard = _nan_guard(view, tensor, users)
        if guard is not None:
            tensor, guarded = guard.output[0], True
            continue
        if len(users) != 1:
            break
        node = users[0]
        if node.op_type == "MatMul" and node.input[0] == tensor and not view.is_const(node.input[1]):
            return node, guarded
        if node.op_type not in PASS:
            break
        tensor = node.output[0]
    return None, False


def _nan_guard(view: GraphView, tensor: str, users: list[NodeProto]) -> NodeProto | None:
    """Where(IsNaN(x), 0, x) reading `tensor`, if that is all that reads it."""
    isnan = next((n for n in users if n.op_type == "IsNaN"), None)
    where = next((n for n in users if n.op_type == "Where"), None)
    if len(users) != 2 or isnan is None or where is None or where.input[0] != isnan.output[0]:
        return None
    zero = where.input[1]
    if where.input[2] != tensor or not view.is_const(zero) or np.any(view.const(zero)):
        return None
    return where


def _block(view: GraphView, softmax: NodeProto) -> Block:
    if onnx_opset(view.proto) < MIN_OPSET:
        raise Frozen(f"heads are recognised from opset {MIN_OPSET}; the model has opset {onnx_opset(view.proto)}")
    if view.attr(softmax, "axis", -1) not in (-1, len(view.shape(softmax.input[0]) or ()) - 1):
        raise Frozen("the Softmax is not over the last axis")
    scores, (values, guarded) = _scores_product(view, softmax), _weights_path(view, softmax)
    scalars: list[tuple[str, bool]] = []
    mask = _score_path(view, softmax, scores, scalars)
    q, bq, pq = _source(view, scores.input[0], scalars)
    k, bk, pk = _source(view, scores.input[1], scalars)
    no_scale: list[tuple[str, bool]] = []
    v, bv, pv = _source(view, values.input[1], no_scale)
    if no_scale:
        raise Frozen("the values are scaled on their way from the projection")
    out, merged = _reader(view, values)
    fused = q == k == v
    if not fused and len({q, k, v}) < 3:
        raise Frozen("queries, keys and values share some projections but not all")
    widths = [producer_start(view, view.nodes[p])[0] for p in (pq, pk, pv)]
    width = widths[0] // 3 if fused else widths[2]
    if (not fused and len(set(widths)) > 1) or (fused and widths[0] % 3):
        raise Frozen(f"queries, keys and values are not equally wide ({', '.join(map(str, widths))} channels)")
    return Block(softmax, scores, values, (q, k, v), (pq, pk, pv), (bq, bk, bv), scalars, mask, out, merged, width,
                 guarded)


def _score_path(view: GraphView, softmax: NodeProto, scores: NodeProto, scalars: list) -> str:
    """From the Softmax back to the scores' product: scalar scalings noted, one added mask allowed."""
    mask, tensor = "", softmax.input[0]
    while tensor != scores.output[0]:
        node = view.producer[tensor]
        if node.op_type in PASS:
            tensor = node.input[0]
            continue
        if node.op_type in ("Mul", "Div") and _is_scalar(view, node.input[1]):
            scalars.append((node.input[1], node.op_type == "Div"))
            tensor = node.input[0]
            continue
        if node.op_type == "Mul" and _is_scalar(view, node.input[0]):
            scalars.append((node.input[0], False))
            tensor = node.input[1]
            continue
        if node.op_type == "Add" and not mask:
            leads = [i for i in node.input if _reaches(view, i, scores.output[0])]
            if len(leads) == 1:
                mask = next(i for i in node.input if i != leads[0])
                tensor = leads[0]
                continue
        raise Frozen(f"{node.op_type} node '{node.name}' between the scores and the Softmax is not understood")
    return mask


def _source(view: GraphView, tensor: str, scalars: list) -> tuple[str, tuple[str, int] | None, str]:
    """Back from an operand of the attention to a projection's output: (that tensor, its bias Add
    and the Add's constant slot, the linear node)."""
    for _ in range(24):
        node = view.producer.get(tensor)
        if node is None:
            break
        if producer_start(view, node) is not None and node.op_type in ("MatMul", "Gemm"):
            return tensor, None, node.name
        if node.op_type == "Add" and len(node.input) == 2:
            const = [k for k, i in enumerate(node.input) if view.is_const(i)]
            linear = view.producer.get(node.input[1 - const[0]]) if len(const) == 1 else None
            if linear is not None and linear.op_type in ("MatMul", "Gemm") and producer_start(view, linear):
                if len(view.consumers[linear.output[0]]) != 1:
                    raise Frozen(f"the output of '{linear.name}' is read before its bias is added")
                return tensor, (node.name, const[0]), linear.name
        if node.op_type in ("Mul", "Div") and _is_scalar(view, node.input[1]):
            scalars.append((node.input[1], node.op_type == "Div"))
        elif node.op_type not in LAYOUT:
            raise Frozen(f"{node.op_type} node '{node.name}' between a projection and the attention is not understood")
        tensor = node.input[0]
    raise Frozen(f"'{tensor}' does not come from a linear layer with constant weights")


def _reader(view: GraphView, values: NodeProto) -> tuple[NodeProto, str]:
    """Forward from the product with the values through the merge of the heads to the linear
    layer that reads them: (that layer, its input)."""
    tensor = values.output[0]
    for _ in range(8):
        users = [n for n in view.consumers.get(tensor, []) if n.op_type not in ("Shape", "Size")]
        if len(users) != 1:
            break
        node = users[0]
        if node.op_type in ("MatMul", "Gemm") and node.input[0] == tensor and view.is_const(node.input[1]):
            return node, tensor
        if node.op_type not in LAYOUT or node.input[0] != tensor:
            break
        tensor = node.output[0]
    raise Frozen("the merged heads do not reach one linear layer")


def _is_scalar(view: GraphView, tensor: str) -> bool:
    dims = view.shape(tensor)
    return dims is not None and None not in dims and int(np.prod(dims, dtype=np.int64)) == 1


def _reaches(view: GraphView, tensor: str, target: str, depth: int = 6) -> bool:
    if tensor == target:
        return True
    node = view.producer.get(tensor)
    return depth > 0 and node is not None and any(_reaches(view, i, target, depth - 1) for i in node.input)


def _projections_near(view: GraphView, softmax: NodeProto) -> list[str]:
    """The linear layers a frozen core reads from, for the reason their own groups give."""
    scores, values = _scores_product(view, softmax), _values_product(view, softmax)  # a core has both
    names, stack, seen = [], [*softmax.input, *scores.input, values.input[1]], set()
    while stack:
        tensor = stack.pop()
        node = view.producer.get(tensor)
        if node is None or node.name in seen or len(seen) > 64:
            continue
        seen.add(node.name)
        if node.op_type in ("MatMul", "Gemm") and producer_start(view, node) is not None:
            names.append(node.name)
            continue
        stack += [i for i in node.input if not view.is_const(i)]
    return names


def _probe(view: GraphView, blocks: list[Block]) -> dict[str, np.ndarray]:
    """One run of the graph on synthetic inputs (batch 2), returning every tensor the blocks read."""
    wanted = {t for b in blocks for t in (*b.sources, b.merged, b.mask, b.softmax.output[0], *(s for s, _ in b.scalars))
              if t and not view.is_const(t)}
    model = onnx.ModelProto()
    model.CopyFrom(view.proto)
    have = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=t) for t in sorted(wanted - have))
    session = make_session(model)
    feeds = _synthetic(session)
    names = [o.name for o in session.get_outputs()]
    values = dict(zip(names, session.run(None, feeds)))
    values.update({t: view.const(t) for b in blocks for t in (b.mask, *(s for s, _ in b.scalars))
                   if t and view.is_const(t)})
    return values


def _synthetic(session) -> dict[str, np.ndarray]:
    """Inputs of batch 2 and length 8 where free: normal floats, integers 0 and 1 (valid token
    ids, masks and type ids in any vocabulary)."""
    rng = np.random.default_rng(0)
    feeds = {}
    for k, inp in enumerate(session.get_inputs()):
        shape = [d if isinstance(d, int) and d > 0 else (2 if i == 0 else 8) for i, d in enumerate(inp.shape)]
        if "float" in inp.type:
            dtype = np.float16 if "float16" in inp.type else np.float64 if "double" in inp.type else np.float32
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif "bool" in inp.type:
            feeds[inp.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            feeds[inp.name] = rng.integers(0, 2, shape).astype(np.int32 if "int32" in inp.type else np.int64)
    return feeds


def _confirmed(view: GraphView, block: Block, values: dict[str, np.ndarray]) -> Attention:
    """The block as an Attention where the plain computation matches the graph's, else Frozen."""
    leak = _leak(view, block)
    if leak:
        raise Frozen(f"{leak} reads inside the block")
    merged = values[block.merged].astype(np.float64)
    _consumer(view, block, merged.ndim)
    scale = 1.0
    for tensor, divides in block.scalars:
        value = float(np.asarray(values[tensor]).reshape(-1)[0])
        scale = scale / value if divides else scale * value
    q, k, v = (values[t].astype(np.float64) for t in block.sources)
    e = block.width
    if q.ndim != 3:
        raise Frozen(f"the projections' outputs have rank {q.ndim}, not (batch, tokens, channels)")
    if block.sources[0] == block.sources[1]:
        q, k, v = q[..., :e], q[..., e:2 * e], q[..., 2 * e:]
    mask = values[block.mask].astype(np.float64) if block.mask else None
    if mask is not None and mask.ndim >= 3 and mask.shape[-3] != 1:  # sliced with the heads it would have to be
        raise Frozen("the mask differs from head to head")
    weights = values[block.softmax.output[0]].shape  # (batch, heads, T, T) or (batch x heads, T, T)
    for lead in ("bt", "tb"):
        heads = weights[1] if len(weights) == 4 else weights[0] // q.shape[0 if lead == "bt" else 1]
        if len(weights) not in (3, 4) or heads < 2 or e % heads:
            continue
        try:
            plain = plain_attention(q, k, v, heads, scale, mask, lead)
        except ValueError:  # a mask that does not broadcast over (batch, heads, T, T)
            continue
        if plain.size == merged.size:
            err = np.abs(plain.reshape(merged.shape) - merged).max() / max(np.abs(merged).max(), 1e-12)
            if err < TOLERANCE:
                return Attention(block.softmax.name, *block.sources, block.sources[0] == block.sources[1],
                                 block.out.name, block.merged, merged.ndim, heads, e // heads,
                                 scale, block.mask, lead, block.nan_guard)
    raise Frozen(f"the graph's heads are not softmax(QK^T) V of the projections' outputs ({e} channels, "
                 f"attention weights {tuple(weights)} on synthetic inputs)")


def plain_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, heads: int, scale: float,
                    mask: np.ndarray | None, lead: str) -> np.ndarray:
    """softmax(scale * Q K^T + mask) V per head, on (batch, tokens, channels) or, with lead
    "tb", (tokens, batch, channels) tensors; the heads merged back in the same layout."""
    if lead == "tb":
        q, k, v = (t.swapaxes(0, 1) for t in (q, k, v))
    b, t, e = q.shape
    split = lambda x: x.reshape(b, x.shape[1], heads, e // heads).transpose(0, 2, 1, 3)  # noqa: E731
    scores = split(q) @ split(k).transpose(0, 1, 3, 2) * scale
    if mask is not None:
        scores = scores + mask
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    out = (scores / scores.sum(-1, keepdims=True)) @ split(v)
    out = out.transpose(0, 2, 1, 3).reshape(b, t, e)
    return out.swapaxes(0, 1) if lead == "tb" else out


def _leak(view: GraphView, block: Block) -> str:
    """A node outside the block that reads a tensor computed inside it (the attention weights
    returned as an output, say): '' where nothing does."""
    ancestors, stack = set(), [block.merged]
    while stack:
        node = view.producer.get(stack.pop())
        if node is not None and node.name not in ancestors:
            ancestors.add(node.name)
            stack += list(node.input)
    seen, stack = set(), list(dict.fromkeys(block.sources))
    while stack:
        tensor = stack.pop()
        if tensor in view.outputs:
            return f"graph output '{tensor}'"
        if tensor == block.merged:
            continue
        for node in view.consumers.get(tensor, []):
            if node.name in seen:
                continue
            if node.name not in ancestors:
                return f"{node.op_type} node '{node.name}'"
            seen.add(node.name)
            stack += list(node.output)
    return ""
