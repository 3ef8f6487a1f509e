"""Nodes onnx2torch cannot convert, run by onnxruntime inside the torch twin.

Pruning needs the torch twin only to produce activations (no gradients), so an operator
without a torch converter (a com.microsoft contrib op, say) can still be evaluated by the
runtime that the model is deployed on. The channel analysis freezes the groups such a node
touches; the rest of the model is pruned as usual.
"""
from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import NodeProto, defs, helper, numpy_helper

from pipeline.converter import (OnnxGraph, OnnxToTorchModule, OperationConverterResult, add_converter, get_converter,
                                onnx_mapping_from_node)
from pipeline.runtime import SessionConfig, make_session


class OrtNode(torch.nn.Module, OnnxToTorchModule):
    """One ONNX node as a torch module: inputs to numpy, one onnxruntime call, outputs back."""

    def __init__(self, node: NodeProto, opsets: list[onnx.OperatorSetIdProto], ir_version: int):
        super().__init__()
        self.node_bytes = node.SerializeToString()
        self.input_names = list(node.input)  # '' where an optional input is skipped
        self.opsets = [(o.domain, o.version) for o in opsets]
        self.ir_version = ir_version
        self._session = None

    def __getstate__(self) -> dict:
        """Copies (the student is a deep copy of the teacher) open their own session."""
        return {**self.__dict__, "_session": None}

    def _open(self, feeds: dict[str, np.ndarray]):
        node = NodeProto.FromString(self.node_bytes)
        graph = helper.make_graph(
            [node], "single_node",
            [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(x.dtype), None)
             for n, x in feeds.items()],
            [onnx.ValueInfoProto(name=o) for o in node.output if o])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in self.opsets],
                                  ir_version=self.ir_version)
        return make_session(model.SerializeToString(), SessionConfig(provider="cpu", threads=0))

    def forward(self, *args: torch.Tensor):
        feeds = {n: a.detach().cpu().numpy() for n, a in zip(self.input_names, args, strict=True) if n}
        if self._session is None:
            self._session = self._open(feeds)
        outs = self._session.run(None, feeds)
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        tensors = [torch.from_numpy(np.ascontiguousarray(o)).to(device) for o in outs]
        return tensors[0] if len(tensors) == 1 else tuple(tensors)


def with_fallbacks(proto: onnx.ModelProto, refused: frozenset[str] = frozenset()) -> onnx.ModelProto:
    """A copy of `proto` ready for onnx2torch, every node without a converter, and every node
    named in `refused` (see `refused_nodes`), given the onnxruntime fallback.

    onnx2torch turns a node's domain into part of a torch module name, where dots are not
    allowed, so custom domains are renamed in the copy; the fallback keeps the original node. A
    refused node of a standard op gets a domain of its own in the copy, so that the op's other
    nodes keep their converter.
    """
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    versions = _versions(proto)
    context = (list(proto.opset_import), proto.ir_version)
    for node in out.graph.node:
        domain = "" if node.domain == "ai.onnx" else node.domain
        version = _since(node.op_type, domain, versions.get(domain, 1))
        safe = domain.replace(".", "_")
        if node.name in refused:  # onnx2torch looks a private domain up at the opset's own version
            safe, version = REFUSED, versions.get(domain, 1)
        if safe == "" and (version in TYPE_ONLY.get(node.op_type, ()) or (node.op_type, version) in OLDER):
            _alias(node.op_type, version)
            _NODES[("", node.op_type, version, node.name)] = (_copy(node), *context)
        if node.name not in refused and (safe, node.op_type, version) not in _CONVERTERS:  # ours answer too
            try:
                get_converter(node.op_type, version, domain)
                continue
            except NotImplementedError:
                pass
        original = _copy(node)
        if not all(node.input):
            _fill_skipped_inputs(out, node)
        if safe != domain:
            node.domain = safe
            if safe not in versions:
                out.opset_import.append(helper.make_opsetid(safe, versions.get(domain, 1)))
                versions[safe] = versions.get(domain, 1)
        _register(safe, node.op_type, version)
        _NODES[(safe, node.op_type, version, node.name)] = (original, *context)
    return out


def refused_nodes(proto: onnx.ModelProto) -> frozenset[str]:
    """Nodes whose converter exists but refuses them for their attributes (NotImplementedError:
    an AveragePool padded unevenly, say), found by converting each node alone: asked only after a
    whole conversion failed, so a model that converts pays nothing."""
    graph = OnnxGraph(proto.graph)
    versions = _versions(proto)
    refused = set()
    for node in graph.nodes.values():
        try:
            converter = get_converter(node.operation_type, versions.get(node.domain, 1), node.domain)
        except NotImplementedError:
            continue  # no converter: with_fallbacks gives it one
        try:
            converter(node, graph)
        except NotImplementedError:
            refused.add(node.name)
    return frozenset(refused)


