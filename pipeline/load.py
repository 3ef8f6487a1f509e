"""Read an ONNX model, check it and normalise it for conversion.

ONNX is the source of truth: everything later (analysis, export) works on the normalised
proto returned here, and the torch model is derived from it. Normalisation may restructure
the graph (constant folding, Constant nodes to initializers) but never the I/O signature.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, TensorProto, ValueInfoProto

from pipeline import precision
from pipeline.errors import ModelError
from pipeline.graph import GraphView
from pipeline.runtime import first_line

Dim = int | str | None


@dataclass(frozen=True)
class IOSpec:
    """One graph input or output as a caller sees it."""

    name: str
    elem_type: int
    shape: tuple[Dim, ...] | None

    @property
    def dtype_name(self) -> str:
        return TensorProto.DataType.Name(self.elem_type).lower()

    @property
    def takes_integers(self) -> bool:
        """Raw pixels (uint8 and the like) or token ids (int64): the model does its own preprocessing."""
        return self.elem_type in (TensorProto.UINT8, TensorProto.INT8, TensorProto.UINT16, TensorProto.INT16,
                                  TensorProto.INT32, TensorProto.INT64)

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype_name,
                "shape": list(self.shape) if self.shape is not None else None}


@dataclass
class LoadedModel:
    """A checked, normalised model plus what we learnt while loading it."""

    path: Path
    proto: ModelProto
    inputs: list[IOSpec]
    outputs: list[IOSpec]
    original: bytes  # the file as given, external tensors embedded: what sessions and reports see
    notes: list[str] = field(default_factory=list)

    @property
    def opset(self) -> int:
        return onnx_opset(self.proto)


QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger",
                           "MatMulInteger", "QGemm"})


def quantized_nodes(proto: ModelProto) -> list[NodeProto]:
    """Nodes of an already quantized model (QDQ pairs, QLinear* and integer ops)."""
    return [n for n in proto.graph.node if n.op_type in QUANTIZED_OPS or n.op_type.startswith("QLinear")]


def refuse_quantized(path: Path, proto: ModelProto, advice: str) -> None:
    """A quantized model has no float weights to prune or calibrate: one line naming a node, and `advice`."""
    quantized = quantized_nodes(proto)
    if quantized:
        first = quantized[0]
        raise ModelError(f"{path}: already quantized ({len(quantized)} nodes such as {first.op_type} "
                         f"'{first.name}'); {advice}")


def onnx_opset(proto: ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _value_spec(value: ValueInfoProto) -> IOSpec:
    ttype = value.type.tensor_type
    shape = None
    if ttype.HasField("shape"):
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                      for d in ttype.shape.dim)
    return IOSpec(value.name, ttype.elem_type, shape)


def signature(proto: ModelProto) -> tuple[list[IOSpec], list[IOSpec]]:
    """Graph inputs (initializers excluded, as IR < 4 models list them) and outputs."""
    return [_value_spec(v) for v in data_inputs(proto)], [_value_spec(v) for v in proto.graph.output]


def data_inputs(proto: ModelProto) -> list[ValueInfoProto]:
    """The graph inputs that are fed, not initializers listed as inputs (IR < 4)."""
    inits = {i.name for i in proto.graph.initializer}
    return [v for v in proto.graph.input if v.name not in inits]


def load_model(path: str | os.PathLike, *, normalise: bool = True,
               max_tensor_bytes: int | None = None) -> LoadedModel:
    """Read, check and normalise `path`; raise ModelError with a one-line reason otherwise."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such file")
    if not path.is_file():
        raise ModelError(f"{path}: not a regular file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning or others
        raise ModelError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {first_line(exc)})") from exc
    if not proto.graph.node:
        raise ModelError(f"{path}: the ONNX graph has no nodes (is this an ONNX model?)")
    _check_names(path, proto)
    _check_tensor_sizes(path, proto, max_tensor_bytes)
    original = _self_contained(path, proto) if _load_external_data(path, proto) else path.read_bytes()
    opset, known = onnx_opset(proto), onnx.defs.onnx_opset_version()
    if opset > known:
        raise ModelError(f"{path}: opset {opset} is newer than this onnx knows ({known}); export with "
                         f"opset {known} or lower, or upgrade onnx and onnxruntime")
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:  # ValidationError, or a message that is not even valid UTF-8
        raise ModelError(f"{path}: fails onnx.checker: {first_line(exc)}") from exc
    inputs, outputs = signature(proto)
    notes: list[str] = []
    if normalise:
        proto = _normalise(path, proto, notes)
    proto = _declared_where_true(proto, _infer_shapes(path, _hints_dropped(proto)))
    if normalise:
        _fold_channels_last_flatten(proto, notes)
        _split_sizes_written_out(proto, notes)
    if precision.is_half(proto):
        notes.append("float16 model: computed in float32 by the torch engine, written back in float16")
    return LoadedModel(path=path, proto=proto, inputs=inputs, outputs=outputs, original=original, notes=notes)


