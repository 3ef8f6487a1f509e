"""Predicted latency as a function of each group's kept channels, from a per-layer table.

FLOPs are a poor proxy on real kernels (odd widths, memory-bound small layers), so every
Conv, Gemm and MatMul layer is timed alone in onnxruntime, on the chosen provider, thread
count and batch size, at a grid of input x output widths; between grid points the time is
interpolated bilinearly. The rest of the network (what the table's layers do not explain of
the measured whole) is taken as fixed. Timings are cached on disk by layer signature, provider,
threads, batch, onnxruntime version and CPU, so a model is only ever measured once per setting.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from pipeline import hardware
from pipeline.allocate import Allocation, Curves, FlopsModel, allocate, uniform, widest_uniform
from pipeline.graph import GraphView
from pipeline.runtime import SessionConfig, cache_dir, make_session

ALLOCATED = "allocated"  # the name of widths allocated from the loss curves, beside "uniform"

GRID = (1.0, 0.75, 0.5, 0.25, 0.125)  # shares of a layer's channels timed on each varying axis
RATIO_STEP = 0.05  # one ratio for all: a bracket of measured ratios this narrow ends the search
RUNS, WARMUP, MAX_SECONDS = 15, 3, 0.5  # per grid point: median of RUNS, or fewer past MAX_SECONDS


def cache_path() -> Path:
    return cache_dir() / "latency.json"


@dataclass
class LatencyModel:
    """Predicted milliseconds of the whole model for any kept-channel counts."""

    widths: FlopsModel
    tables: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]  # node -> (in shares, out shares, ms grid)
    rest_ms: float  # measured whole minus the table's layers at full width
    scale: float  # applied to the table so that the full-width prediction equals the measurement
    measured: int  # grid points timed now (the others came from the cache)

    def cost(self, keep: dict[int, int]) -> float:
        total = 0.0
        for node, (fin, fout) in self.widths.fractions(keep).items():
            if node in self.tables:
                total += _bilinear(*self.tables[node], fin, fout)
        return self.rest_ms + self.scale * total

    def to_json(self) -> dict:
        return {"layers": len(self.tables), "rest_ms": float(self.rest_ms), "table_scale": float(self.scale),
                "grid_points_measured": self.measured, "cache": str(cache_path())}


@dataclass
class Steering:
    """Allocations for a measured goal: predict, prune, measure; after a miss ask the prediction
    for that much less, after a result well under the goal for more, and once both are known,
    close in on where the readings cross the aim. One ratio for all, once one has met, takes the
    widest ratio inside the bracket of measured ones that this prediction says meets, or else
    where the readings at the bracket's ends cross the aim. Misses and hits
    count against the aim, a margin under the goal. The attempt kept is the one that pruned least
    among those that met the aim: the widest ratio, or the slowest allocation against its
    teacher."""

    model: LatencyModel
    curves: Curves
    teacher_ms: float
    goal_ms: float
    session: SessionConfig
    batch: int
    target: dict
    uniform: bool = False  # one ratio for every group (the largest predicted to meet the goal)
    attempts: list[dict] = field(default_factory=list)
    close: float = 0.95  # a result at least this share of the aim ends the search
    margin: float = 0.03  # aimed this much under the goal: one timing of a model 1% under it is a coin toss later
    near: float = 0.05  # a miss by less than this share of the aim is worth timing again

    def __post_init__(self):
        self.aim_ms = self.goal_ms * (1 - self.margin)
        self.share = self.aim_ms / self.teacher_ms
        self.bounds = [0.0, math.inf]  # predicted shares known to meet / to miss the goal
        self.readings = [0.0, 1.0]  # their measured shares of the teacher's time
        self.ratios = [0.0, 1.0]  # one ratio for all: widest known to meet / narrowest known to miss
        self.read_at = {1.0: 1.0}  # one ratio for all: measured share of the teacher's time per ratio
        self.ratio = 1.0  # the one ratio of the last allocation

    @property
    def name(self) -> str:
        return "uniform" if self.uniform else ALLOCATED

    def allocation(self) -> Allocation:
        """Stops at the groups' floors if the prediction says the goal is out of reach: the
        prediction may be wrong (the rest of the network is taken as fixed), the measurement
        decides, and a miss is reported."""
        if not self.uniform:
            return allocate(self.curves, self.model, self.share, "latency", strict=False)
        sizes = self.curves.sizes
        full = self.model.cost(sizes)
        if self.ratios[0] > 0:  # a ratio met the aim: toward the widest that does, by measurement
            keep = self._predicted_inside(full) or self._bisected()
        else:
            self.ratio, keep = (widest_uniform(self.curves, self.model.cost, self.share * full)
                                or (0.01, uniform(self.curves, 0.01)))
        return Allocation({k: v for k, v in keep.items() if v < sizes[k]}, self.share,
                          self.model.cost(keep) / full, "latency, one ratio")

    def _predicted_inside(self, full: float) -> dict[int, int] | None:
        """The widest ratio inside the bracket that the prediction, corrected by what was measured
        (`share`), says meets the aim, if its widths are new. Halving the bracket instead spent
        ResNet-18's last three rounds at batch 32 on 0.81, 0.715 and 0.667 after 0.62 met with 21%
        to spare, and kept 0.62: 2.64x for 2x asked. None where the prediction has nothing new to
        offer: halving, by measurement alone, decides then (a latency flat in width misleads it)."""
        low, high = self.ratios
        met, missed = (uniform(self.curves, r) for r in self.ratios)
        found = widest_uniform(self.curves, self.model.cost, self.share * full, high - 0.01, low, skip=missed)
        if found is None or found[1] == met:
            return None
        self.ratio, keep = found
        return keep

    def _bisected(self) -> dict[int, int]:
        """Widths of the ratio where the readings at the bracket's ends, interpolated, cross the aim
        (the teacher reads 1.0 at full width). The middle went from GoogLeNet's 0.62, read 0.40 of
        the teacher's time at batch 1, to 0.81 (0.65, a miss) with no round left, and 0.62 was kept
        at 2.5x for 2x asked; the readings point to 0.68. Rounded to steps, a ratio can give the
        widths of one already measured, which would end the search there: the demo at batch 1 met
        at ratio 0.37 (8 of 32 channels) and missed by 3.5% at 0.53 in one slow reading, whose
        widths the middle, 0.45, has too; the search stopped at 0.37 and kept a model 15 points
        less accurate. The bracket then shrinks to that side and its middle is taken."""
        low, high = self.ratios
        if low in self.read_at and high in self.read_at:
            self.ratio = _falsi((low, high), (self.read_at[low], self.read_at[high]), self.aim_ms / self.teacher_ms)
            keep = uniform(self.curves, self.ratio)
            if keep not in [uniform(self.curves, r) for r in self.ratios]:
                return keep
        while True:
            self.ratio = sum(self.ratios) / 2
            keep = uniform(self.curves, self.ratio)
            ends = [uniform(self.curves, r) for r in self.ratios]
            if keep not in ends or self.ratios[1] - self.ratios[0] <= RATIO_STEP / 4:
                return keep
            self.ratios[ends.index(keep)] = self.ratio

    def record(self, alloc: Allocation, measured_ms: float, teacher_ms: float,
               progress: Callable[[str], None]) -> bool:
        """Log an attempt, timed with the teacher in one run, and choose the next share; True when
        searching further cannot help. A speedup goal follows the teacher's time in that run: the
        same teacher timed alone minutes earlier was 25% slower at batch 1 here."""
        if self.target.get("speedup"):
            self.teacher_ms, self.goal_ms = teacher_ms, teacher_ms / self.target["speedup"]
            self.aim_ms = self._aim(teacher_ms)
        self.attempts.append({"predicted_share": self.share, "predicted_ms": alloc.share * self.teacher_ms,
                              "ratio": self.ratio if self.uniform else None,
                              "measured_ms": measured_ms, "teacher_ms": teacher_ms, "goal_ms": self.goal_ms,
                              "aim_ms": self.aim_ms})
        progress(f"latency target ({self.name} widths): {measured_ms:.3f} ms measured for {self.goal_ms:.3f} ms "
                 f"asked (teacher {teacher_ms:.3f} ms in the same run, attempt {len(self.attempts)})")
        met = measured_ms <= self.aim_ms
        if self.uniform:
            self.read_at[self.ratio] = measured_ms / teacher_ms
            # where latency barely changes with width, "close to the aim" says nothing about how
            # much wider one ratio could be: stop on a narrow bracket of measured ratios instead
            self.ratios = [max(self.ratios[0], self.ratio), self.ratios[1]] if met else \
                [self.ratios[0], min(self.ratios[1], self.ratio)]
            if met and self.ratios[1] - self.ratios[0] <= RATIO_STEP:
                return True
        elif met and (measured_ms >= self.close * self.aim_ms or self.share >= 1.0):
            return True
        # from the share these widths are predicted to cost: asking the same prediction for less
        # than it already gave would return the same widths
        self.bounds[0 if met else 1] = alloc.share
        self.readings[0 if met else 1] = measured_ms / teacher_ms
        low, high = self.bounds
        self.share = self._between() if 0 < low and high < math.inf else \
            self._corrected(alloc.share, measured_ms, teacher_ms)
        return False

    def _between(self) -> float:
        """The predicted share, between one that met and one that missed, where their measured
        shares interpolated reach the aim (regula falsi), kept a tenth of the way from either end.
        The middle of the predicted shares assumes the prediction is right: MobileNetV2 at batch
        32 read 0.18 of the teacher's time at ratio 0.12 and 0.51 at 0.47 (aim 0.485), where the
        table had put them at 0.48 and 0.67; the middle went to 0.27 and the last round to 0.37,
        kept at 2.7x for 2x asked, where the readings point to 0.44."""
        return _falsi(self.bounds, self.readings, self.aim_ms / self.teacher_ms)

    def _corrected(self, predicted: float, measured_ms: float, teacher_ms: float) -> float:
        """The share to ask the prediction for after one reading: the saving it predicted for those
        widths (1 - `predicted`) scaled to the saving measured, so that full width stays exact.
        Scaling the whole share by the reading instead sent ResNet-18 at batch 1 from ratio 0.56,
        read 4.4x for 2x asked, to 0.98 (1.05x), and MobileNetV2 at batch 32 from 0.22 (6.0x) to
        0.99: the table had put those widths at about half the teacher's time."""
        aim, measured = self._aim(teacher_ms) / teacher_ms, measured_ms / teacher_ms
        if measured >= 1.0:  # no faster than the teacher: no saving to scale
            return predicted * aim / measured
        return min(1.0, max(0.0, 1 - (1 - aim) * (1 - predicted) / (1 - measured)))

    def missed_later(self, measured_ms: float, teacher_ms: float) -> None:
        """The kept attempt, timed again with the teacher, missed the goal: it no longer counts as
        met, one ratio for all narrows as after a miss and the allocation asks the prediction for
        the saving measured. Demo, batch 1: ratio 0.62 read 2.14x when found and 1.85x when the
        candidates were timed together; with nothing else met, it was kept and read 1.92x later,
        where ratio 0.45's widths read 2.17x."""
        kept = self.attempts[self.best]
        kept["missed_later"] = {"measured_ms": measured_ms, "teacher_ms": teacher_ms}
        if self.uniform:
            self.read_at[kept["ratio"]] = measured_ms / teacher_ms
            self.ratios = [max((a["ratio"] for a in self.attempts if _met(a)), default=0.0),
                           min(self.ratios[1], kept["ratio"])]
        self.share = self._corrected(kept["predicted_ms"] / kept["teacher_ms"], measured_ms, teacher_ms)

    def narrowly_missed(self, measured_ms: float, teacher_ms: float) -> bool:
        aim = self._aim(teacher_ms)
        return aim < measured_ms <= aim * (1 + self.near)

    def _aim(self, teacher_ms: float) -> float:
        """The aim against a teacher timed at `teacher_ms`: a speedup goal follows it."""
        goal = teacher_ms / self.target["speedup"] if self.target.get("speedup") else self.goal_ms
        return goal * (1 - self.margin)

    @property
    def best(self) -> int:
        """Index of the attempt to keep: of those that met their aim the widest one ratio for all,
        or the slowest allocation (against its teacher), since it pruned least; else the fastest."""
        met = [i for i, a in enumerate(self.attempts) if _met(a)]
        key = lambda i: self.attempts[i]["measured_ms"] / self.attempts[i]["teacher_ms"]
        if met and self.uniform:
            return max(met, key=lambda i: self.attempts[i]["ratio"])
        return max(met, key=key) if met else min(range(len(self.attempts)), key=key)

    @property
    def target_met(self) -> bool:
        return bool(self.attempts) and _met(self.attempts[self.best])

    def to_json(self) -> dict:
        return {"latency_model": self.model.to_json(), "attempts": self.attempts, "kept_attempt": self.best + 1,
                "target": self.target, "target_met": self.target_met}


