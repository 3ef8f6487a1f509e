"""The whole job, stage by stage: load -> data -> convert -> analyze -> search (prune, export) -> verify -> bench.

Each stage gets what the previous one returned and nothing else; this module only passes
results forward and times the stages (pipeline/compress_report.py assembles the report).
Nothing is written unless the slim model has passed verification.
"""
from __future__ import annotations

import time
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

from exporters.write import atomic_write
from pipeline import (allocator, analyze, augment, bench, choose, compress_report, convert, data, engine, finetune,
                      limits, load, precision, prune, quantize, report, search, verify)
from pipeline.errors import ModelError, NothingToPruneError, UsageError, VerificationError
from pipeline.analyze import ChannelGroup
from pipeline.graph import GraphView
from pipeline.runtime import first_line

MAX_EVAL = 5000  # held-out samples used for quality and verification at most


@dataclass
class CompressOptions:
    data: Path
    shots: int | None = None
    samples: int | None = None
    seed: int = 0
    prune: prune.PruneConfig = field(default_factory=prune.PruneConfig)
    eval_data: Path | None = None
    preprocess_file: Path | None = None
    preprocess: dict = field(default_factory=dict)  # option overrides: size, mean, std, ...
    providers: list[str] = field(default_factory=lambda: ["cpu"])
    batches: list[int] = field(default_factory=lambda: [1, 32])
    bench_runs: int = 50
    threads: int = 0
    max_memory: int = field(default_factory=limits.default_budget)  # bytes any one declared tensor may take
    augment: str = augment.DEFAULT_SPEC  # transforms for the layer statistics, or "none"
    augment_factor: int | None = None  # inputs per shot, the shot itself included; None: automatic
    max_accuracy_drop: float | None = None  # gate, in points of top-1 accuracy (needs labels)
    min_fidelity: float | None = None  # gate, top-1 agreement with the teacher in [0, 1]
    min_speedup: float | None = None  # gate, on every timed provider and batch size
    auto_method: bool = False  # --method auto: pick cross/soft/layerwise on held-out shots
    auto_mu: bool = False  # --mu auto: pick mu the same way
    mode: search.Mode = field(default_factory=search.Ratio)  # a FLOPs share, latency target or replayed widths instead
    finetune: finetune.FinetuneConfig = field(default_factory=finetune.FinetuneConfig)  # after verification
    int8: bool = False  # quantize after pruning, calibrated on the same shots
    quant: quantize.QuantConfig = field(default_factory=quantize.QuantConfig)
    device: str = "auto"  # where torch computes (pipeline/engine.py)


@dataclass
class CompressResult:
    slim: bytes
    report: dict
    failures: list[str] = field(default_factory=list)  # gates not met; the model was not written
    models: dict[str, bytes] = field(default_factory=dict)  # every link of the chain after the teacher

    @property
    def passed(self) -> bool:
        return not self.failures


Progress = Callable[[str], None]
Stage = Callable[[str], AbstractContextManager]  # times the work inside it under a stage's name


def compress(model_path: str | Path, options: CompressOptions, output: str | Path | None = None,
             progress: Progress = lambda _: None) -> CompressResult:
    """Run every stage; write `output` only after verification passed. Under `--device auto` a GPU
    that runs out of memory hands the whole job to the CPU: nothing has been written by then."""
    with allocator.reuse_freed():
        try:
            return _compress(model_path, options, output, progress)
        except torch.OutOfMemoryError as exc:
            if options.device != "auto":
                raise
            progress(f"warning: the GPU ran out of memory ({first_line(exc)}); starting again with torch on the CPU")
            torch.cuda.empty_cache()
            return _compress(model_path, replace(options, device="cpu"), output, progress)


@dataclass
class Prepared:
    """What compress works from before a channel is cut: the checked model, its shots and
    evaluation samples, the torch twin proven equal to onnxruntime, the channel groups and the
    augmenter. A tool that must prune exactly what `compress` pruned builds it with `prepare`."""

    model: load.LoadedModel
    original: bytes  # the input file's bytes: what the slim model is timed and compared against
    shots: data.FewShot
    evalset: data.Samples
    data_notes: list[str]
    pre: data.Preprocess
    teacher: convert.TorchModel
    parity: convert.Parity
    view: GraphView
    groups: list[ChannelGroup]
    augmenter: augment.Augmenter

    def layer_augmenter(self, config: prune.PruneConfig) -> augment.Augmenter | None:
        """Magnitude pruning reads no layer statistics, so it gets no augmented inputs."""
        return self.augmenter if config.method != "l1" else None


