"""Stage after verification: INT8 from the same few samples, with bad layers left in float.

onnxruntime's own tools do the work (pre-processing, QDQ format, per-channel symmetric int8
weights, calibration on the shots). What this stage adds is two checks. Fidelity: the quantized
model is compared with the float one on held-out inputs, and if it strays too far, the layers
that cost the most when quantized alone are kept in float until it does not. Speed: a layer with
a shallow reduction (a stem conv over 1-3 channels, a depthwise conv) can run several times
slower in int8 than in float, so those are tried in float and kept so when the whole model
measures faster.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from pipeline import bench
from pipeline.convert import relative_error
from pipeline.errors import ModelError
from pipeline.runtime import declared_batch, first_line, make_session, run_batched

CALIBRATION = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
ACTIVATIONS = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
SIGNED_PROVIDERS = ("cuda", "tensorrt")  # TensorRT takes symmetric int8 activations only; CUDA gets the same file
LINEAR = ("Conv", "Gemm", "MatMul")
SHALLOW = 64  # multiply-adds per output value below which int8 kernels may not pay for their reorders
SPEED_TRIALS = 4  # most layers tried in float for speed (each costs a quantization and a timing)
SPEED_MARGIN = 0.95  # float must measure at least 5% faster to be kept: below that it is noise


@dataclass(frozen=True)
class QuantConfig:
    calibration: str = "minmax"
    activations: str = "auto"  # uint8 | int8 | auto: chosen for the provider the model is meant for
    max_error: float = 0.05  # relative output error against the float model allowed
    speed_provider: str | None = "cpu"  # where shallow layers are timed in float vs int8; None: not tried
    speed_batch: int = 32

    def for_provider(self, provider: str | None) -> "QuantConfig":
        """'auto' activations made concrete: symmetric int8 where TensorRT or CUDA will run the
        model, uint8 on the CPU (onnxruntime's x86 kernels are fastest with uint8 activations
        and int8 weights)."""
        if self.activations != "auto":
            return self
        signed = (provider or "cpu").partition(":")[0] in SIGNED_PROVIDERS
        return replace(self, activations="int8" if signed else "uint8")


@dataclass
class QuantResult:
    model: bytes
    error: float  # relative output error against the float model on the check inputs
    agreement: float  # top-1 agreement with the float model
    kept_float: list[str] = field(default_factory=list)
    sensitivity: dict[str, float] = field(default_factory=dict)  # error with only that layer quantized
    speed_trials: list[dict] = field(default_factory=list)  # shallow layers timed in float vs int8
    activations: str = ""  # the activation type used (uint8 / int8)
    against_float: dict | None = None  # the whole int8 model timed against the float one it came from

    @property
    def float_for_speed(self) -> list[str]:
        return [t["layer"] for t in self.speed_trials if t["kept_float"]]

    def to_json(self) -> dict:
        return {"activations": self.activations, "relative_error_vs_float": self.error,
                "top1_agreement_vs_float": self.agreement,
                "kept_float": self.kept_float, "sensitivity": self.sensitivity,
                "speed_trials": self.speed_trials, "timed_against_float": self.against_float,
                "bytes": len(self.model)}


class _Reader(CalibrationDataReader):
    def __init__(self, name: str, x: np.ndarray, batch: int = 16):
        self.chunks = iter([{name: x[i:i + batch]} for i in range(0, len(x), batch)])

    def get_next(self):
        return next(self.chunks, None)


def quantize(model: bytes, calib: np.ndarray, check: np.ndarray, config: QuantConfig = QuantConfig(),
             progress: Callable[[str], None] = lambda _: None) -> QuantResult:
    """INT8 QDQ model calibrated on `calib`, within `config.max_error` of the float model on `check`."""
    config = config.for_provider(config.speed_provider)
    reference = run_batched(make_session(model), check)[0]
    with tempfile.TemporaryDirectory() as tmp:
        prep = Path(tmp) / "prep.onnx"
        (Path(tmp) / "float.onnx").write_bytes(model)
        try:
            quant_pre_process(str(Path(tmp) / "float.onnx"), str(prep), skip_symbolic_shape=True)
        except Exception as exc:
            raise ModelError(f"quantization pre-processing failed ({first_line(exc)})") from exc
        proto = onnx.load(str(prep))
        name = proto.graph.input[0].name
        batch = declared_batch([d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]) or 16
        layers = [n.name for n in proto.graph.node if n.op_type in LINEAR]

        def run(exclude: list[str], only: list[str] | None = None,
                ops: list[str] | None = None) -> tuple[bytes, float, float]:
            out = Path(tmp) / "q.onnx"
            quantize_static(str(prep), str(out), _Reader(name, calib, batch), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=ops, per_channel=True,
                            activation_type=ACTIVATIONS[config.activations],
                            weight_type=QuantType.QInt8, calibrate_method=CALIBRATION[config.calibration],
                            nodes_to_exclude=exclude, nodes_to_quantize=only,
                            extra_options={"ActivationSymmetric": config.activations == "int8",
                                           "WeightSymmetric": True})
            data = out.read_bytes()
            got = run_batched(make_session(data), check)[0]
            agree = float(np.mean(got.reshape(len(got), -1).argmax(1) == reference.reshape(len(got), -1).argmax(1)))
            return data, relative_error(reference, got), agree

        data, error, agreement = run([])
        progress(f"int8: relative error {error:.4f} against the float model")
        result = QuantResult(data, error, agreement, activations=config.activations)
        # Every op quantized is fastest (int8 flows between layers); if keeping whole layers in float
        # cannot meet the budget that way, the tensors between them stay float too (linear ops only).
        ops = None  # op types quantized (None: all); the speed check below quantizes the same
        for trial_ops in (None, list(LINEAR)):
            if result.error <= config.max_error:
                break
            ops = trial_ops
            result.sensitivity = {layer: run([], only=[layer], ops=ops)[1] for layer in layers}
            result.kept_float = []
            for layer in sorted(layers, key=result.sensitivity.get, reverse=True):
                result.kept_float.append(layer)
                result.model, result.error, result.agreement = run(result.kept_float, ops=ops)
                progress(f"int8: {layer} kept in float, relative error {result.error:.4f}")
                if result.error <= config.max_error:
                    break
        if config.speed_provider:
            _float_where_faster(result, lambda exclude: run(exclude, ops=ops),
                                _shallow(proto, set(result.kept_float)), config, progress, calib.shape[1:])
            result.against_float = _against_float(model, result.model, config, progress, calib.shape[1:])
        return result


def _against_float(float_model: bytes, int8_model: bytes, config: QuantConfig, progress: Callable[[str], None],
                   shape: tuple[int, ...]) -> dict | None:
    """On some CPUs every int8 kernel is slower than its float twin (a 16-core Xeon at batch 32:
    docs/BENCHMARKS.md); said here, so that a run without --bench learns it too."""
    timed = _timed_pair(float_model, int8_model, config, shape)
    if isinstance(timed, str):
        return None
    float_ms, int8_ms = timed
    if int8_ms * SPEED_MARGIN > float_ms:
        progress(f"warning: the int8 model runs slower than the float one on {config.speed_provider} at batch "
                 f"{config.speed_batch} ({int8_ms:.3f} vs {float_ms:.3f} ms): this CPU's int8 kernels do not pay")
    return {"provider": config.speed_provider, "batch": config.speed_batch, "float_ms": float_ms, "int8_ms": int8_ms}


def _timed_pair(first: bytes, second: bytes, config: QuantConfig, shape: tuple[int, ...]) -> tuple[float, float] | str:
    """Medians of two models timed in one run on the speed check's provider and batch, or why
    they could not be timed there."""
    timing = bench.bench([("first", first), ("second", second)], [config.speed_provider], [config.speed_batch],
                         runs=40, rounds=4, shape=shape)
    if len(timing.timings) < 2:
        return "; ".join(timing.unavailable.values())
    return timing.timings[0].p50_ms, timing.timings[1].p50_ms


def _shallow(proto: onnx.ModelProto, skip: set[str]) -> list[str]:
    """Linear layers with fewer than SHALLOW multiply-adds per output, shallowest first."""
    weights = {i.name: list(i.dims) for i in proto.graph.initializer}
    depth = {}
    for node in proto.graph.node:
        dims = weights.get(node.input[1]) if node.op_type in LINEAR and len(node.input) > 1 else None
        if node.name in skip or not dims or len(dims) < 2:
            continue
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        depth[node.name] = int(np.prod(dims[1:])) if node.op_type == "Conv" else dims[1] if trans_b else dims[0]
    return sorted((n for n, d in depth.items() if d < SHALLOW), key=depth.get)[:SPEED_TRIALS]


def _float_where_faster(result: QuantResult, run: Callable, candidates: list[str], config: QuantConfig,
                        progress: Callable[[str], None], shape: tuple[int, ...]) -> None:
    """Keep each shallow layer in float if the whole model then measures faster, shallowest first;
    the first that does not help ends the search (deeper ones gain even less from float)."""
    for layer in candidates:
        model, error, agreement = run(result.kept_float + [layer])
        timed = _timed_pair(result.model, model, config, shape)
        if isinstance(timed, str):
            progress(f"int8: speed check skipped ({timed})")
            return
        int8_ms, float_ms = timed
        kept = float_ms < SPEED_MARGIN * int8_ms and error <= config.max_error
        result.speed_trials.append({"layer": layer, "int8_ms": int8_ms, "float_ms": float_ms, "kept_float": kept,
                                    "provider": config.speed_provider, "batch": config.speed_batch})
        progress(f"int8: {layer} in float: {float_ms:.3f} ms vs {int8_ms:.3f} ms all int8 "
                 f"({'kept' if kept else 'not kept'})")
        if not kept:
            return
        result.kept_float.append(layer)
        result.model, result.error, result.agreement = model, error, agreement