def _hints_dropped(proto: ModelProto) -> ModelProto:
    """The graph without its declared intermediate and output shapes: exporters write wrong
    ones (a sequence model declaring [1, seqlen] for a [T, 1, classes] result), and whatever
    is derived from the graph must follow what its nodes compute. The signature recorded by
    `signature` still holds what the file declared."""
    out = ModelProto()
    out.CopyFrom(proto)
    del out.graph.value_info[:]
    for value in out.graph.output:
        value.type.tensor_type.ClearField("shape")
    return out


def _declared_where_true(declared: ModelProto, inferred: ModelProto) -> ModelProto:
    """Output shapes as declared where the graph agrees with them (same rank, no fixed size
    contradicted), so the names of free dimensions survive; as inferred elsewhere."""
    for said, got in zip(declared.graph.output, inferred.graph.output):
        a, b = said.type.tensor_type, got.type.tensor_type
        if not a.HasField("shape"):
            continue
        if b.HasField("shape") and len(a.shape.dim) == len(b.shape.dim) and all(
                not (x.HasField("dim_value") and y.HasField("dim_value")) or x.dim_value == y.dim_value
                for x, y in zip(a.shape.dim, b.shape.dim)):
            b.shape.CopyFrom(a.shape)
    return inferred


def _check_names(path: Path, proto: ModelProto) -> None:
    """protobuf hands back bytes for strings that are not valid UTF-8: refuse those here."""
    for node in proto.graph.node:
        for name in [node.name, node.op_type, node.domain, *node.input, *node.output]:
            if not isinstance(name, str):
                raise ModelError(f"{path}: a node has a name or tensor name that is not valid UTF-8")


def _check_tensor_sizes(path: Path, proto: ModelProto, budget: int | None) -> None:
    """Refuse declared tensors larger than the memory budget before anything allocates them."""
    if budget is None:
        return
    for init in proto.graph.initializer:
        count = 1
        for d in init.dims:
            count *= max(int(d), 0)
        try:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        except (KeyError, ValueError, TypeError):
            raise ModelError(f"{path}: initializer '{init.name}' has unknown data type {init.data_type}") from None
        size = count * itemsize if init.data_type != TensorProto.STRING else 0
        if size > budget:
            raise ModelError(f"{path}: initializer '{init.name}' declares {size / 2**20:.0f} MiB, "
                             f"over the memory budget of {budget / 2**20:.0f} MiB (--max-memory)")


def _load_external_data(path: Path, proto: ModelProto) -> bool:
    """Load external tensors, but only from files inside the model's own folder; True if any."""
    base = path.resolve().parent
    external = [t for t in _all_tensors(proto) if t.data_location == TensorProto.EXTERNAL]
    for tensor in external:
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (base / location).resolve()
        if os.path.isabs(location) or ".." in Path(location).parts or not target.is_relative_to(base):
            raise ModelError(f"{path}: tensor '{tensor.name}' points outside the model's folder "
                             f"('{location}'); refusing to read it")
        if not target.is_file():
            raise ModelError(f"{path}: external data file '{location}' for tensor "
                             f"'{tensor.name}' is missing")
    if external:
        try:
            onnx.external_data_helper.load_external_data_for_model(proto, str(base))
        except Exception as exc:
            raise ModelError(f"{path}: cannot read external data ({exc})") from exc
    return bool(external)


def _self_contained(path: Path, proto: ModelProto) -> bytes:
    """One message with the external tensors inside: a session made from bytes would look for
    them in the working directory, not beside the model, and file sizes would leave them out."""
    try:
        return proto.SerializeToString()
    except ValueError as exc:  # protobuf's 2 GB limit on one message
        raise ModelError(f"{path}: with its external data the model is over 2 GB, more than one ONNX "
                         f"message holds; models this large are not supported") from exc


def _all_tensors(proto: ModelProto):
    yield from proto.graph.initializer
    for node in proto.graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t


