"""Float16 models: the torch engine computes in float32, the model stays float16.

Models meant for GPUs are often written in float16 (a `.half()` export, or a float32 export
converted afterwards, with Casts at the inputs and outputs). The solver needs float32
statistics, and onnx2torch and torch's CPU kernels do not all take float16, so the conversion
stage works on the same graph widened to float32. The proto itself, which the analysis reads
and the export edits, keeps its precision: what comes out is a float16 model again.

The checks are split the same way: the twin and the slim model are compared exactly with the
widened graph, and the float16 file with its widened self within float16's rounding.
"""
from __future__ import annotations

import numpy as np
from onnx import AttributeProto, GraphProto, ModelProto, TensorProto, numpy_helper

HALF = TensorProto.FLOAT16
# float16 keeps about three decimal digits; a deep network's outputs drift by up to ~1e-2 of
# their range from rounding alone, a channel cut in the wrong place by far more
HALF_RTOL = 3e-2
_DTYPE_ATTRS = {"Cast": "to", "EyeLike": "dtype", "RandomNormal": "dtype", "RandomUniform": "dtype",
                "RandomNormalLike": "dtype", "RandomUniformLike": "dtype", "Multinomial": "dtype",
                "Bernoulli": "dtype"}


def is_half(proto: ModelProto) -> bool:
    """Whether any tensor, constant, Cast or graph input/output of the model is float16."""
    return _widen_graph(proto.graph, dry_run=True)


def rounding_tolerance(proto: ModelProto) -> float:
    """How far outputs may move between the model and its widened twin: 0 for float32 models."""
    return HALF_RTOL if is_half(proto) else 0.0


def widened(proto: ModelProto) -> ModelProto:
    """The same graph in float32 (the proto itself where nothing is float16)."""
    if not is_half(proto):
        return proto
    out = ModelProto()
    out.CopyFrom(proto)
    _widen_graph(out.graph)
    return out


def _widen_graph(graph: GraphProto, dry_run: bool = False) -> bool:
    """Turn every float16 in `graph` (and its subgraphs) into float32; True if there was one."""
    found = False
    for tensor in graph.initializer:
        if tensor.data_type == HALF:
            found = True
            if not dry_run:
                tensor.CopyFrom(_widen_tensor(tensor))
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.tensor_type.elem_type == HALF:
            found = True
            if not dry_run:
                value.type.tensor_type.elem_type = TensorProto.FLOAT
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == AttributeProto.TENSOR and attr.t.data_type == HALF:  # Constant, ConstantOfShape
                found = True
                if not dry_run:
                    attr.t.CopyFrom(_widen_tensor(attr.t))
            elif attr.type == AttributeProto.INT and attr.i == HALF and _DTYPE_ATTRS.get(node.op_type) == attr.name:
                found = True
                if not dry_run:
                    attr.i = TensorProto.FLOAT
            elif attr.type == AttributeProto.GRAPH:
                found = _widen_graph(attr.g, dry_run) or found
            elif attr.type == AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    found = _widen_graph(sub, dry_run) or found
    return found


def _widen_tensor(tensor: TensorProto) -> TensorProto:
    return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name)
