"""Channel groups traced on the ONNX graph: which channels can go, and where they live.

    model.py   the groups (ChannelGroup and its slices, consumers, shape edits) and trace signals
    attention.py  multi-head attention blocks, probed, whose groups are whole heads
    tracer.py  find_groups(): the walk, forward to readers and backward to writers of each group
    rules.py   the registry: per op type, how the walk crosses a node (one registration per op)
    checks.py  what the rules read from the graph (linear layers, Slice bounds, GroupNorm, Resize sizes)
"""
from pipeline.analyze.model import Attention, ChannelGroup, Consumer, ParamSlice, ShapeEdit
from pipeline.analyze.rules import BINARY, LINEAR, PER_CHANNEL_PARAMS, POOL, RECURRENT, RULES, UNARY, Rule, rule_for
from pipeline.analyze.tracer import find_groups

__all__ = ["Attention", "BINARY", "LINEAR", "PER_CHANNEL_PARAMS", "POOL", "RECURRENT", "RULES", "UNARY", "ChannelGroup",
           "Consumer", "ParamSlice", "Rule", "ShapeEdit", "find_groups", "rule_for"]