def _normalise(path: Path, proto: ModelProto, notes: list[str]) -> ModelProto:
    """Fold constants and turn Constant nodes into initializers, keeping the I/O signature.

    onnxslim does the graph plumbing; layer fusions and weight tying are switched off so that
    BatchNormalization stays separate (the loss is defined before it) and no initializer is
    shared between layers that may be sliced differently.
    """
    import onnxslim
    from onnxslim.core.pattern.registry import DEFAULT_FUSION_PATTERNS

    before = signature(proto)
    inits = {i.name for i in proto.graph.initializer}
    if any(v.name in inits for v in proto.graph.input):
        notes.append("initializers listed as graph inputs were made plain initializers")
        kept = [v for v in proto.graph.input if v.name not in inits]
        del proto.graph.input[:]
        proto.graph.input.extend(kept)
        if proto.ir_version < 4:  # IR 3 (opset 8 and before) requires every initializer to be an input
            notes.append(f"IR version {proto.ir_version} raised to 4, the first without that requirement")
            proto.ir_version = 4
    n_const = sum(n.op_type == "Constant" for n in proto.graph.node)
    try:
        slim = onnxslim.slim(proto, skip_fusion_patterns=list(DEFAULT_FUSION_PATTERNS),
                             skip_optimizations=["graph_fusion", "weight_tying"])
    except Exception as exc:  # onnxslim is best effort: an unslimmed graph is still valid
        notes.append(f"onnxslim could not normalise the graph ({type(exc).__name__}); used as is")
        slim = proto
    if slim is not proto and signature(slim) != before:
        notes.append("onnxslim changed the I/O signature; its result was discarded")
        slim = proto
    elif slim is not proto:
        n_after = sum(n.op_type == "Constant" for n in slim.graph.node)
        notes.append(f"normalised with onnxslim: {len(proto.graph.node)} -> {len(slim.graph.node)} "
                     f"nodes, {n_const - n_after} Constant nodes became initializers")
    _unique_node_names(slim, notes)
    return slim


def _unique_node_names(proto: ModelProto, notes: list[str]) -> None:
    """Give every node a distinct name, so that stages can refer to nodes by name alone."""
    seen: set[str] = set()
    renamed = 0
    for i, node in enumerate(proto.graph.node):
        key = node.name.replace(".", "/")
        if not node.name or key in seen:
            base = f"{node.op_type}_{i}"
            node.name = base
            while node.name.replace(".", "/") in seen:
                node.name = f"{base}_{len(seen)}"
            renamed += 1
        seen.add(node.name.replace(".", "/"))
    if renamed:
        notes.append(f"{renamed} unnamed or duplicate node names were made unique")


def _fold_channels_last_flatten(proto: ModelProto, notes: list[str]) -> None:
    """Transpose to channels-last, flatten, multiply by a constant matrix (Keras' Flatten before a
    Dense, through tf2onnx) equals flattening channels-first with the matrix's rows reordered.
    Folding the order into the weights lets the channel analysis reach the classifier; the
    Transpose goes too. The conversion stage's parity check compares the result with the
    original file."""
    view, folded = GraphView(proto), 0
    for node in [n for n in proto.graph.node if n.op_type == "Transpose"]:
        shape, users = view.shape(node.input[0]), view.consumers.get(node.output[0], [])
        if (shape is None or len(shape) != 4 or None in shape[1:] or view.attr(node, "perm") != [0, 2, 3, 1]
                or len(users) != 1 or users[0].op_type != "Reshape" or node.output[0] in view.outputs):
            continue
        reshape, (c, h, w) = users[0], shape[1:]
        target = view.const(reshape.input[1]).ravel().tolist() if view.is_const(reshape.input[1]) else []
        keeps_batch = view.reshape_keeps_batch(reshape, target)
        flattens = len(target) == 2 and ((target[0] == -1 and target[1] == c * h * w)
                                         or (keeps_batch and target[1] in (-1, c * h * w)))
        layers = view.consumers.get(reshape.output[0], [])
        if not flattens or reshape.output[0] in view.outputs or not layers \
                or not all(_reads_a_matrix(view, n, reshape.output[0]) for n in layers):
            continue
        for layer in layers:
            weight = view.const(layer.input[1])
            if layer.op_type == "Gemm" and view.attr(layer, "transB", 0):  # (out, h*w*c)
                weight = weight.reshape(-1, h, w, c).transpose(0, 3, 1, 2).reshape(weight.shape)
            else:  # (h*w*c, out)
                weight = weight.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(weight.shape)
            view.initializers[layer.input[1]].CopyFrom(onnx.numpy_helper.from_array(weight, layer.input[1]))
        reshape.input[0] = node.input[0]
        proto.graph.node.remove(node)
        kept = [v for v in proto.graph.value_info if v.name != node.output[0]]
        del proto.graph.value_info[:]
        proto.graph.value_info.extend(kept)
        folded += 1
    if folded:
        notes.append(f"{folded} channels-last flatten(s) before a matrix folded into its weights' row order")


