"""The compress report: one JSON-ready dict of what the stages returned, in the order its
sections are read (pipeline/report.py documents the part --widths reads back; pipeline/render.py
shows it to people)."""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from pipeline import bench, engine, flops, load, prune, report, verify
from pipeline.graph import GraphView

if TYPE_CHECKING:
    from pipeline.search import SearchOutcome
    from pipeline.workflow import Chain, CompressOptions, Prepared


def build(ready: Prepared, options: CompressOptions, found: SearchOutcome, chain: Chain, verify_err: float,
          latency: bench.BenchResult | None, stages: dict[str, float], output: str | Path | None, auto: dict | None,
          failures: list[str]) -> dict:
    """The report of one compress run: `auto` is --method auto's choice, `failures` the gates not met."""
    rep = _sections(ready, options, found.result, chain.slim, chain.final, verify_err, chain.quality, latency, stages,
                    output)
    rep["augmentation"] = ready.augmenter.to_json()
    rep["engine"] = engine.describe(ready.teacher.device)
    rep["allocation"] = found.to_json()
    rep["auto"] = auto
    rep["parity"]["run_by_onnxruntime"] = ready.teacher.fallbacks
    rep["parity"]["onnxruntime_optimized_vs_as_written"] = ready.parity.optimizer_drift
    rep["parity"]["optimizer_changes_outputs"] = ready.parity.optimizer_changes_outputs
    rep["quantization"] = chain.quant.to_json() if chain.quant else None
    rep["finetune"] = {**asdict(options.finetune), **chain.tuned.to_json()} if chain.tuned else None
    rep["chain"] = [{"model": "teacher", "bytes": len(ready.original), "accuracy": chain.quality.teacher_accuracy,
                     "top1_agreement": 1.0}] + [
        {"model": name, "bytes": len(m), "accuracy": q.student_accuracy, "top1_agreement": q.agreement}
        for name, m, q in chain.links]
    rep["gates"] = {"max_accuracy_drop": options.max_accuracy_drop, "min_fidelity": options.min_fidelity,
                    "min_speedup": options.min_speedup, "failures": failures, "passed": not failures}
    return rep


def _sections(ready: Prepared, options: CompressOptions, result: prune.PruneResult, slim: onnx.ModelProto,
              slim_bytes: bytes, verify_err: float, quality: verify.Quality, latency: bench.BenchResult | None,
              stages: dict[str, float], output: str | Path | None) -> dict:
    """The sections every run has, from the input to the peak memory."""
    model, shots, evalset, view, groups = ready.model, ready.shots, ready.evalset, ready.view, ready.groups
    before = {c.node: c for c in flops.layer_costs(view)}
    slim_view = GraphView(load.sized(slim, shots.calib.x.shape[1:]))
    after = {c.node: c for c in flops.layer_costs(slim_view)}
    outcomes = {o.group: o for o in result.outcomes}
    group_rows = []
    for g in groups:
        o = outcomes.get(g.id)
        group_rows.append({**g.to_json(), "channels_before": g.channels,
                           "channels_after": len(o.kept) * g.unit if o else g.channels,
                           "kept": o.kept if o else None,  # in units of g.unit channels
                           "multiple": options.prune.step(g.size, g.unit) * g.unit if o else None,
                           "loss": None if o is None or np.isnan(o.loss) else o.loss,
                           "seconds": o.seconds if o else 0.0,
                           "reason": g.reason or result.skipped.get(g.id)})
    layers = [{"node": n, "op": c.op, "flops_before": c.flops, "flops_after": after[n].flops,
               "params_before": c.params, "params_after": after[n].params} for n, c in before.items()]
    f0, f1 = sum(c.flops for c in before.values()), sum(c.flops for c in after.values())
    return {
        "schema": report.SCHEMA,
        "tool": {"name": "crossprune", "versions": report.versions()},
        "config": {**asdict(options.prune), "shots": options.shots, "samples": options.samples,
                   "seed": options.seed, "data": str(options.data),
                   "eval_data": str(options.eval_data) if options.eval_data else None},
        "input": {"path": str(model.path), "sha256": report.sha256(ready.original), "opset": model.opset,
                  "inputs": [s.to_json() for s in model.inputs], "outputs": [s.to_json() for s in model.outputs],
                  "normalisation": model.notes},
        "output": {"path": str(output) if output else None, "sha256": report.sha256(slim_bytes)},
        "data": {"source": shots.calib.source, "calibration_samples": len(shots.calib),
                 "classes": len(np.unique(shots.calib.y)) if shots.calib.y is not None else None,
                 "evaluation": evalset.source, "evaluation_samples": len(evalset),
                 "preprocess": ready.pre.to_json(), "notes": ready.data_notes},
        "parity": {"torch_vs_onnxruntime": ready.parity.worst, "slim_vs_masked_student": verify_err},
        "groups": group_rows,
        "layers": layers,
        "totals": {"flops_before": f0, "flops_after": f1, "flops_reduction": f0 / max(f1, 1),
                   "params_before": flops.total_params(view), "params_after": flops.total_params(slim_view),
                   "bytes_before": len(ready.original), "bytes_after": len(slim_bytes)},
        "quality": quality.to_json(),
        "latency": latency.to_json() if latency else None,
        "stages_seconds": stages,
        "peak_rss_mb": report.peak_rss_mb(),
    }
