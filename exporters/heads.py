"""Attention blocks that lost heads, written again in plain ops for the heads kept.

A probe showed that the block computes softmax(scale * Q K^T + mask) V per head from its
projections' outputs (pipeline/analyze/attention.py); the exporter's own split and merge of the
heads, with their head counts in Reshape targets and shape arithmetic, are dropped with it.
"""
from __future__ import annotations

import numpy as np
from onnx import GraphProto, ModelProto, NodeProto, helper, numpy_helper

from pipeline.analyze import Attention

# Transposes from (batch, tokens, heads, head_dim), or tokens first ("tb"), to the heads' matrices
# and back: queries and values (batch, heads, tokens, head_dim), keys transposed, merged heads.
PERMS = {"bt": ([0, 2, 1, 3], [0, 2, 3, 1], [0, 2, 1, 3]), "tb": ([1, 2, 0, 3], [1, 2, 3, 0], [2, 0, 1, 3])}


def rewrite(proto: ModelProto, att: Attention, core: list[str], heads: int, dtype: np.dtype) -> None:
    """Makes the block's output layer read `heads` heads computed from the (already sliced)
    projections' outputs; the old block is left for drop_dead. The new scores product, Softmax
    and values product take the names of the old (`core`), so reports pair them."""
    graph, width = proto.graph, heads * att.head_dim
    for n in graph.node:
        if n.name in core:
            n.name += "/replaced"
    to_heads, to_keys, back = PERMS[att.lead]
    made: list[NodeProto] = []
    base = f"{att.softmax}/kept_heads"

    def node(op: str, inputs: list[str], name: str = "", **attrs) -> str:
        out = f"{base}/{op}_{len(made)}"
        made.append(helper.make_node(op, inputs, [out], name=name or out, **attrs))
        return out

    def const(tag: str, value: np.ndarray) -> str:
        name = f"{base}/{tag}"
        graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    split = const("split", np.array([0, 0, heads, att.head_dim], np.int64))
    sources = [att.q, att.k, att.v]
    if att.fused:
        axis = const("axis", np.array([-1], np.int64))
        bounds = [const(f"at{k}", np.array([k * width], np.int64)) for k in range(4)]
        sources = [node("Slice", [att.q, bounds[k], bounds[k + 1], axis]) for k in range(3)]
    q, k, v = (node("Transpose", [node("Reshape", [s, split])], perm=perm)
               for s, perm in zip(sources, (to_heads, to_keys, to_heads)))
    scores = node("Mul", [node("MatMul", [q, k], core[0]), const("scale", np.array(att.scale, dtype))])
    if att.mask:
        scores = node("Add", [scores, att.mask])
    weights = node("Softmax", [scores], core[1], axis=-1)
    if att.nan_guard:
        weights = node("Where", [node("IsNaN", [weights]), const("zero", np.zeros((), dtype)), weights])
    merged = node("Transpose", [node("MatMul", [weights, v], core[2])], perm=back)
    merged = node("Reshape", [merged, const("merge", np.array([0, 0, width] if att.merged_rank == 3 else
                                                                [-1, width], np.int64))])
    reader = next(n for n in graph.node if n.name == att.out)
    reader.input[0] = merged
    at = list(graph.node).index(reader)
    for n in reversed(made):
        graph.node.insert(at, n)


def drop_dead(graph: GraphProto) -> None:
    """Removes the nodes no graph output depends on (nodes inside If/Loop bodies count as reading
    the outer names they use)."""
    needed = {o.name for o in graph.output}
    keep = []
    for n in reversed(graph.node):
        if any(o in needed for o in n.output):
            keep.append(n)
            needed.update(_reads(n))
    del graph.node[:]
    graph.node.extend(reversed(keep))


def _reads(node: NodeProto) -> set[str]:
    names = {i for i in node.input if i}
    for a in node.attribute:
        for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
            for inner in g.node:
                names |= _reads(inner)
    return names
