"""A new ONNX model with pruned channels physically removed (initializers sliced, no masks).

Edits are made per node input slot, never on a shared initializer in place: if the same
tensor also feeds a node outside the group, that node keeps the original. Consumers get
their refit weights first; then every (slot, axis) is cut once by a mask that all groups
touching it have marked, so channels of several groups joined by a Concat are removed
together and a layer that consumes one group and produces another is cut on both axes.
"""
from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import ModelProto, numpy_helper

from exporters import heads
from pipeline.analyze import ChannelGroup
from pipeline.graph import GraphView
from pipeline.prune import LayerWeights


def slim(proto: ModelProto, groups: list[ChannelGroup], kept: dict[int, np.ndarray],
         layers: dict[str, LayerWeights]) -> ModelProto:
    """Slice every producer-side parameter and consumer weight of the pruned groups."""
    out = ModelProto()
    out.CopyFrom(proto)
    view = GraphView(out)
    editor = _SlotEditor(out)
    pruned = [g for g in groups if g.id in kept]
    for name in dict.fromkeys(c.node for g in pruned for c in g.consumers):
        node = view.nodes[name]
        editor.set(node, 1, layers[name].weight)
        if layers[name].bias is not None:
            slot = layers[name].bias_slot
            node.input.extend([""] * (slot + 1 - len(node.input)))
            editor.set(node, slot, layers[name].bias)
    masks: dict[tuple[str, int, int], np.ndarray] = {}  # (node, input slot, axis) -> entries kept

    def drop(node: str, index: int, axis: int, entries: np.ndarray) -> None:
        value = editor.get(view.nodes[node], index)
        if value is None or value.ndim == 0 or value.shape[axis] == 1:
            return  # no such input, or one value broadcast over all channels
        axis %= value.ndim
        masks.setdefault((node, index, axis), np.ones(value.shape[axis], bool))[entries] = False

    for group in pruned:
        dropped = np.setdiff1d(np.arange(group.size), kept[group.id])
        for c in group.consumers:
            for offset in c.offsets:
                drop(c.node, 1, c.in_axis, _expand(dropped + offset, c.block))
        for s in group.slices:
            drop(s.node, s.index, s.axis, _expand(dropped + s.offset, s.block))
        for e in group.shape_edits:
            node = view.nodes[e.node]
            shape = editor.get(node, e.index).copy()
            shape[e.position] -= (group.size - len(kept[group.id])) * e.block
            editor.set(node, e.index, shape)
    for (name, index, axis), mask in masks.items():
        node = view.nodes[name]
        editor.set(node, index, np.compress(mask, editor.get(node, index), axis=axis))
    for name in dict.fromkeys(n for g in pruned for n in g.group_attrs):
        node = view.nodes[name]
        weight = editor.get(node, 1)  # (channels, channels per group, ...): as many in as out
        _set_int_attr(node, "group", weight.shape[0] // weight.shape[1])
    lost_heads = [g for g in pruned if g.attention is not None and len(kept[g.id]) < g.size]
    for group in lost_heads:
        dtype = editor.get(view.nodes[group.attention.out], 1).dtype
        heads.rewrite(out, group.attention, group.follows, len(kept[group.id]), dtype)
    if lost_heads:
        heads.drop_dead(out.graph)
    editor.drop_unused()
    del out.graph.value_info[:]
    out = onnx.shape_inference.infer_shapes(out, check_type=True, strict_mode=True, data_prop=True)
    onnx.checker.check_model(out, full_check=True)
    return out


def _set_int_attr(node, name: str, value: int) -> None:
    for a in node.attribute:
        if a.name == name:
            a.i = value
            return
    raise ValueError(f"node '{node.name}' has no attribute '{name}'")


def _expand(idx: np.ndarray, block: int) -> np.ndarray:
    return (idx[:, None] * block + np.arange(block)[None, :]).reshape(-1)


class _SlotEditor:
    """Reads and replaces the tensor in one node input slot, keeping names where it is safe."""

    def __init__(self, proto: ModelProto):
        self.graph = proto.graph
        self.inits = {i.name: i for i in self.graph.initializer}
        self.uses = Counter(i for n in self.graph.node for i in n.input if i)
        self.uses.update(o.name for o in self.graph.output)
        self.names = set(self.inits) | {v for n in self.graph.node for v in list(n.input) + list(n.output)}
        self.owned: set[str] = set()  # initializers that only this editor's slots use

    def get(self, node, index: int) -> np.ndarray | None:
        name = node.input[index] if index < len(node.input) else ""
        return numpy_helper.to_array(self.inits[name]) if name in self.inits else None

    def set(self, node, index: int, value: np.ndarray) -> None:
        old = node.input[index]
        if old in self.owned or (old in self.inits and self.uses[old] == 1):
            self.inits[old].CopyFrom(numpy_helper.from_array(value, old))
            self.owned.add(old)
            return
        name = self._fresh(old or f"{node.name}_bias")
        self.graph.initializer.append(numpy_helper.from_array(value, name))
        self.inits[name] = self.graph.initializer[-1]
        self.owned.add(name)
        if old:
            self.uses[old] -= 1
        self.uses[name] += 1
        node.input[index] = name

    def _fresh(self, base: str) -> str:
        name, k = f"{base}_slim", 1
        while name in self.names:
            name, k = f"{base}_slim{k}", k + 1
        self.names.add(name)
        return name

    def drop_unused(self) -> None:
        used = {i for n in self.graph.node for i in n.input} | {o.name for o in self.graph.output}
        keep = [i for i in self.graph.initializer if i.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(keep)