def _falsi(ends: Sequence[float], readings: Sequence[float], aim: float) -> float:
    """Between two ends (one met, one missed), where their readings interpolated reach `aim`, kept
    a tenth of the way from either end; the middle where the wider end read faster (noise)."""
    (low, high), (read_low, read_high) = ends, readings
    if read_high <= read_low:
        return (low + high) / 2
    t = (aim - read_low) / (read_high - read_low)
    return low + min(0.9, max(0.1, t)) * (high - low)


def _met(attempt: dict) -> bool:
    return attempt["measured_ms"] <= attempt["aim_ms"] and "missed_later" not in attempt


def build(view: GraphView, widths: FlopsModel, whole_ms: float, config: SessionConfig, batch: int,
          progress: Callable[[str], None] = lambda _: None) -> LatencyModel:
    """Time every layer alone at the grid widths (or read them from the cache)."""
    cache_file = cache_path()
    cache = _read(cache_file)
    setting = f"{config.provider}|{config.threads}|{batch}|{ort.__version__}|{hardware.cpu_name()}|spin-during-run"
    tables, measured = {}, 0
    for node_name, layer in widths.layers.items():
        node = view.nodes[node_name]
        spec = _LayerSpec.of(view, node, batch)
        if spec is None:
            continue
        fouts = GRID if layer["out"] else (1.0,)
        # a depthwise conv's input and output move together: one axis, stored on the output side
        fins = GRID if layer["in"] and not spec.depthwise else (1.0,)
        grid = np.zeros((len(fins), len(fouts)))
        for i, fin in enumerate(fins):
            for j, fout in enumerate(fouts):
                cin, cout = spec.width(spec.cin, fin), spec.width(spec.cout, fout)
                key = hashlib.sha256(f"{setting}|{spec.key(cin, cout)}".encode()).hexdigest()[:24]
                if key not in cache:
                    cache[key] = _time(spec.model(cin, cout), config, spec.input_shape(cin))
                    measured += 1
                grid[i, j] = cache[key]
        tables[node_name] = (np.array(fins), np.array(fouts), grid)
        progress(f"latency table: {node_name} {grid[0, 0]:.3f} ms at full width")
    if measured:
        _write(cache_file, cache)
    full = sum(t[2][0, 0] for t in tables.values())
    scale = min(1.0, whole_ms / full) if full > 0 else 1.0
    return LatencyModel(widths, tables, max(0.0, whole_ms - scale * full), scale, measured)


