"""FLOPs and parameters per layer, per sample, read off the shape-inferred ONNX graph.

Linear and recurrent layers, the products of two activations (attention's QK^T and AV) and
Softmax: what channel pruning makes cheaper, and the attention work beside it that a report of
an attention model would otherwise leave out."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.analyze import LINEAR, RECURRENT
from pipeline.graph import GraphView
from pipeline.load import at_batch_one, data_inputs

SOFTMAX_OPS = 5  # per element: max, subtract, exp, sum, divide


@dataclass(frozen=True)
class LayerCost:
    node: str
    op: str
    flops: int  # 2 x multiply-accumulates for one sample
    params: int
    fixed: int = 0  # of `flops`, those no channel count changes (a recurrent layer's recurrence)

    def to_json(self) -> dict:
        return {"node": self.node, "op": self.op, "flops": self.flops, "params": self.params}


def layer_costs(view: GraphView) -> list[LayerCost]:
    """Conv, ConvTranspose, Gemm, MatMul (with weights or of two activations), recurrent layers
    and Softmax."""
    costs = []
    shapes, batch = _sample_shapes(view)
    for node in view.graph.node:
        if node.op_type not in LINEAR | RECURRENT | {"Softmax"}:
            continue
        params = sum(int(np.prod(view.initializers[i].dims)) for i in node.input if i in view.initializers)
        if node.op_type in RECURRENT:
            flops, fixed = _recurrent_flops(shapes, node, batch)
            costs.append(LayerCost(node.name, node.op_type, flops, params, fixed))
        elif node.op_type == "Softmax":
            elements = _per_sample(shapes.shape(node.output[0]), batch)
            costs.append(LayerCost(node.name, node.op_type, SOFTMAX_OPS * (elements or 0), 0))
        else:
            costs.append(LayerCost(node.name, node.op_type, _flops(shapes, node, batch), params))
    return costs


def _sample_shapes(view: GraphView) -> tuple[GraphView, int | None]:
    """The view to read shapes from and the batch they hold: the graph's own where it fixes the
    batch, else its shapes at batch 1 (None: the free dimension left to stand for the batch)."""
    fixed = _fixed_batch(view)
    if fixed is not None:
        return view, fixed
    one = at_batch_one(view.proto)
    return (GraphView(one), 1) if one is not None else (view, None)


def _fixed_batch(view: GraphView) -> int | None:
    """The first input's leading dimension where the graph fixes every one of its dimensions;
    None where one is free (that one is the batch)."""
    first = next(iter(data_inputs(view.proto)), None)
    dims = view.shape(first.name) if first is not None else None
    return None if not dims or None in dims or not dims[0] else int(dims[0])


def _per_sample(dims, batch: int | None) -> int | None:
    """The product of `dims` for one sample, None where unknown. Where the batch is free, the one
    free dimension is it (not always axis 0: a sequence model's steps come first); where the graph
    fixes the batch, every dimension must be known and the product is shared by the batch."""
    if dims is None:
        return None
    free = sum(d is None for d in dims)
    known = int(np.prod([d for d in dims if d is not None], dtype=np.int64))
    if batch is None:
        return known if free <= 1 else None
    return known // batch if not free else None


def _flops(view: GraphView, node, batch: int | None) -> int:
    out = view.shape(node.output[0])
    if node.op_type in ("Conv", "ConvTranspose"):
        w = view.shape(node.input[1]) if len(node.input) > 1 else None
        if w is None or len(w) < 2 or None in w:
            return 0
        if node.op_type == "ConvTranspose":  # every input value is spread over a kernel for each output channel
            inputs = _per_sample(view.shape(node.input[0]), batch)
            return 0 if inputs is None else 2 * inputs * int(np.prod(w[1:]))
        outputs = _per_sample(out, batch)
        return 0 if outputs is None else 2 * int(np.prod(w[1:])) * outputs  # (C_in / group) x kernel per output
    a = view.shape(node.input[0])  # MatMul and Gemm: each output a dot product over the inner axis
    if a is None or len(a) < 1:
        return 0
    inner = a[-2] if node.op_type == "Gemm" and view.attr(node, "transA", 0) else a[-1]
    outputs = _per_sample(out, batch)
    return 0 if outputs is None or inner is None else 2 * outputs * int(inner)


def _recurrent_flops(view: GraphView, node, batch: int | None) -> tuple[int, int]:
    """(all, recurrence): each step multiplies its input by W and the state by R, per direction."""
    x, w = view.shape(node.input[0]), view.shape(node.input[1])
    r = view.shape(node.input[2]) if len(node.input) > 2 else None
    steps = _per_sample(x[:-1], batch) if x is not None and len(x) == 3 else None
    if steps is None or w is None or r is None or None in w or None in r:
        return 0, 0
    directions, gates, inputs = w
    recurrence = 2 * steps * directions * gates * int(r[-1])
    return 2 * steps * directions * gates * inputs + recurrence, recurrence


def total_params(view: GraphView) -> int:
    return sum(int(np.prod(i.dims)) for i in view.graph.initializer)