def prepare(model_path: str | Path, options: CompressOptions, output: str | Path | None = None,
            progress: Progress = lambda _: None,
            stage: Stage = lambda _: nullcontext()) -> Prepared:
    """The stages before pruning: load -> data -> convert -> analyze -> augment, each under `stage`."""
    model_path = Path(model_path)
    with stage("load"):
        model, original = _open(model_path, options, output)
    with stage("data"):
        shots, evalset, data_notes, pre = _data(model, options)
        if options.max_accuracy_drop is not None and evalset.y is None:
            raise UsageError("--max-accuracy-drop needs labeled evaluation data (class folders, y in the "
                             ".npz, or --eval-data); use --min-fidelity for unlabeled data")
    with stage("convert"):
        teacher, parity = _twin(model, options.device, shots.calib.x, progress)
        if parity.optimizer_changes_outputs:
            progress(f"warning: onnxruntime's graph optimizations change the teacher's outputs by "
                     f"{parity.optimizer_drift:.2e} (relative) against its graph as written; checks use the graph "
                     f"as written, quality and latency the optimized runtime, for the teacher and the slim model alike")
        if teacher.fallbacks:
            progress(f"onnx2torch does not convert {', '.join(teacher.fallbacks[:3])}"
                     f"{'...' if len(teacher.fallbacks) > 3 else ''}: onnxruntime evaluates them")
    with stage("analyze"):
        view = GraphView(load.sized(model.proto, shots.calib.x.shape[1:]))  # FLOPs need an input size
        groups = analyze.find_groups(view)
        if not any(g.prunable for g in groups):
            reasons = "; ".join(f"{g.producers[0]}: {g.reason}" for g in groups[:3]) or "no Conv/Gemm/MatMul layer"
            raise NothingToPruneError(f"{model_path}: no prunable channel group ({reasons})")
    with stage("augment"):
        augmenter = augment.build(options.augment, options.augment_factor, options.seed, shots.calib.x,
                                  lambda x: convert.run_torch(teacher, x)[0], pre.layout)
        for check in augmenter.checks:
            progress(f"augment {check.transform.name}: {'kept' if check.kept else 'dropped'} ({check.reason})")
    return Prepared(model, original, shots, evalset, data_notes, pre, teacher, parity, view, groups, augmenter)


def _compress(model_path: str | Path, options: CompressOptions, output: str | Path | None,
              progress: Progress) -> CompressResult:
    model_path = Path(model_path)
    torch.manual_seed(options.seed)
    stages: dict[str, float] = {}
    stage = _stage_timer(stages, progress)
    if options.min_speedup is not None and not (options.providers and options.batches):
        raise UsageError("--min-speedup needs the latency measurement; drop --no-bench")
    replay = search.Replay.of(options.mode)  # read before the model is loaded: an unreadable report fails first
    ready = prepare(model_path, options, output, progress, stage)
    # before any statistics: a report from another model fails at once
    replayed = replay.fit(ready.groups, ready.teacher, options.prune) if replay else None
    selector = options.prune
    options, choice = _choose(ready, options, progress, stage)
    found = search.widths(ready, options, progress, stage, choice.kept if choice else None, replayed,
                          choice.first_split if choice else None)
    with stage("verify"):
        check_x = convert.spread(ready.shots.calib.x)
        if ready.evalset.x is not ready.shots.calib.x:
            check_x = np.concatenate([check_x, convert.spread(ready.evalset.x)])
        verify_err = verify.check_slim(found.slim, found.result.student, check_x, [o.name for o in ready.model.outputs])
        quality = verify.compare(ready.original, found.slim, ready.evalset.x, ready.evalset.y, ready.evalset.source)
    chain = _chain(ready, options, found.slim, quality, check_x, progress, stage)
    timed = None
    if options.providers and options.batches:
        with stage("bench"):
            timed = bench.bench([("teacher", ready.original)] + [(name, m) for name, m, _ in chain.links],
                                options.providers, options.batches, runs=options.bench_runs, threads=options.threads,
                                seed=options.seed, progress=progress, shape=ready.shots.calib.x.shape[1:])
    failures = _gates(options, chain.quality, timed)
    auto = {**choice.to_json(), "channels_chosen_by": f"{selector.method} mu={selector.mu}"} if choice else None
    rep = compress_report.build(ready, options, found, chain, verify_err, timed, stages, output, auto, failures)
    if output is not None and not failures:  # after the report: a run that fails writes nothing
        atomic_write(output, chain.final)
    return CompressResult(chain.slim_bytes, rep, failures, {name: m for name, m, _ in chain.links})


