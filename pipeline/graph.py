"""Read-only views of an ONNX graph: who produces and consumes what, constants and shapes."""
from __future__ import annotations

from collections import defaultdict
from functools import cached_property

import numpy as np
from onnx import ModelProto, NodeProto, helper, numpy_helper


class GraphView:
    """Indexes a (normalised, shape-inferred) ModelProto once for the stages that read it."""

    def __init__(self, proto: ModelProto):
        self.proto = proto
        self.graph = proto.graph
        self.nodes: dict[str, NodeProto] = {n.name: n for n in self.graph.node}
        self.order: dict[str, int] = {n.name: i for i, n in enumerate(self.graph.node)}
        self.producer: dict[str, NodeProto] = {o: n for n in self.graph.node for o in n.output if o}
        consumers: dict[str, list[NodeProto]] = defaultdict(list)
        for n in self.graph.node:
            for i in dict.fromkeys(n.input):
                if i:
                    consumers[i].append(n)
        self.consumers = consumers
        self.initializers = {i.name: i for i in self.graph.initializer}
        self.outputs = {o.name for o in self.graph.output}

    def is_const(self, name: str) -> bool:
        return name in self.initializers

    def const(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.initializers[name])

    @cached_property
    def _shapes(self) -> dict[str, tuple]:
        out = {}
        for v in list(self.graph.value_info) + list(self.graph.input) + list(self.graph.output):
            t = v.type.tensor_type
            if t.HasField("shape"):
                out[v.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
        for name, init in self.initializers.items():
            out[name] = tuple(init.dims)
        return out

    def shape(self, name: str) -> tuple | None:
        """Dims with None for unknown or symbolic ones; None when even the rank is unknown."""
        return self._shapes.get(name)

    def attr(self, node: NodeProto, name: str, default=None):
        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default

    def pads(self, node: NodeProto, spatial, kernel, strides, dil) -> list[tuple[int, int]]:
        """(begin, end) padding of each spatial axis of a Conv or pool, auto_pad resolved for
        inputs of the `spatial` sizes."""
        auto = self.attr(node, "auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            pads = []
            for size, k, s, d in zip(spatial, kernel, strides, dil):
                total = max(0, (-(-size // s) - 1) * s + (k - 1) * d + 1 - size)
                small, big = total // 2, total - total // 2
                pads.append((small, big) if auto == "SAME_UPPER" else (big, small))
            return pads
        n = len(kernel)
        p = list(self.attr(node, "pads", (0,) * 2 * n)) if auto == "NOTSET" else [0] * (2 * n)
        return [(p[i], p[i + n]) for i in range(n)]

    def reshape_keeps_batch(self, reshape: NodeProto, target: list[int]) -> bool:
        """The Reshape's constant `target` leaves axis 0 as it was: 0 copies it (unless allowzero
        makes 0 a size), or it names the input's own fixed batch."""
        batch = (self.shape(reshape.input[0]) or (None,))[0]
        copies = target[:1] == [0] and not self.attr(reshape, "allowzero", 0)
        return copies or (batch is not None and target[:1] == [batch])
