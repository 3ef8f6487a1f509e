"""The torch twin of the ONNX model, proven equal to onnxruntime before use.

torch is only the numeric engine: layers are found by their ONNX node names, and nothing
is trusted until the converted model reproduces onnxruntime on the user's own samples.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import ModelProto, TensorProto, helper

from pipeline import precision
from pipeline.converter import OnnxGraph
from pipeline.converter import convert as onnx2torch_convert
from pipeline.errors import ModelError
from pipeline.graph import GraphView
from pipeline.load import LoadedModel, data_inputs
from pipeline.ortnode import OrtNode, refused_nodes, with_fallbacks
from pipeline.runtime import AS_WRITTEN, declared_batch, first_line, make_session, run_batched

PARITY_RTOL = 1e-4
CHECK_INPUTS = 32  # inputs an equality check runs: a wrong conversion or cut shows on any of them


@dataclass
class TorchModel:
    """A converted model plus the map from ONNX node names to its modules."""

    module: torch.fx.GraphModule
    modules_by_node: dict[str, torch.nn.Module]
    fallbacks: list[str] = field(default_factory=list)  # nodes onnxruntime evaluates (no torch converter)
    batch: int | None = None  # samples per forward pass, where the graph bakes a fixed batch in
    device: torch.device = torch.device("cpu")  # where its weights live (pipeline/engine.py)
    # node -> the module that takes the node's input, where onnx2torch wrapped the layer (a Pad
    # module before a Conv with pads that differ at the two ends of an axis)
    entries: dict[str, torch.nn.Module] = field(default_factory=dict)

    def layer(self, node_name: str) -> torch.nn.Module:
        return self.modules_by_node[node_name]

    def entry(self, node_name: str) -> torch.nn.Module:
        """The module whose input is the node's input, before any padding of its own."""
        return self.entries.get(node_name) or self.modules_by_node[node_name]

    def constant_input(self, node_name: str, index: int) -> torch.Tensor:
        """The tensor onnx2torch feeds as input `index` of a node's module (an initializer it
        keeps as a graph attribute, e.g. the weight of a MatMul), to be updated in place."""
        module = self.layer(node_name)
        for fx_node in self.module.graph.nodes:
            if fx_node.op == "call_module" and self.module.get_submodule(fx_node.target) is module:
                source = fx_node.args[index]
                if getattr(source, "op", None) == "get_attr":
                    owner, _, attr = source.target.rpartition(".")
                    return getattr(self.module.get_submodule(owner) if owner else self.module, attr)
        raise KeyError(f"input {index} of node '{node_name}' is not a constant in the torch twin")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every output for any number of samples (in passes of `batch` where it is fixed)."""
        x = x.to(self.device)
        parts = [self.module(piece) for piece in (x.split(self.batch) if self.batch else [x])]
        parts = [list(p) if isinstance(p, (tuple, list)) else [p] for p in parts]
        return [torch.cat(chunks) for chunks in zip(*parts)]

    @torch.no_grad()
    def outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.forward(x)


def to_torch(proto: ModelProto, source: str = "model", batch: int | None = None,
             device: torch.device = torch.device("cpu")) -> TorchModel:
    """Convert with onnx2torch, in float32 (precision.py), onto `device`; nodes it has no converter
    for are run by onnxruntime."""
    prepared = _explicit_pads(_float_input(precision.widened(proto)))
    proto = with_fallbacks(prepared)
    try:
        try:
            module = onnx2torch_convert(proto)
        except NotImplementedError:  # a converter that refuses some node's attributes
            refused = refused_nodes(prepared)
            if not refused:
                raise
            proto = with_fallbacks(prepared, refused)
            module = onnx2torch_convert(proto)
        module = module.eval().to(device)
    except Exception as exc:
        raise ModelError(f"{source}: onnx2torch failed ({type(exc).__name__}: {exc})") from exc
    named = dict(module.named_modules())
    made = {n.name: named[OnnxGraph.generate_node_name(n)] for n in proto.graph.node
            if OnnxGraph.generate_node_name(n) in named}
    by_node = {name: _layer_inside(m) for name, m in made.items()}
    fallbacks = [name for name, layer in by_node.items() if isinstance(layer, OrtNode)]
    entries = {name: m for name, m in made.items() if by_node[name] is not m}
    return TorchModel(module, by_node, fallbacks, batch, device, entries)


def _float_input(proto: ModelProto) -> ModelProto:
    """The twin takes float32 samples like every model; an input of integers (token ids, raw
    pixels) is cast back to its type first thing inside it (float32 holds them exactly)."""
    first = next(iter(data_inputs(proto)), None)
    elem = first.type.tensor_type.elem_type if first is not None else TensorProto.FLOAT
    if elem not in (TensorProto.INT64, TensorProto.INT32):
        return proto
    out = ModelProto()
    out.CopyFrom(proto)
    value = next(v for v in out.graph.input if v.name == first.name)
    value.name = f"{first.name}_as_float"
    value.type.tensor_type.elem_type = TensorProto.FLOAT
    out.graph.node.insert(0, helper.make_node("Cast", [value.name], [first.name], name=f"{first.name}_cast", to=elem))
    return out


def _layer_inside(module: torch.nn.Module) -> torch.nn.Module:
    """The Conv of onnx2torch's (Pad, Conv) pair for pads that differ at the two ends of an axis
    (a kernel of 4 padded "same", TF's strided SAME): its weights are the node's; any other
    module as it is."""
    if (isinstance(module, torch.nn.Sequential) and len(module) == 2 and "Pad" in type(module[0]).__name__
            and isinstance(module[1], (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))):
        return module[1]
    return module


def _explicit_pads(proto: ModelProto) -> ModelProto:
    """onnx2torch refuses auto_pad (Hugging Face's EfficientNet, `padding="same"` in torch): the
    twin gets the pads it means instead, at the graph's own spatial sizes, or at any size where
    the stride is 1. The file keeps auto_pad; the parity check compares the two."""
    windowed = ("Conv", "MaxPool", "AveragePool", "LpPool")
    automatic = lambda n: n.op_type in windowed and any(
        a.name == "auto_pad" and a.s in (b"SAME_UPPER", b"SAME_LOWER", b"VALID") for a in n.attribute)
    if not any(automatic(n) for n in proto.graph.node):
        return proto
    try:
        proto = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # shapes help only where a stride is above 1
        proto = ModelProto.FromString(proto.SerializeToString())
    view = GraphView(proto)
    for node in filter(automatic, proto.graph.node):
        weight = view.shape(node.input[1]) if node.op_type == "Conv" else None
        kernel = tuple(view.attr(node, "kernel_shape", weight[2:] if weight else ()))
        if not kernel:
            continue
        strides = tuple(view.attr(node, "strides", (1,) * len(kernel)))
        dil = tuple(view.attr(node, "dilations", (1,) * len(kernel)))
        spatial = ((view.shape(node.input[0]) or ())[2:] or (None,) * len(kernel))
        sizes = [size if size is not None else 1 if s == 1 else None for size, s in zip(spatial, strides)]
        if None in sizes:
            continue  # onnx2torch's own error names it
        pads = view.pads(node, sizes, kernel, strides, dil)
        kept = [a for a in node.attribute if a.name not in ("auto_pad", "pads")]
        del node.attribute[:]
        node.attribute.extend(kept + [helper.make_attribute("pads", [b for b, _ in pads] + [e for _, e in pads])])
    return proto


@dataclass(frozen=True)
class Parity:
    """How the twin and onnxruntime agree on the samples."""

    worst: float  # the twin against onnxruntime on the original as written (float16: also widened)
    optimizer_drift: float  # onnxruntime's optimized session, as deployed, against the same graph as written
    bound: float  # what the twin is held to

    @property
    def optimizer_changes_outputs(self) -> bool:
        """Past the bound the runtime, not the file, changes what the teacher computes, and it
        will change the slim model the same way."""
        return self.optimizer_drift > self.bound


def check_parity(model: LoadedModel, twin: TorchModel, x: np.ndarray, batch: int = 64) -> Parity:
    """The twin against onnxruntime on the original file, as written.

    A model whose input fixes the batch may also bake it into the graph (a Reshape to (1, 512)
    from an export without dynamic axes); if the twin fails on larger batches, it is proven,
    and from then on run, at the declared one. A float16 model is held to float16's rounding
    against the twin, and the twin to the exact bound against the same graph widened."""
    x = spread(x)
    rounding = precision.rounding_tolerance(model.proto)
    references = [(model.original, max(PARITY_RTOL, rounding), "onnxruntime")]
    if rounding:
        references.append((precision.widened(model.proto), PARITY_RTOL, "onnxruntime on the float32-widened graph"))
    worst, fixed, written = 0.0, declared_batch(model.inputs[0].shape), None
    for source, tolerance, what in references:
        try:
            reference = run_batched(make_session(source, AS_WRITTEN), x, batch)
        except Exception as exc:
            raise ModelError(f"{model.path}: onnxruntime cannot run it on the samples ({first_line(exc)})") from exc
        written = written or reference
        if fixed is not None and twin.batch is None and fixed < min(batch, len(x)):
            try:
                _worst_difference(model, reference, twin, x, batch, tolerance, what)
            except ModelError:
                twin.batch = fixed
        worst = max(worst, _worst_difference(model, reference, twin, x, batch, tolerance, what))
    deployed = run_batched(make_session(model.original), x, batch)
    drift = max(relative_error(w, d) for w, d in zip(written, deployed))
    return Parity(worst, drift, references[0][1])


def _worst_difference(model: LoadedModel, reference: list[np.ndarray], twin: TorchModel, x: np.ndarray,
                      batch: int, tolerance: float, what: str) -> float:
    try:
        ours = run_torch(twin, x, batch)
    except Exception as exc:
        raise ModelError(f"{model.path}: the onnx2torch conversion fails on the samples ({first_line(exc)})") from exc
    worst = 0.0
    for name, ref, got in zip((o.name for o in model.outputs), reference, ours):
        if ref.shape != got.shape:
            raise ModelError(f"{model.path}: the torch conversion gives output '{name}' the shape "
                             f"{tuple(got.shape)} where {what} gives {tuple(ref.shape)}; refusing to prune a "
                             f"model we cannot reproduce")
        err = relative_error(ref, got)
        worst = max(worst, err)
        if not err <= tolerance:
            raise ModelError(f"{model.path}: the torch conversion differs from {what} on output "
                             f"'{name}' (relative error {err:.2e} > {tolerance:.0e}); refusing to "
                             f"prune a model we cannot reproduce")
    return worst


@torch.no_grad()
def run_torch(twin: TorchModel, x: np.ndarray, batch: int = 64) -> list[np.ndarray]:
    chunks = [twin.outputs(torch.from_numpy(x[i:i + batch])) for i in range(0, len(x), batch)]
    return [torch.cat([c[k] for c in chunks]).cpu().numpy() for k in range(len(chunks[0]))]


def spread(x: np.ndarray, count: int = CHECK_INPUTS) -> np.ndarray:
    """At most `count` of the inputs, evenly spaced, so that samples stored class by class all take part."""
    return x if len(x) <= count else x[np.linspace(0, len(x) - 1, count).round().astype(int)]


def relative_error(reference: np.ndarray, value: np.ndarray) -> float:
    """max |a - b| / max |a|: scale-free, and strict where outputs are large."""
    reference = np.asarray(reference, dtype=np.float64)
    value = np.asarray(value, dtype=np.float64)
    if reference.shape != value.shape:
        return float("inf")
    scale = max(float(np.abs(reference).max(initial=0.0)), 1e-12)
    return float(np.abs(reference - value).max(initial=0.0)) / scale


def relative_squared_error(reference: np.ndarray, value: np.ndarray) -> float:
    """Mean squared error relative to the reference's energy: steadier than a max on a few inputs."""
    reference = reference.astype(np.float64)
    return float(np.mean((reference - value) ** 2) / max(np.mean(reference ** 2), 1e-30))
