"""Stage 4: few-shot pruning, group by group in network order.

The teacher is the converted original; the student starts as its copy and is pruned in
place (masked: dropped input channels of each consumer are zero, producers untouched), so
that every later group sees the real student input h_s that its predecessors left behind.
Only Gram matrices are kept, accumulated over chunks of samples: memory does not grow with
the number of samples.
"""
from __future__ import annotations

import copy
import fnmatch
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import engine, hardware
from pipeline.analyze import ChannelGroup, Consumer
from pipeline.augment import Augmenter
from pipeline.convert import TorchModel
from pipeline.errors import ModelError
from pipeline.graph import GraphView
from pipeline.solve import METHODS, SOLVERS, Problem, Stats, dropped_rows, solve_closed, solve_l1, solve_pgd


SCOPES = ("internal", "all")
GRAMS = {"cross": "tt,ss", "layerwise": "ss,st", "soft": "tt,ss,st"}  # (ss, st: student rows first)
ALIGN = 8  # channel multiple that onnxruntime's CPU (without AVX-512) and CUDA float kernels are fastest at
CONVS = (torch.nn.Conv1d, torch.nn.Conv2d)  # the convolutions a consumer refit handles (1-D as 2-D of height 1)


@dataclass(frozen=True)
class PruneConfig:
    ratio: float = 0.5  # share of each group's channels kept
    method: str = "cross"
    mu: float = 0.6
    solver: str = "closed"
    damp: float = 0.01
    pgd_iters: int = 3000
    pgd_lr: float = 1e-3
    chunk: int = 16  # samples per forward pass while accumulating statistics
    round_to: int = 0  # kept channels a multiple of this; 0: by the group's size and the CPU (see step)
    scope: str = "internal"  # internal: single-producer groups only (the paper's choice); all: coupled too
    exclude: tuple[str, ...] = ()  # fnmatch patterns: groups with a producer or consumer matching stay whole

    def __post_init__(self):
        if not 0 < self.ratio < 1:
            raise ValueError("ratio must be in (0, 1)")
        if not 0 <= self.mu <= 1:
            raise ValueError("mu must be in [0, 1]")
        if self.method not in METHODS or self.solver not in SOLVERS or self.scope not in SCOPES:
            raise ValueError(f"method in {METHODS}, solver in {SOLVERS}, scope in {SCOPES}")

    def excludes(self, group: ChannelGroup) -> str:
        """The first layer of the group that an --exclude pattern names, or ''."""
        names = group.producers + [c.node for c in group.consumers]
        return next((n for n in names for pat in self.exclude if fnmatch.fnmatchcase(n, pat)), "")

    def step(self, size: int, unit: int = 1) -> int:
        """The multiple a group of `size` units of `unit` channels keeps, in units. onnxruntime's
        CPU convolutions pad every width to a multiple of their channel block (16 with AVX-512,
        else 8) and GPU kernels favour multiples of 8, so a group keeps multiples of the block if
        it has four blocks or more, of ALIGN if it has four of those; smaller groups are left
        unrounded, since multiples of 8 would leave a 16-channel group only 8 or 16
        (docs/BENCHMARKS.md: what that costs on CPU). Units of a grouped Conv are already
        that many channels wide."""
        channels = self.round_to or next((s for s in (hardware.channel_block(), ALIGN) if size * unit >= 4 * s), 1)
        return max(1, channels // unit)

    def kept_count(self, size: int, unit: int = 1) -> int:
        keep = max(1, round(self.ratio * size))
        step = self.step(size, unit)
        if step > 1:
            keep = min(size, max(step, round(keep / step) * step))
        return keep


class _Kept:
    """What fits in `budget` bytes of one device's memory (an eighth of it by default), first come
    first kept: the caches below serve every pruning of one set of samples."""

    def __init__(self, budget: int | None = None):
        self.budget = budget
        self._items: dict = {}
        self._bytes = 0
        self.hits = 0

    def _get(self, key):
        found = self._items.get(key)
        self.hits += found is not None
        return found

    def _put(self, key, value, size: int, device: torch.device) -> None:
        if self.budget is None:
            self.budget = engine.memory(device) // 8
        if key not in self._items and self._bytes + size <= self.budget:
            self._items[key] = value
            self._bytes += size


class TeacherGrams(_Kept):
    """G_tt of each consumer over one set of samples and their variants. The teacher never
    changes, so every student pruned from the same samples (the candidates of --method auto,
    the widths a target tries) can share them (a full-width VGG-16's twelve 3x3 conv consumers
    take about 1 GB)."""

    def get(self, consumer: str, chunk: int) -> tuple[torch.Tensor, int] | None:
        return self._get((consumer, chunk))

    def put(self, consumer: str, chunk: int, gram: torch.Tensor, rows: int) -> None:
        self._put((consumer, chunk), (gram, rows), gram.numel() * gram.element_size(), gram.device)


@dataclass
class LayerWeights:
    """New ONNX-layout weights of one consumer (full input width, dropped channels zero)."""

    weight: np.ndarray
    bias: np.ndarray | None  # None for MatMul, which has no bias input


@dataclass
class GroupOutcome:
    group: int
    size: int
    kept: np.ndarray
    loss: float
    seconds: float


@dataclass
class PruneResult:
    student: TorchModel
    outcomes: list[GroupOutcome]
    layers: dict[str, LayerWeights]
    skipped: dict[int, str] = field(default_factory=dict)  # group id -> why it was left whole

    @property
    def kept(self) -> dict[int, np.ndarray]:
        return {o.group: o.kept for o in self.outcomes}


@dataclass
class _Solved:
    """One group's result on the student the groups before it left: its consumers' new weights
    and held rows, in the order of `group.consumers`."""

    outcome: GroupOutcome
    layers: list[LayerWeights]
    fixed: list[torch.Tensor]


class Prefixes(_Kept):
    """Groups already solved on one set of samples, by configuration and the widths of every group
    pruned up to and including them: that is all the student a group sees depends on. A trial
    that differs from an earlier one only from some group on (the refinement narrows or widens
    one or two groups at a time) then redoes only that far, with results equal to the last bit."""

    def get(self, key: tuple) -> _Solved | None:
        return self._get(key)

    def put(self, key: tuple, solved: _Solved) -> None:
        size = sum(a.nbytes for layer in solved.layers for a in (layer.weight, layer.bias) if a is not None)
        self._put(key, solved, size, torch.device("cpu"))  # the layers' new weights are numpy arrays


class _Stop(Exception):
    """Ends a forward pass once every input we need has been seen."""


def prune(view: GraphView, teacher: TorchModel, groups: list[ChannelGroup], x: np.ndarray,
          config: PruneConfig, progress: Callable[[str], None] = lambda _: None,
          augmenter: Augmenter | None = None, keep: dict[int, int] | None = None,
          cache: TeacherGrams | None = None, reuse: Prefixes | None = None) -> PruneResult:
    """Prune every eligible group to `config.ratio`, or to `keep[group id]` channels when an
    allocation is given (groups it leaves out stay whole). Pass one `cache`, and one `reuse`, to
    every call on the same samples."""
    student = TorchModel(copy.deepcopy(teacher.module), {}, batch=teacher.batch, device=teacher.device)
    named = dict(student.module.named_modules())
    teacher_names = {m: n for n, m in teacher.module.named_modules()}
    student.modules_by_node = {k: named[teacher_names[m]] for k, m in teacher.modules_by_node.items()}
    student.entries = {k: named[teacher_names[m]] for k, m in teacher.entries.items()}
    result = PruneResult(student, [], {})
    fixed: dict[str, torch.Tensor] = {}  # consumer -> input rows dropped with earlier groups (Concat)
    widths: list[tuple[int, int]] = []  # (group id, kept) of every group pruned so far
    for group in groups:
        if not group.prunable:
            continue
        count = config.kept_count(group.size, group.unit) if keep is None else keep.get(group.id, group.size)
        why = skip_reason(teacher, group, config) or ("" if count < group.size else "nothing to remove")
        if why:
            result.skipped[group.id] = why
            progress(f"group {group.id}: skipped ({why})")
            continue
        widths.append((group.id, count))
        key = (config, tuple(widths))
        solved = reuse.get(key) if reuse is not None else None
        if solved is None:
            solved = _solve_group(view, teacher, student if result.layers else teacher, group, count, x, config,
                                  augmenter, fixed, cache)
            if reuse is not None:
                reuse.put(key, solved)
        for consumer, layer, rows in zip(group.consumers, solved.layers, solved.fixed):
            fixed[consumer.node] = rows
            result.layers[consumer.node] = layer
            _write(student, layer, view, consumer)
        result.outcomes.append(solved.outcome)
        progress(f"group {group.id}: {group.channels} -> {len(solved.outcome.kept) * group.unit} channels")
    return result


def _solve_group(view: GraphView, teacher: TorchModel, student: TorchModel, group: ChannelGroup, count: int,
                 x: np.ndarray, config: PruneConfig, augmenter: Augmenter | None, fixed: dict[str, torch.Tensor],
                 cache: TeacherGrams | None) -> _Solved:
    """Statistics, selection and refit of one group on the student as the groups before it left it
    (until a layer is refit the student computes what the teacher does: pass the teacher)."""
    start = time.perf_counter()
    problems = group_problems(view, teacher, student, group, x, config, augmenter, fixed, cache)
    sol = _solve(problems, count, config)
    layers = [_to_onnx_layout(view, consumer, w) for consumer, w in zip(group.consumers, sol.weights)]
    rows = [dropped_rows(problem, sol.kept) for problem in problems]
    kept = sol.kept.cpu().numpy().astype(np.int64)
    return _Solved(GroupOutcome(group.id, group.size, kept, sol.loss, time.perf_counter() - start), layers, rows)


def _solve(problems: list[Problem], keep: int, config: PruneConfig):
    if config.method == "l1":
        return solve_l1(problems, keep)
    if config.solver == "pgd":
        return solve_pgd(problems, keep, config.method, config.mu, config.damp,
                         config.pgd_iters, config.pgd_lr)
    return solve_closed(problems, keep, config.method, config.mu, config.damp)


def skip_reason(teacher: TorchModel, group: ChannelGroup, config: PruneConfig) -> str:
    """Why a prunable group is left whole under this configuration, or ''."""
    if config.excludes(group):
        return f"excluded by --exclude ({config.excludes(group)})"
    if group.coupling and config.scope == "internal":
        return f"coupled: {group.coupling}; --scope all prunes it"
    return _unsupported(teacher, group)


def group_problems(view: GraphView, teacher: TorchModel, student: TorchModel, group: ChannelGroup,
                   x: np.ndarray, config: PruneConfig, augmenter: Augmenter | None,
                   fixed: dict[str, torch.Tensor] | None = None, cache: TeacherGrams | None = None) -> list[Problem]:
    """One least-squares problem per consumer, with its statistics over the samples (none for l1)."""
    fixed = fixed or {}
    problems = [_problem(view, c, group.size, fixed.get(c.node), teacher.device) for c in group.consumers]
    if config.method != "l1":
        _collect(view, teacher, student, group.consumers, problems, x, config.chunk, augmenter,
                 "tt" if student is teacher else GRAMS[config.method], cache)
    return problems


def _unsupported(teacher: TorchModel, group: ChannelGroup) -> str:
    for c in group.consumers:
        module = teacher.modules_by_node.get(c.node)
        if not isinstance(module, (*CONVS, torch.nn.ConvTranspose2d, torch.nn.Linear)) \
                and type(module).__name__ != "OnnxMatMul":
            return (f"consumer '{c.node}' became {type(module).__name__} in torch, not "
                    f"Conv1d/Conv2d/ConvTranspose2d/Linear/MatMul")
    return ""


def _problem(view: GraphView, consumer: Consumer, channels: int, fixed: torch.Tensor | None,
             device: torch.device) -> Problem:
    """Teacher weights in solver layout (inputs x outputs, bias row last) and channel rows, on `device`."""
    node = view.nodes[consumer.node]
    w = view.const(node.input[1]).astype(np.float64)
    bias = view.const(node.input[2]).astype(np.float64) if len(node.input) > 2 and node.input[2] else None
    if consumer.kind == "conv":
        out = w.shape[0]
        mat = w.reshape(out, -1).T
        per = consumer.block * int(np.prod(w.shape[2:]))  # a unit of `block` channels, each a kernel of columns
    elif consumer.kind == "deconv":  # each input pixel writes its own kernel-sized patch of outputs
        mat = w.reshape(w.shape[0], -1)
        out, per, bias = mat.shape[1], consumer.block, None  # its bias is per output channel, not per patch entry: kept
    else:
        mat = (w.T if consumer.in_axis == 1 else w) * view.attr(node, "alpha", 1.0)
        out = mat.shape[1]
        per = consumer.block
        if bias is not None:
            bias = np.broadcast_to(bias * view.attr(node, "beta", 1.0), (out,))
    bias_row = np.zeros((1, out)) if bias is None else np.asarray(bias).reshape(1, out)
    weight = torch.from_numpy(np.concatenate([mat, bias_row])).to(device)
    if node.op_type in ("MatMul", "ConvTranspose"):  # no bias to refit (a ConvTranspose's is kept): its row stays zero
        bias_row_index = torch.tensor([len(mat)], device=device)
        fixed = bias_row_index if fixed is None else torch.unique(torch.cat([fixed, bias_row_index]))
    arange = lambda n: torch.arange(n, device=device)
    columns = [((o + arange(channels)) * per)[:, None] + arange(per)[None, :] for o in consumer.offsets]
    return Problem(weight, torch.cat(columns, dim=1), fixed=fixed)


def _collect(view: GraphView, teacher: TorchModel, student: TorchModel, consumers: list[Consumer],
             problems: list[Problem], x: np.ndarray, chunk: int, augmenter: Augmenter | None, grams: str,
             cache: TeacherGrams | None = None) -> None:
    """Accumulate the Gram matrices a method needs (of "tt", "ss", "st") for every consumer over
    the samples and their augmented variants, one chunk at a time. Each is a product of
    (rows x features) matrices, the bulk of pruning time; with grams "tt" (the student is the
    teacher) one stands for all three. G_tt found in `cache` is not recomputed, and the teacher
    is not even run when nothing else needs its inputs."""
    hits = [cache.get(c.node, chunk) if cache is not None and "tt" in grams else None for c in consumers]
    cached = all(h is not None for h in hits)
    todo = [g for g in grams.split(",") if not (cached and g == "tt")]
    dims = [len(p.weight) for p in problems]
    sums = [{g: torch.zeros(d, d, dtype=torch.float64, device=teacher.device) for g in todo} for d in dims]
    rows = [0] * len(problems)
    for ci, i in enumerate(range(0, len(x), chunk) if todo else ()):
        for variant in (augmenter.variants(x[i:i + chunk], ci) if augmenter else [x[i:i + chunk]]):
            batch = torch.from_numpy(variant).to(teacher.device)
            xt = _capture(teacher, consumers, batch) if any("t" in g for g in todo) else None
            xs = xt if grams == "tt" else _capture(student, consumers, batch)
            for k, c in enumerate(consumers):
                a = {"s": _rows(view, c, xs[k])}
                if xt is not None:
                    a["t"] = a["s"] if xt is xs else _rows(view, c, xt[k])
                for g, total in sums[k].items():
                    _add_gram(total, a[g[0]], a[g[1]])
                rows[k] += len(a["s"])
    for c, hit, p, s, n in zip(consumers, hits, problems, sums, rows if todo else [h[1] for h in hits]):
        if not all(torch.isfinite(g.sum()) for g in s.values()):  # an Inf or NaN anywhere makes the sum one
            raise ModelError(f"layer '{c.node}' receives NaN or Inf on the samples (teacher or student); "
                             f"check the model and the data's preprocessing")
        mean = {g: (_mirror(total) if g[0] == g[1] else total).div_(n) for g, total in s.items()}
        if cached:
            mean["tt"] = hit[0]
        elif cache is not None and "tt" in mean:
            cache.put(c.node, chunk, mean["tt"], n)
        if grams == "tt":
            p.stats = Stats(mean["tt"], mean["tt"], mean["tt"], n)
        else:
            p.stats = Stats(*(mean.get(g) for g in ("tt", "ss", "st")), n)


def _add_gram(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor, blocks: int = 4) -> None:
    """total += a'b (float32 product, float64 sum). For a Gram a'a only the blocks on and above
    the diagonal are computed, 5/8 of the work with four blocks; `_mirror` completes it once."""
    if a is not b:
        total += (a.T @ b).double()
        return
    cuts = [len(total) * i // blocks for i in range(blocks + 1)]
    for start, end in zip(cuts, cuts[1:]):
        total[start:end, start:] += (a[:, start:end].T @ a[:, start:]).double()


def _mirror(upper: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle `_add_gram` accumulated (`upper` is consumed)."""
    upper = upper.triu_()
    full = upper + upper.T
    full.diagonal().sub_(upper.diagonal())
    return full


@torch.no_grad()
def _capture(model: TorchModel, consumers: list[Consumer], batch: torch.Tensor) -> list[torch.Tensor]:
    """Inputs of the consumers for one batch, stopping the forward once all are seen."""
    if model.batch and len(batch) > model.batch:
        parts = [_capture(model, consumers, piece) for piece in batch.split(model.batch)]
        return [torch.cat(inputs) for inputs in zip(*parts)]
    seen: dict[str, torch.Tensor] = {}

    def hook_for(name):
        def hook(_module, args):
            seen[name] = args[0].detach()
            if len(seen) == len(consumers):
                raise _Stop
        return hook

    handles = [model.entry(c.node).register_forward_pre_hook(hook_for(c.node)) for c in consumers]
    try:
        model.module(batch)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return [seen[c.node] for c in consumers]


def _rows(view: GraphView, consumer: Consumer, inp: torch.Tensor) -> torch.Tensor:
    """The consumer's input as rows of its linear map (patches for Conv), with a ones column."""
    node = view.nodes[consumer.node]
    if consumer.kind == "conv":
        w_shape = view.initializers[node.input[1]].dims
        axes = len(w_shape) - 2
        kernel = tuple(view.attr(node, "kernel_shape", w_shape[2:]))
        strides = tuple(view.attr(node, "strides", (1,) * axes))
        dil = tuple(view.attr(node, "dilations", (1,) * axes))
        pads = view.pads(node, inp.shape[2:], kernel, strides, dil)
        if axes == 1:  # a 1-D conv (audio, series) is a 2-D one over a height of 1
            inp, kernel, strides, dil, pads = inp.unsqueeze(2), (1, *kernel), (1, *strides), (1, *dil), [(0, 0), *pads]
        inp = F.pad(inp, (*pads[1], *pads[0]))
        cols = F.unfold(inp, kernel, dilation=dil, stride=strides)  # (N, C*kh*kw, L)
        flat = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    elif consumer.kind == "deconv":  # every input pixel is a row
        flat = inp.movedim(1, -1).reshape(-1, inp.shape[1])
    elif inp.dim() > 2:  # MatMul over N...C: every position is a row
        flat = inp.reshape(-1, inp.shape[-1])
    else:
        flat = inp.reshape(inp.shape[0], -1)
    return torch.cat([flat, flat.new_ones(len(flat), 1)], dim=1)


def _to_onnx_layout(view: GraphView, consumer: Consumer, w: torch.Tensor) -> LayerWeights:
    node = view.nodes[consumer.node]
    orig = view.const(node.input[1])
    mat, bias = w[:-1].cpu().numpy(), w[-1].cpu().numpy()
    if consumer.kind == "conv":
        weight = mat.T.reshape(orig.shape)
    elif consumer.kind == "deconv":
        weight = mat.reshape(orig.shape)
    else:
        mat = mat / view.attr(node, "alpha", 1.0)
        weight = mat.T if consumer.in_axis == 1 else mat
        bias = bias / (view.attr(node, "beta", 1.0) or 1.0)
    if node.op_type in ("MatMul", "ConvTranspose"):
        return LayerWeights(weight.astype(orig.dtype), None)
    return LayerWeights(weight.astype(orig.dtype), bias.astype(orig.dtype))


@torch.no_grad()
def _write(student: TorchModel, layer: LayerWeights, view: GraphView, consumer: Consumer) -> None:
    """Put the refit weights into the student's torch layer (onnx2torch folds alpha/beta in)."""
    node, module = view.nodes[consumer.node], student.layer(consumer.node)
    if node.op_type == "MatMul":
        weight = student.constant_input(consumer.node, 1)
        weight.copy_(torch.from_numpy(layer.weight))
        return
    if node.op_type == "ConvTranspose":  # same layout in torch; the bias stays
        module.weight.copy_(torch.from_numpy(layer.weight))
        return
    if isinstance(module, CONVS):
        weight = torch.from_numpy(layer.weight)
        bias = torch.from_numpy(layer.bias)
    else:
        alpha, beta = view.attr(node, "alpha", 1.0), view.attr(node, "beta", 1.0) or 1.0
        w = layer.weight if consumer.in_axis == 1 else layer.weight.T
        weight = torch.from_numpy(alpha * w)
        bias = torch.from_numpy(beta * layer.bias)
    module.weight.copy_(weight)
    # a new Parameter: the layer may have had no bias, or a broadcast one of another shape
    module.bias = torch.nn.Parameter(bias.to(module.weight.device, module.weight.dtype), requires_grad=False)