@dataclass(frozen=True)
class _LayerSpec:
    """One Conv/Gemm/MatMul as a standalone model whose channel counts can change."""

    op: str
    in_shape: tuple  # full input shape with the batch
    cin: int
    cout: int
    kernel: tuple
    attrs: tuple  # (name, value) of the node's attributes, group excluded
    depthwise: bool

    @staticmethod
    def of(view: GraphView, node, batch: int) -> "_LayerSpec | None":
        x = view.shape(node.input[0])
        w = view.initializers.get(node.input[1]) if len(node.input) > 1 else None
        if x is None or w is None or any(d is None for d in x[1:]):
            return None
        attrs = tuple((a.name, _hashable(helper.get_attribute_value(a))) for a in node.attribute if a.name != "group")
        if node.op_type == "Conv":
            group = view.attr(node, "group", 1)
            depthwise = group > 1 and group == x[1] and w.dims[1] == 1
            if group > 1 and not depthwise:
                return None
            return _LayerSpec("Conv", (batch, *x[1:]), x[1], w.dims[0], tuple(w.dims[2:]), attrs, depthwise)
        if node.op_type == "Gemm":
            if view.attr(node, "transA", 0):
                return None
            cout = w.dims[0] if view.attr(node, "transB", 0) else w.dims[1]
            return _LayerSpec("Gemm", (batch, x[-1]), x[-1], cout, (), (), False)
        if node.op_type == "MatMul" and len(w.dims) == 2:
            return _LayerSpec("MatMul", (batch, *x[1:]), x[-1], w.dims[1], (), (), False)
        return None

    @staticmethod
    def width(full: int, share: float) -> int:
        return max(1, int(round(full * share)))

    def input_shape(self, cin: int) -> tuple:
        if self.op == "Conv":
            return (self.in_shape[0], cin, *self.in_shape[2:])
        return (*self.in_shape[:-1], cin)

    def key(self, cin: int, cout: int) -> str:
        return f"{self.op}|{self.input_shape(cin)}|{cout}|{self.kernel}|{self.attrs}|{self.depthwise}"

    def model(self, cin: int, cout: int) -> bytes:
        rng = np.random.default_rng(0)
        if self.op == "Conv":
            cout = cin if self.depthwise else cout
            w = rng.standard_normal((cout, 1 if self.depthwise else cin, *self.kernel)).astype(np.float32)
            attrs = dict(self.attrs, group=cin if self.depthwise else 1)
            node = helper.make_node("Conv", ["x", "w", "b"], ["y"], **attrs)
            inits = [w, rng.standard_normal(cout).astype(np.float32)]
        elif self.op == "Gemm":
            node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)
            inits = [rng.standard_normal((cout, cin)).astype(np.float32), rng.standard_normal(cout).astype(np.float32)]
        else:
            node = helper.make_node("MatMul", ["x", "w"], ["y"])
            inits = [rng.standard_normal((cin, cout)).astype(np.float32)]
        names = ["w", "b"][:len(inits)]
        graph = helper.make_graph([node], "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                 self.input_shape(cin))],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                  [numpy_helper.from_array(a, n) for a, n in zip(inits, names)])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


def _hashable(value):
    return tuple(value) if isinstance(value, list) else value


def _time(model: bytes, config: SessionConfig, shape: tuple) -> float:
    session = make_session(model, config)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    feed = {"x": x}
    for _ in range(WARMUP):
        session.run(None, feed)
    ms, start = [], time.perf_counter()
    while len(ms) < RUNS and (len(ms) < 3 or time.perf_counter() - start < MAX_SECONDS):
        t0 = time.perf_counter()
        session.run(None, feed)
        ms.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(ms))