def _stage_timer(stages: dict[str, float], progress: Progress) -> Stage:
    """A stage: its name told to `progress`, its seconds added to `stages`."""

    @contextmanager
    def stage(name: str):
        progress(f"{name}...")
        start = time.perf_counter()
        yield
        stages[name] = round(stages.get(name, 0.0) + time.perf_counter() - start, 3)  # a stage may repeat

    return stage


def _choose(ready: Prepared, options: CompressOptions, progress: Progress,
            stage: Stage) -> tuple[CompressOptions, choose.Choice | None]:
    """--method/--mu auto: the options with the objective closest to the teacher on held-out shots,
    and the choice, with the channels its selector chose at the ratio's widths."""
    view, teacher, groups, x = ready.view, ready.teacher, ready.groups, ready.shots.calib.x
    augmenter = ready.layer_augmenter(options.prune)
    candidates = choose.candidates(options.prune, options.auto_method, options.auto_mu)
    if len(candidates) > 1 and len(x) < choose.MIN_SAMPLES:
        progress(f"auto: one sample, none to hold out; {options.prune.method} mu={options.prune.mu}")
    if len(candidates) <= 1 or len(x) < choose.MIN_SAMPLES:
        return options, None
    with stage("choose"):
        choice = choose.choose(view, teacher, groups, x, candidates, options.prune, options.seed, augmenter, progress)
        progress(f"auto: chose {choice.config.method} mu={choice.config.mu}")
    return replace(options, prune=choice.config), choice


@dataclass
class Chain:
    """The slim model and what was made from it, each link with its bytes and quality."""

    slim: onnx.ModelProto  # the last float link
    slim_bytes: bytes
    links: list[tuple[str, bytes, verify.Quality]]
    tuned: finetune.FinetuneResult | None = None
    quant: quantize.QuantResult | None = None

    @property
    def final(self) -> bytes:
        return self.links[-1][1]

    @property
    def quality(self) -> verify.Quality:
        return self.links[-1][2]


def _chain(ready: Prepared, options: CompressOptions, slim: onnx.ModelProto, quality: verify.Quality,
           check_x: np.ndarray, progress: Progress, stage: Stage) -> Chain:
    """The verified slim model, fine-tuned and quantized where asked, each link compared with the teacher."""
    slim_bytes = slim.SerializeToString()
    chain = Chain(slim, slim_bytes, [("slim", slim_bytes, quality)])
    original, evalset, x = ready.original, ready.evalset, ready.shots.calib.x
    if options.finetune.steps > 0:
        with stage("finetune"):
            tuned = finetune.finetune(slim, ready.teacher, x, options.finetune, options.seed, ready.augmenter,
                                      progress)
            verify.check_slim(tuned.model, tuned.twin, check_x, [o.name for o in ready.model.outputs],
                              "its fine-tuned torch twin")
            chain.tuned, chain.slim, chain.slim_bytes = tuned, tuned.model, tuned.model.SerializeToString()
            quality = verify.compare(original, chain.slim, evalset.x, evalset.y, evalset.source)
            chain.links.append(("slim-finetuned", chain.slim_bytes, quality))
    if options.int8:
        with stage("quantize"):
            calib = np.concatenate(list(ready.augmenter.variants(x, 0)))
            chain.quant = _int8(chain.slim_bytes, chain.slim, calib, evalset.x[:256], options, progress)
            quality = verify.compare(original, chain.quant.model, evalset.x, evalset.y, evalset.source)
            chain.links.append(("slim-int8", chain.quant.model, quality))
    return chain