REFUSED = "crossprune_refused"  # the copy's domain for nodes onnx2torch refuses


# Opset versions that only added element types (bfloat16, float8, int4...) to an op: onnx2torch's
# converter of the version before still applies. Without it every Conv of an opset-22 export would run
# in onnxruntime, where the pruning cannot reach its weights, and only the Gemm groups would be cut.
TYPE_ONLY = {
    **dict.fromkeys(("Conv", "ConvTranspose", "MaxPool", "GlobalAveragePool", "HardSigmoid", "HardSwish", "Elu",
                     "Selu", "Softplus", "Softsign", "InstanceNormalization", "Dropout", "Round"), (22,)),
    **dict.fromkeys(("Reshape", "Shape", "Identity", "Cast", "Constant"), (19, 21, 23, 24)),
    **dict.fromkeys(("Flatten", "Transpose", "Unsqueeze"), (21, 23, 24)),
    "Squeeze": (23, 24), "ConstantOfShape": (20, 21, 23, 24), "Equal": (19,),
}


# Versions older than onnx2torch's first converter of the op (opsets 7 and 8: the ONNX model zoo's
# classic CNNs), where that first version changed nothing a float model uses: BatchNormalization-9
# dropped `spatial` (1, its default, is the only value it kept), Gemm-9 and Flatten-9 added integer
# types, MaxPool-8 an optional Indices output and storage_order. A node that sets what changed
# (spatial=0) is refused and run by onnxruntime.
OLDER = {("BatchNormalization", 7): 9, ("Gemm", 7): 9, ("Flatten", 1): 9, ("MaxPool", 1): 8}


def _versions(proto: onnx.ModelProto) -> dict[str, int]:
    return {o.domain or "": o.version for o in proto.opset_import}


def _alias(op_type: str, version: int) -> None:
    """Register onnx2torch's converter of the op's newest earlier version for `version` (for the
    OLDER ones, of the version after); a node it refuses (Reshape's allowzero=1, say) is run by
    onnxruntime, as any refused node is."""
    try:
        get_converter(op_type, version, "")
        return  # onnx2torch has one (a later release), or an alias was made before
    except NotImplementedError:
        pass
    source = OLDER.get((op_type, version)) or next((v for v in range(version - 1, 0, -1) if _converts(op_type, v)),
                                                   None)
    if source is None or not _converts(op_type, source):
        return
    converter = get_converter(op_type, source, "")

    def convert(node, graph) -> OperationConverterResult:
        try:
            if node.attributes.get("spatial", 1) != 1:
                raise NotImplementedError("BatchNormalization with spatial=0")
            return converter(node, graph)
        except NotImplementedError:
            return OperationConverterResult(torch_module=OrtNode(*_NODES[("", op_type, version, node.name)]),
                                            onnx_mapping=onnx_mapping_from_node(node))

    add_converter(operation_type=op_type, version=version, domain="")(convert)


def _converts(op_type: str, version: int) -> bool:
    try:
        get_converter(op_type, version, "")
        return True
    except NotImplementedError:
        return False


def _copy(node: NodeProto) -> NodeProto:
    """The node as it is now, before the copy given to onnx2torch is changed."""
    out = NodeProto()
    out.CopyFrom(node)
    return out


def _fill_skipped_inputs(proto: onnx.ModelProto, node: NodeProto) -> None:
    """Give skipped optional inputs (Resize's roi, say) a placeholder tensor in the copy:
    onnx2torch would pass the inputs after one as keyword arguments, which a module that takes
    any number of inputs cannot name. The OrtNode leaves them out again."""
    if not any(i.name == _SKIPPED for i in proto.graph.initializer):
        proto.graph.initializer.append(numpy_helper.from_array(np.zeros(0, np.float32), _SKIPPED))
    node.input[:] = [name or _SKIPPED for name in node.input]


_SKIPPED = "crossprune_skipped_input"
_NODES: dict[tuple, tuple] = {}  # (domain, op, version, node name) -> what its OrtNode needs


def _register(domain: str, op_type: str, version: int) -> None:
    if (domain, op_type, version) in _CONVERTERS:
        return
    _CONVERTERS.add((domain, op_type, version))

    def convert(node, _graph) -> OperationConverterResult:
        return OperationConverterResult(torch_module=OrtNode(*_NODES[(domain, op_type, version, node.name)]),
                                        onnx_mapping=onnx_mapping_from_node(node))

    add_converter(operation_type=op_type, version=version, domain=domain)(convert)


_CONVERTERS: set[tuple[str, str, int]] = set()


def _since(op_type: str, domain: str, version: int) -> int:
    """The opset version onnx2torch files the op under (the schema's since_version)."""
    try:
        return defs.get_schema(op_type, domain=domain, max_inclusive_version=version).since_version
    except (RuntimeError, defs.SchemaError):
        return version