def _bilinear(xs: np.ndarray, ys: np.ndarray, grid: np.ndarray, x: float, y: float) -> float:
    """grid[i, j] at (xs[i], ys[j]), xs and ys descending; clamped at the ends."""
    def locate(axis: np.ndarray, v: float) -> tuple[int, int, float]:
        if len(axis) == 1:
            return 0, 0, 0.0
        v = min(max(v, axis[-1]), axis[0])
        j = min(int(np.searchsorted(-axis, -v, side="right")), len(axis) - 1)
        i = max(j - 1, 0)
        t = 0.0 if axis[i] == axis[j] else (axis[i] - v) / (axis[i] - axis[j])
        return i, j, t

    i0, i1, tx = locate(xs, x)
    j0, j1, ty = locate(ys, y)
    top = grid[i0, j0] * (1 - ty) + grid[i0, j1] * ty
    bottom = grid[i1, j0] * (1 - ty) + grid[i1, j1] * ty
    return float(top * (1 - tx) + bottom * tx)


def _read(path: Path) -> dict[str, float]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # no cache yet, or a damaged one: measure again


def _write(path: Path, cache: dict[str, float]) -> None:
    from exporters.write import atomic_write

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(cache).encode())
    except OSError:
        pass  # a read-only home only costs the next run the measurement