def _twin(model: load.LoadedModel, device: str, x: np.ndarray,
          progress: Progress) -> tuple[convert.TorchModel, convert.Parity]:
    """The teacher's torch twin on the chosen device, proven equal to onnxruntime. A converter
    that builds its tensors on the CPU fails on a GPU: `auto` then falls back to the CPU."""
    where = engine.resolve(device)
    try:
        teacher = convert.to_torch(model.proto, str(model.path), device=where)
        return teacher, convert.check_parity(model, teacher, x)
    except ModelError as exc:
        if device != "auto" or where.type == "cpu":
            raise
        progress(f"warning: the torch twin fails on {where.type} ({exc}); running torch on the CPU")
    teacher = convert.to_torch(model.proto, str(model.path))
    return teacher, convert.check_parity(model, teacher, x)


def _gates(options: CompressOptions, quality: verify.Quality, latency: bench.BenchResult | None) -> list[str]:
    """Every quality gate that was asked for and not met, as one readable line each."""
    failures = []
    if options.max_accuracy_drop is not None and 100 * quality.accuracy_drop > options.max_accuracy_drop:
        failures.append(f"accuracy dropped {100 * quality.accuracy_drop:.2f} points, more than "
                        f"--max-accuracy-drop {options.max_accuracy_drop:g}")
    if options.min_fidelity is not None and quality.agreement < options.min_fidelity:
        failures.append(f"top-1 agreement with the teacher is {quality.agreement:.4f}, below "
                        f"--min-fidelity {options.min_fidelity:g}")
    collapsed = verify.collapse(quality) if options.min_fidelity is None else ""
    if collapsed:
        failures.append(f"the slim model collapsed: {collapsed}; try a higher --ratio, --scope internal or more "
                        f"samples (--min-fidelity 0 writes it anyway)")
    if options.min_speedup is not None:
        final = latency.timings[-1].model if latency and latency.timings else None
        timed = [t for t in latency.timings if t.model == final and final != "teacher"] if latency else []
        if not timed:
            failures.append("no provider could be timed for --min-speedup")
        for t in timed:
            if t.speedup < options.min_speedup:
                failures.append(f"speedup {t.speedup:.2f}x on {t.provider} at batch {t.batch} is below "
                                f"--min-speedup {options.min_speedup:g}")
    return failures


def _open(model_path: Path, options: CompressOptions, output,
          quantizing: bool = False) -> tuple[load.LoadedModel, bytes]:
    """The checked model and its file's bytes; never with -o pointing at the input."""
    if output is not None and Path(output).resolve() == model_path.resolve():
        raise UsageError(f"-o {output}: refusing to overwrite the input model; choose another path")
    model = load.load_model(model_path, max_tensor_bytes=options.max_memory)
    if (options.int8 or quantizing) and precision.is_half(model.proto):
        raise UsageError(f"{model_path}: a float16 model; onnxruntime's INT8 quantization takes float32 "
                         f"models only: quantize the float32 export, or leave out --quantize")
    if len(model.inputs) != 1:
        raise UsageError(f"{model_path}: {len(model.inputs)} graph inputs; only single-input models "
                         f"can be fed few-shot data")
    load.refuse_quantized(model_path, model.proto, "quantize the float model it was made from" if quantizing else
                          "prune the float model it was made from, with --quantize int8 to quantize the result")
    return model, model.original


def _int8(float_model: bytes, float_proto, calib: np.ndarray, check: np.ndarray, options: CompressOptions,
          progress: Progress) -> quantize.QuantResult:
    """The quantize stage, refusing a result that is no longer a drop-in for the float model.
    Activations and the float-for-speed trials suit where the report will time: the first
    provider, at the largest batch."""
    config = options.quant.for_provider(options.providers[0] if options.providers else None)
    if config.speed_provider and options.providers and options.batches:
        config = replace(config, speed_provider=options.providers[0], speed_batch=max(options.batches))
    quant = quantize.quantize(float_model, calib, check, config, progress)
    if load.signature(onnx.load_from_string(quant.model)) != load.signature(float_proto):
        raise VerificationError("the quantized model changed the input/output signature; nothing was written")
    return quant


