"""FLOPs and parameters per linear layer, per sample, read off the shape-inferred ONNX graph."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.graph import GraphView


@dataclass(frozen=True)
class LayerCost:
    node: str
    op: str
    flops: int  # 2 x multiply-accumulates for one sample
    params: int

    def to_json(self) -> dict:
        return {"node": self.node, "op": self.op, "flops": self.flops, "params": self.params}


def layer_costs(view: GraphView) -> list[LayerCost]:
    """Conv, ConvTranspose, Gemm and MatMul layers: the ones channel pruning makes cheaper."""
    costs = []
    for node in view.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        params = sum(int(np.prod(view.initializers[i].dims)) for i in node.input if i in view.initializers)
        costs.append(LayerCost(node.name, node.op_type, _flops(view, node), params))
    return costs


def _flops(view: GraphView, node) -> int:
    out = view.shape(node.output[0])
    if node.op_type in ("Conv", "ConvTranspose"):
        w = view.shape(node.input[1]) if len(node.input) > 1 else None
        if out is None or w is None or len(w) < 2 or any(d is None for d in list(out[1:]) + list(w)):
            return 0
        per_output = int(np.prod(w[1:]))  # (C_in / group) x kernel
        if node.op_type == "ConvTranspose":
            x = view.shape(node.input[0])
            return 0 if x is None or None in x[1:] else 2 * int(np.prod(x[1:])) * int(np.prod(w[1:]))
        return 2 * per_output * int(np.prod(out[1:]))
    a, b = view.shape(node.input[0]), view.shape(node.input[1]) if len(node.input) > 1 else None
    if a is None or b is None or len(a) < 2 or len(b) < 2 or None in a[1:] or None in b:
        return 0
    inner = a[-2] if node.op_type == "Gemm" and view.attr(node, "transA", 0) else a[-1]
    width = b[0] if node.op_type == "Gemm" and view.attr(node, "transB", 0) else b[-1]
    rows = int(np.prod(a[1:-1])) if len(a) > 2 else 1
    return 2 * rows * int(inner) * int(width)


def total_params(view: GraphView) -> int:
    return sum(int(np.prod(i.dims)) for i in view.graph.initializer)