def _split_sizes_written_out(proto: ModelProto, notes: list[str]) -> None:
    """Split with num_outputs (opset 18+, how the dynamo exporter writes torch.chunk) gets the
    equivalent explicit sizes input, which the export can edit when a part loses channels."""
    view, written = GraphView(proto), 0
    for node in proto.graph.node:
        parts = view.attr(node, "num_outputs")
        shape = view.shape(node.input[0]) if node.op_type == "Split" else None
        if parts is None or shape is None or (len(node.input) > 1 and node.input[1]):
            continue
        dim = shape[view.attr(node, "axis", 0) % len(shape)]
        if dim is None:
            continue
        step = -(-dim // parts)  # as the operator defines it: equal parts, the last one smaller
        sizes = np.array([min(step, dim - k * step) for k in range(parts)], np.int64)
        name = f"{node.name}_sizes"
        while name in view.initializers or name in view.producer:
            name += "_"
        proto.graph.initializer.append(onnx.numpy_helper.from_array(sizes, name))
        del node.input[1:]
        node.input.append(name)
        kept = [a for a in node.attribute if a.name != "num_outputs"]
        del node.attribute[:]
        node.attribute.extend(kept)
        written += 1
    if written:
        notes.append(f"{written} Split(s) given their part sizes explicitly (num_outputs)")


def sized(proto: ModelProto, sample: tuple[int, ...]) -> ModelProto:
    """The model with the input dimensions it leaves symbolic (an image size exported as dynamic)
    set to one sample's, shapes inferred again: what FLOPs and shape-dependent analysis read. The
    batch stays free; the proto itself comes back where nothing else is symbolic."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim if proto.graph.input else []
    if len(dims) != len(sample) + 1 or all(d.HasField("dim_value") for d in dims[1:]):
        return proto
    out = ModelProto()
    out.CopyFrom(proto)
    for dim, size in zip(out.graph.input[0].type.tensor_type.shape.dim[1:], sample):
        if not dim.HasField("dim_value"):
            dim.dim_value = int(size)
    del out.graph.value_info[:]
    return _infer_shapes(Path(f"at input size {'x'.join(map(str, sample))}"), out)


def at_batch_one(proto: ModelProto) -> ModelProto | None:
    """Shapes for one sample: a weightless copy with the free batch dimension bound to 1 in every
    input (and dims of other inputs that share its name), shapes inferred again with data
    propagation. Where reshapes fold the batch into rows (attention heads split and merged,
    a Gemm after them), only this knows each layer's rows. None where the first input has no
    single free dimension to bind, or inference fails."""
    inputs = data_inputs(proto)
    free = [d for d in inputs[0].type.tensor_type.shape.dim if not d.HasField("dim_value")] if inputs else []
    if len(free) != 1:
        return None
    name = free[0].dim_param
    out = ModelProto()
    out.CopyFrom(proto)
    del out.graph.value_info[:]
    big = [i for i in out.graph.initializer if int(np.prod(i.dims)) > 64]  # no shape is computed from these
    for init in big:
        out.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    keep = [i for i in out.graph.initializer if int(np.prod(i.dims)) <= 64]
    del out.graph.initializer[:]
    out.graph.initializer.extend(keep)
    for v in out.graph.input:
        for dim in v.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value") and (v.name == inputs[0].name or (name and dim.dim_param == name)):
                dim.dim_value = 1
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:  # onnxruntime's inference follows shape arithmetic (Shape, Gather, Slice, Concat) that onnx's loses
        return SymbolicShapeInference.infer_shapes(out, auto_merge=True, guess_output_rank=True)
    except Exception:  # noqa: BLE001 - an op it does not know: onnx's inference instead
        pass
    try:
        return _infer_shapes(Path("at batch 1"), out)
    except ModelError:
        return None


def _reads_a_matrix(view: GraphView, node: NodeProto, flat: str) -> bool:
    """`node` multiplies `flat` by a constant matrix of its own (Gemm without transA, or MatMul)."""
    if node.op_type not in ("MatMul", "Gemm") or node.input[0] != flat or not view.is_const(node.input[1]):
        return False
    if node.op_type == "Gemm" and view.attr(node, "transA", 0):
        return False
    return len(view.consumers.get(node.input[1], [])) == 1


def _infer_shapes(path: Path, proto: ModelProto) -> ModelProto:
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=False,
                                                     data_prop=True)
    except Exception as exc:
        raise ModelError(f"{path}: shape inference failed: {first_line(exc)}") from exc
    if all(n.domain in ("", "ai.onnx") for n in inferred.graph.node):
        return inferred
    # onnx does not know contrib ops (com.microsoft); onnxruntime's own inference does
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    try:
        return SymbolicShapeInference.infer_shapes(inferred, auto_merge=True, guess_output_rank=True)
    except Exception:  # an op neither knows: shapes after it stay unknown, its groups freeze
        return inferred