def _data(model: load.LoadedModel, options: CompressOptions):
    if options.shots is not None and options.samples is not None:
        raise UsageError("give either --shots (per class) or --samples (in total), not both")
    spec = model.inputs[0]
    pre, notes = data.preprocess_for(model.path, spec, options.preprocess_file, **options.preprocess)
    samples = data.load_samples(options.data, spec, pre, options.max_memory)
    if options.shots is None and options.samples is None and samples.y is not None:
        raise UsageError("--data has labels: give --shots K (samples per class) or --samples N")
    shots = data.draw_shots(samples, shots=options.shots, count=options.samples, seed=options.seed)
    if options.eval_data is None and shots.holdout is None:
        total = len(shots.calib)
        shots, aside = data.set_aside(shots, options.seed)
        if aside:
            notes.append(f"{aside} of the {total} samples set aside to measure fidelity on inputs the pruning "
                         f"does not see (no --eval-data and none left over); pruning uses the other {total - aside}")
    if options.eval_data is not None:
        evalset = data.load_samples(options.eval_data, spec, pre, options.max_memory)
        evalset.source = "eval"
    elif shots.holdout is not None:
        rng = np.random.default_rng(options.seed)
        idx = np.sort(rng.permutation(len(shots.holdout))[:MAX_EVAL])
        evalset = shots.holdout.subset(idx)
        evalset.source = "held-out"
    else:
        evalset = data.Samples(shots.calib.x, shots.calib.y, shots.calib.classes, "calibration (in-sample)")
        notes.append("no held-out samples: quality is measured on the calibration samples themselves")
    return shots, evalset, notes, pre


def quantize_only(model_path: str | Path, options: CompressOptions, output: str | Path | None = None,
                  progress: Progress = lambda _: None) -> CompressResult:
    """INT8 for any model, no pruning: load -> data -> quantize -> compare -> bench."""
    stages: dict[str, float] = {}
    start = time.perf_counter()
    model, original = _open(Path(model_path), options, output, quantizing=True)
    shots, evalset, notes, pre = _data(model, options)
    stages["load_and_data"] = round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    quant = _int8(original, model.proto, shots.calib.x, evalset.x[:256], options, progress)
    quality = verify.compare(original, quant.model, evalset.x, evalset.y, evalset.source)
    stages["quantize"] = round(time.perf_counter() - start, 3)
    latency = None
    if options.providers and options.batches:
        start = time.perf_counter()
        latency = bench.bench([("float", original), ("int8", quant.model)], options.providers, options.batches,
                              runs=options.bench_runs, threads=options.threads, seed=options.seed, progress=progress,
                              shape=shots.calib.x.shape[1:])
        stages["bench"] = round(time.perf_counter() - start, 3)
    failures = _gates(options, quality, latency)
    if output is not None and not failures:
        atomic_write(output, quant.model)
    rep = {"schema": report.SCHEMA, "tool": {"name": "crossprune", "versions": report.versions()},
           "input": {"path": str(model.path), "sha256": report.sha256(original),
                     "inputs": [s.to_json() for s in model.inputs], "outputs": [s.to_json() for s in model.outputs]},
           "output": {"path": str(output) if output else None, "sha256": report.sha256(quant.model)},
           "data": {"source": shots.calib.source, "calibration_samples": len(shots.calib),
                    "evaluation": evalset.source, "evaluation_samples": len(evalset), "notes": notes},
           "quantization": quant.to_json(), "quality": quality.to_json(),
           "chain": [{"model": "float", "bytes": len(original), "accuracy": quality.teacher_accuracy,
                      "top1_agreement": 1.0},
                     {"model": "int8", "bytes": len(quant.model), "accuracy": quality.student_accuracy,
                      "top1_agreement": quality.agreement}],
           "latency": latency.to_json() if latency else None, "stages_seconds": stages,
           "gates": {"failures": failures, "passed": not failures}, "peak_rss_mb": report.peak_rss_mb()}
    return CompressResult(quant.model, rep, failures)
