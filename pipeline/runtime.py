"""onnxruntime sessions made one way everywhere: explicit provider, threads that spin only during a run.

onnxruntime's threads spin between the parallel parts of a run by default, and keep spinning
for a while after it, stealing cores from the next session timed or from torch. Spinning off
stops that but makes every hand-off between threads a wake-up, which nearly doubles a small
model's batch-1 latency (docs/BENCHMARKS.md). So threads spin while a run lasts and stop when it
returns (`session.force_spinning_stop`), which times the teachers within 7% of a session timed alone
with onnxruntime's defaults, without the cost to whatever runs next. The provider actually used is
checked, never assumed.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import ModelProto, helper

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


class ProviderUnavailable(RuntimeError):
    """The requested execution provider cannot run here; the message says why."""


@dataclass(frozen=True)
class SessionConfig:
    provider: str = "cpu"
    threads: int = 0  # 0: onnxruntime's default (all physical cores)
    opt_level: str = "all"  # none | basic | extended | all

    def to_json(self) -> dict:
        return {"provider": self.provider, "threads": self.threads, "graph_optimization": self.opt_level}


_OPT = {"none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}

SPINNING = {"session.intra_op.allow_spinning": "1", "session.inter_op.allow_spinning": "1",
            "session.force_spinning_stop": "1"}

# The graph as its file writes it. Checks of a file compare against this: onnxruntime's own
# rewrites can change results (1.31 folds a zero Pad into a MaxPool, whose padding is -inf:
# timm's BiT stem), and such a change belongs to the runtime, not to the file.
AS_WRITTEN = SessionConfig(opt_level="none")


def make_session(model: ModelProto | bytes | str, config: SessionConfig = SessionConfig(),
                 provider_options: dict | None = None) -> ort.InferenceSession:
    """A session on exactly the requested provider, or ProviderUnavailable."""
    name = PROVIDERS[config.provider]
    if name not in ort.get_available_providers():
        raise ProviderUnavailable(f"{config.provider}: {name} is not in this onnxruntime build "
                                  f"({ort.__version__}, providers: {', '.join(ort.get_available_providers())})")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = config.threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = _OPT[config.opt_level]
    for key, value in SPINNING.items():
        opts.add_session_config_entry(key, value)
    opts.log_severity_level = 4  # failures surface as our one-line errors
    source = model.SerializeToString() if isinstance(model, ModelProto) else model
    providers = [(name, provider_options or {})]
    if name != "CPUExecutionProvider":
        providers.append(("CPUExecutionProvider", {}))  # for nodes the device cannot run
    banner = io.StringIO()
    try:
        with contextlib.redirect_stdout(banner):  # onnxruntime prints why it fell back, to stdout
            session = ort.InferenceSession(source, sess_options=opts, providers=providers)
    except Exception as exc:
        if config.provider != "cpu":
            raise ProviderUnavailable(f"{config.provider}: session creation failed "
                                      f"({first_line(exc)})") from exc
        raise
    if session.get_providers()[0] != name:
        raise ProviderUnavailable(f"{config.provider}: onnxruntime fell back to {session.get_providers()[0]} "
                                  f"({_fallback_reason(banner.getvalue())})")
    sys.stderr.write(banner.getvalue())
    return session


def _fallback_reason(banner: str) -> str:
    """The sentence of onnxruntime's fallback banner that says what is missing, without the
    source path and C++ signature in front of it (e.g. 'Please install TensorRT libraries ...')."""
    line = next((ln for ln in banner.splitlines() if ln.startswith("EP Error ")), "")
    reason = line.rpartition(") ")[2] if ") " in line else line.removeprefix("EP Error ")
    reason = reason.strip()
    return reason[:300] if reason else "no usable device or missing CUDA/cuDNN/TensorRT libraries"


def cache_dir() -> Path:
    """Where measurements and engines that are costly to redo are kept ($CROSSPRUNE_CACHE)."""
    root = os.environ.get("CROSSPRUNE_CACHE")
    return Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "crossprune"


def first_line(exc: BaseException) -> str:
    """An exception as one line: runtimes put whole stack dumps in their messages."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def input_dtype(session: ort.InferenceSession) -> np.dtype:
    kind = session.get_inputs()[0].type  # e.g. 'tensor(float)'
    elem = {"tensor(float)": 1, "tensor(float16)": 10, "tensor(double)": 11, "tensor(uint8)": 2,
            "tensor(int8)": 3, "tensor(int32)": 6, "tensor(int64)": 7}.get(kind, 1)
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem))


def declared_batch(shape) -> int | None:
    """The batch size an input's shape fixes (exporters often fix it at 1), or None for any."""
    first = shape[0] if shape else None
    return first if isinstance(first, int) and first > 0 else None


def run_batched(session: ort.InferenceSession, x: np.ndarray, batch: int = 64) -> list[np.ndarray]:
    """All outputs for all samples, fed in batches (models with a fixed batch of 1 too)."""
    batch = declared_batch(session.get_inputs()[0].shape) or batch
    name = session.get_inputs()[0].name
    dtype = input_dtype(session)
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # a failing kernel raises; its log line would only repeat it
    chunks = [session.run(None, {name: x[i:i + batch].astype(dtype, copy=False)}, quiet)
              for i in range(0, len(x), batch)]
    return [np.concatenate([c[k] for c in chunks]) for k in range(len(chunks[0]))]
