"""One walk over the network for a whole pruning, as sequential layer-wise calibration does.

Group t's statistics are taken on the student in which groups 0 .. t-1 are refit. Rather than
running the network from its input for every group, the walk evaluates the torch twin's graph
node by node over all inputs at once and keeps each value only while a later step needs it.

A value is named by its node and a *version*: how many groups refit before t are among the
layers it depends on (the node and everything upstream). Two times at which that count is the
same see the same value, so it is computed once; version 0 is the teacher's value, which never
changes. In a plain chain each value is computed once per model and the walk is one pass. Where a
group's consumers lie at different depths (a residual stream read by every block), the layers
between them are evaluated again once that group is refit, because later groups must see it:
the walk redoes exactly the stretch whose inputs changed, nothing else.

The plan is made from the graph alone, before any data moves, so every value's last use is
known and it is freed right after.
"""
from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import fx

Value = tuple[fx.Node, int]  # (node, version); version 0 is the teacher's


@dataclass(frozen=True)
class Eval:
    value: Value
    inputs: dict[fx.Node, int]  # version of each input value it reads


@dataclass(frozen=True)
class Visit:
    """Every value time `t` asked for exists: take the group's statistics, solve, refit."""

    t: int
    values: tuple[Value, ...]


@dataclass(frozen=True)
class Free:
    value: Value


Op = Eval | Visit | Free


@dataclass
class Plan:
    """The walk for a sequence of times. `writes[t]`: the graph nodes whose weights change once
    time t is solved; `needs[t]`: (node, version) values time t reads, as `version(node, t)` or 0."""

    graph: fx.Graph
    writes: Sequence[set[fx.Node]]
    ops: list[Op] = field(default_factory=list)

    def __post_init__(self):
        self.index = {n: i for i, n in enumerate(self.graph.nodes)}
        own: dict[fx.Node, set[int]] = {}
        for t, nodes in enumerate(self.writes):
            for n in nodes:
                own.setdefault(n, set()).add(t)
        self._times: dict[fx.Node, list[int]] = {}
        for n in self.graph.nodes:  # topological: every input comes first
            times = set(own.get(n, ()))
            for i in n.all_input_nodes:
                times.update(self._times[i])
            self._times[n] = sorted(times)

    def version(self, node: fx.Node, t: int) -> int:
        """How many refits before time t the node's value depends on."""
        return bisect_left(self._times[node], t)

    def build(self, needs: Sequence[Sequence[Value]]) -> list[Op]:
        live: set[Value] = set()
        ops: list[Op] = []
        for t, wanted in enumerate(needs):
            todo: dict[Value, dict[fx.Node, int]] = {}
            stack = [v for v in wanted if v not in live]
            while stack:
                value = stack.pop()
                if value in live or value in todo:
                    continue
                node, version = value
                inputs = {i: 0 if version == 0 else self.version(i, t) for i in node.all_input_nodes
                          if i.op != "get_attr"}  # constants are read from the model when used
                todo[value] = inputs
                stack.extend((i, v) for i, v in inputs.items())
            for value in sorted(todo, key=lambda v: (self.index[v[0]], v[1])):
                ops.append(Eval(value, todo[value]))
                live.add(value)
            ops.append(Visit(t, tuple(dict.fromkeys(wanted))))
        self.ops = _with_frees(ops)
        return self.ops


def _with_frees(ops: list[Op]) -> list[Op]:
    """Free every value right after the last step that reads it."""
    last: dict[Value, int] = {}
    for k, op in enumerate(ops):
        reads = op.values if isinstance(op, Visit) else tuple(op.inputs.items())
        for value in reads:
            last[value] = k
        if isinstance(op, Eval):
            last.setdefault(op.value, k)
    out: list[Op] = []
    ending: dict[int, list[Value]] = {}
    for value, k in last.items():
        ending.setdefault(k, []).append(value)
    for k, op in enumerate(ops):
        out.append(op)
        out.extend(Free(v) for v in ending.get(k, ()))
    return out


class Walk:
    """Runs a plan for one teacher and any number of students (which share the teacher's
    values, version 0) over units of inputs, each unit a list of pieces (a model that fixes
    its batch takes a unit in pieces of that batch)."""

    def __init__(self, teacher: fx.GraphModule, students: Sequence[fx.GraphModule],
                 units: Sequence[Sequence[torch.Tensor]]):
        self.teacher = fx.Interpreter(teacher)
        self.students = [fx.Interpreter(s) for s in students]
        self.units = [len(u) for u in units]
        self.inputs = [piece for unit in units for piece in unit]
        self.values: dict[Value, list] = {}  # version 0: per piece; else per student, per piece

    @torch.no_grad()
    def run(self, ops: Sequence[Op], visit: Callable[[int], None]) -> None:
        for op in ops:
            if isinstance(op, Eval):
                self._eval(op)
            elif isinstance(op, Visit):
                visit(op.t)
            else:
                del self.values[op.value]

    def unit_values(self, value: Value, student: int = 0) -> list[torch.Tensor]:
        """The value for every unit, its pieces joined."""
        pieces = self.values[value] if value[1] == 0 else self.values[value][student]
        out, at = [], 0
        for count in self.units:
            out.append(pieces[at] if count == 1 else torch.cat(pieces[at:at + count]))
            at += count
        return out

    def _eval(self, op: Eval) -> None:
        node, version = op.value
        if version == 0:
            self.values[op.value] = self._pieces(self.teacher, node, op.inputs, None)
        else:
            self.values[op.value] = [self._pieces(m, node, op.inputs, s) for s, m in enumerate(self.students)]

    def _pieces(self, model: fx.Interpreter, node: fx.Node, inputs: dict[fx.Node, int], student: int | None) -> list:
        if node.op == "placeholder":
            return list(self.inputs)
        out = []
        for p in range(len(self.inputs)):
            def read(arg: fx.Node):
                if arg.op == "get_attr":
                    return model.fetch_attr(arg.target)
                found = self.values[(arg, inputs[arg])]
                return (found if inputs[arg] == 0 else found[student])[p]

            args = fx.node.map_arg(node.args, read)
            kwargs = fx.node.map_arg(node.kwargs, read)
            out.append(getattr(model, node.op)(node.target, args, kwargs))
        return out
