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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from pipeline import hardware
from pipeline.graph import GraphView
from pipeline.runtime import SessionConfig, cache_dir, make_session
from pipeline.search.allocate import FlopsModel

GRID = (1.0, 0.75, 0.5, 0.25, 0.125)  # shares of a layer's channels timed on each varying axis
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
