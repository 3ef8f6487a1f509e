"""Latency per execution provider and batch size, every model timed in the same run.

Sessions are timed one at a time (their threads spin only while a run lasts: runtime.py), in
interleaved rounds, so slow drifts of the machine hit every model alike; the speedup of each
round is kept as a range beside the overall one, since on a shared machine the speedup of one
batch-1 pair can move by a fifth from one round to the next. A provider that is missing or
would silently fall back to the CPU is reported as unavailable with the reason, never timed as
if it were there.
"""
from __future__ import annotations

import hashlib
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import onnxruntime as ort
from onnx import ModelProto

from pipeline.errors import UsageError
from pipeline.runtime import (PROVIDERS, ProviderUnavailable, SessionConfig, cache_dir, declared_batch, input_dtype,
                              make_session)


@dataclass
class Timing:
    model: str
    provider: str
    batch: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    throughput: float  # samples per second at the median latency
    runs: int
    cold_start_ms: float  # session creation plus the first run
    speedup: float = 1.0  # p50 of the first model over this one's, same provider and batch
    speedup_low: float = 1.0  # the lowest and highest speedup of any one round: how far this machine
    speedup_high: float = 1.0  # wandered while timing, so a 2.0x between 1.8x and 2.3x reads as such


@dataclass
class BenchResult:
    timings: list[Timing] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"timings": [asdict(t) for t in self.timings], "unavailable": self.unavailable,
                "settings": self.settings}

    def speedup(self, provider: str, batch: int) -> float | None:
        return next((t.speedup for t in self.timings[1:] if t.provider == provider
                     and t.batch == batch), None)


def bench(models: list[tuple[str, ModelProto | bytes]], providers: list[str], batches: list[int],
          runs: int = 50, warmup: int = 5, rounds: int = 5, threads: int = 0, seed: int = 0,
          progress: Callable[[str], None] = lambda _: None, shape: tuple[int, ...] | None = None) -> BenchResult:
    """`shape`, one sample's shape, fills input dimensions the models leave symbolic (an image
    size exported as dynamic): the data's own, or --shape."""
    unknown = [p for p in providers if p.partition(":")[0] not in PROVIDERS]
    if unknown:
        raise UsageError(f"--providers: unknown provider '{unknown[0]}' (choose from {', '.join(PROVIDERS)})")
    if not models:
        raise UsageError("nothing to time")
    result = BenchResult(settings=_settings(threads, runs, warmup, rounds))
    for provider in providers:  # "cpu", or "cpu:1" for one intra-op thread
        name, _, count = provider.partition(":")
        config = SessionConfig(provider=name, threads=int(count) if count else threads)
        try:
            sessions = [(label, _open(model, config, shape)) for label, model in models]
        except ProviderUnavailable as exc:
            result.unavailable[provider] = str(exc)
            progress(f"{provider}: unavailable ({exc})")
            continue
        for batch in batches:
            feeds = [(label, s, _feed(s, batch, seed, shape)) for label, (s, _) in sessions]
            if any(f is None for _, _, f in feeds):
                result.unavailable[f"{provider}@{batch}"] = f"a model has a fixed batch size other than {batch}"
                continue
            samples: dict[str, list[list[float]]] = {label: [] for label, _ in models}  # ms, per round
            for label, s, feed in feeds:
                for _ in range(warmup):
                    feed()
            per_round = max(1, runs // rounds)
            for r in range(rounds):
                for label, s, feed in feeds:
                    samples[label].append([])
                    for _ in range(per_round):
                        t0 = time.perf_counter()
                        feed()
                        samples[label][-1].append((time.perf_counter() - t0) * 1e3)
                progress(f"{provider} batch {batch}: round {r + 1}/{rounds}")
            base = samples[models[0][0]]
            for (label, (_, cold)) in sessions:
                result.timings.append(_summarise(label, provider, batch, samples[label], cold, base))
    return result


def _open(model, config: SessionConfig, shape: tuple[int, ...] | None) -> tuple[ort.InferenceSession, float]:
    """A session and its cold start: creation plus one run at batch 1. TensorRT engines are
    cached by the model's hash, so only the first run on a machine pays for the build."""
    options = None
    if config.provider == "tensorrt":
        data = model.SerializeToString() if isinstance(model, ModelProto) else model
        folder = cache_dir() / "tensorrt" / hashlib.sha256(data).hexdigest()[:16]
        folder.mkdir(parents=True, exist_ok=True)
        options = {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(folder),
                   "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(folder)}
    t0 = time.perf_counter()
    session = make_session(model, config, options)
    feed = _feed(session, declared_batch(session.get_inputs()[0].shape) or 1, 0, shape)
    if feed is not None:
        feed()
    return session, (time.perf_counter() - t0) * 1e3


def _feed(session: ort.InferenceSession, batch: int, seed: int,
          shape: tuple[int, ...] | None) -> Callable[[], None] | None:
    """A closure running one batch; device providers bind inputs and outputs on the device."""
    fixed = declared_batch(session.get_inputs()[0].shape)
    if fixed is not None and fixed != batch:
        return None
    inp = session.get_inputs()[0]
    dims = [d if isinstance(d, int) and d > 0 else None for d in inp.shape[1:]]
    if None in dims and shape is not None and len(shape) == len(dims):
        dims = [d or s for d, s in zip(dims, shape)]
    dims = [batch, *dims]
    if None in dims:
        raise UsageError(f"input '{inp.name}' has symbolic dimensions {inp.shape}; give one sample's shape "
                         f"to time it (crossprune bench --shape, e.g. {','.join(str(d or 224) for d in dims[1:])})")
    x = np.random.default_rng(seed).standard_normal(dims).astype(input_dtype(session))
    device = session.get_providers()[0]
    if device == "CPUExecutionProvider":
        return lambda: session.run(None, {inp.name: x})
    binding = session.io_binding()
    binding.bind_ortvalue_input(inp.name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
    for out in session.get_outputs():
        binding.bind_output(out.name, "cuda", 0)

    def run() -> None:
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()  # the GPU work ends inside the timed region
    return run


def _summarise(label: str, provider: str, batch: int, rounds: list[list[float]], cold: float,
               base: list[list[float]]) -> Timing:
    """Percentiles over every run; speedups against `base` (the first model's rounds), overall
    and round by round (a round times every model in turn, so each has its own pair)."""
    a, b = np.concatenate(rounds), np.concatenate(base)
    p50 = float(np.percentile(a, 50))
    per_round = [float(np.median(br) / np.median(r)) for br, r in zip(base, rounds)]
    return Timing(label, provider, batch, p50, float(np.percentile(a, 90)), float(np.percentile(a, 99)),
                  float(a.mean()), batch * 1e3 / p50, len(a), cold, float(np.percentile(b, 50)) / p50,
                  min(per_round), max(per_round))


def _settings(threads: int, runs: int, warmup: int, rounds: int) -> dict:
    return {"onnxruntime": ort.__version__, "available_providers": ort.get_available_providers(),
            "intra_op_threads": threads or "default (all cores)", "spinning": "during a run only",
            "graph_optimization": "all", "runs": runs, "warmup": warmup, "rounds": rounds,
            "cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version()}
