"""`--target-speedup` against uniform ratios at the same measured speedup.

For each model and batch size: one `compress --target-speedup S --target-batch B`, and the same
shots pruned with uniform ratios. All slim models and the teacher are then timed in one run
(CPU, medians), and the uniform ratios' quality is interpolated at the speedup the target run
reached, so both are compared at equal measured speed. Quality: top-1 accuracy where labels
exist (the demo; the trained paper-protocol teachers vgg16 and resnet56 on 2000 Fashion-MNIST
test images, K=5 shots, needs the dataset-fashion-mnist package; resnet56-all also prunes the
channels the residual adds couple), otherwise relative output
error against the teacher on held-out inputs (zoo models with random weights, 64x64, --scope
all). The relative output error is recorded for every model.

    python tools/bench_target.py --models demo,resnet56,vgg16 --out docs/target.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import CompressOptions, LatencyTarget, PruneConfig, compress  # noqa: E402
from pipeline.bench import bench  # noqa: E402
import bench_paper  # noqa: E402
from tests.zoo import export_zoo  # noqa: E402

ASSETS = ROOT / "pipeline" / "assets"
PAPER = {"vgg16": ("vgg16", dict(exclude=("*Gemm*",))), "resnet56": ("resnet56", dict(scope="internal")),
         "resnet56-all": ("resnet56", dict(scope="all"))}  # name -> (tools/teachers file, prune settings), as bench_paper
RATIOS = (0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8)


def setups(folder: Path, names: list[str]) -> dict[str, tuple[Path, CompressOptions]]:
    out = {}
    if "demo" in names:
        out["demo"] = (ASSETS / "demo_vgg.onnx",
                       CompressOptions(data=ASSETS / "demo_shots", shots=5, eval_data=ASSETS / "demo_eval.npz"))
    for name in set(names) & set(PAPER):  # trained on Fashion-MNIST: real shots, real accuracy
        shots, test = bench_paper.write_shots(folder, 5, 0), bench_paper.write_eval(folder, 2000)
        teacher, prune = PAPER[name]
        out[name] = (ROOT / "tools" / "teachers" / f"{teacher}.onnx",
                     CompressOptions(data=shots, shots=5, eval_data=test, prune=PruneConfig(**prune)))
    x = np.random.default_rng(0).standard_normal((40, 3, 64, 64)).astype(np.float32)
    x = torch.nn.functional.avg_pool2d(torch.from_numpy(x), 3, 1, 1).numpy() * 2
    np.savez(folder / "shots.npz", x=x[:16])
    np.savez(folder / "held.npz", x=x[16:])
    for name in names:
        if name != "demo" and name not in PAPER:
            torch.manual_seed(0)
            out[name] = (export_zoo(name, folder / f"{name}.onnx"),
                         CompressOptions(data=folder / "shots.npz", samples=16, eval_data=folder / "held.npz",
                                         augment="none", prune=PruneConfig(scope="all")))
    return out


def quality(report: dict) -> float:
    q = report["quality"]
    return 100 * q["student_accuracy"] if q["student_accuracy"] is not None else q["relative_error"]


def run(name: str, model: Path, base: CompressOptions, batch: int, speedup: float, runs: int, refine: int,
        ratios: tuple[float, ...] = RATIOS) -> dict:
    base = replace(base, providers=[], batches=[batch])
    target = compress(model, replace(base, target=LatencyTarget(speedup=speedup, batch=batch, refine_evals=refine)))
    uniform = {r: compress(model, replace(base, prune=replace(base.prune, ratio=r))) for r in ratios}
    timed = bench([("teacher", model.read_bytes()), ("target", target.slim)]
                  + [(f"ratio {r}", u.slim) for r, u in uniform.items()], ["cpu"], [batch], runs=runs)
    speed = {t.model: t.speedup for t in timed.timings}
    curve = sorted((speed[f"ratio {r}"], quality(u.report), u.report["quality"]["relative_error"], r)
                   for r, u in uniform.items())
    reached = speed["target"]
    at = lambda i: float(np.interp(reached, [c[0] for c in curve], [c[i] for c in curve]))
    alloc = target.report["allocation"]
    return {"model": name, "batch": batch, "target_speedup": speedup, "measured_speedup": reached,
            "target_quality": quality(target.report), "uniform_quality_at_same_speedup": at(1),
            "target_relative_error": target.report["quality"]["relative_error"],
            "uniform_relative_error_at_same_speedup": at(2),
            "quality_is": "accuracy %" if target.report["quality"]["student_accuracy"] is not None
            else "relative output error",
            "teacher_accuracy": target.report["quality"]["teacher_accuracy"],
            "target_flops_reduction": target.report["totals"]["flops_reduction"],
            "chosen": alloc.get("chosen"), "target_keep": alloc["keep"], "attempts": alloc["attempts"],
            "candidates": alloc.get("candidates"), "refinement": alloc.get("refinement"),
            "seconds": target.report["stages_seconds"],
            "uniform": [{"ratio": r, "speedup": s, "quality": q, "relative_error": e} for s, q, e, r in curve],
            "p50_ms": {t.model: t.p50_ms for t in timed.timings}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="demo,resnet18,mobilenet_v2")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--speedup", type=float, default=2.0)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--refine", type=int, default=LatencyTarget.refine_evals, help="--target-refine")
    p.add_argument("--ratios", default=",".join(map(str, RATIOS)),
                   help="uniform ratios to compare with; the measured speedup must fall within their range")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "target.json")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model, base) in setups(Path(tmp), args.models.split(",")).items():
            for batch in [int(b) for b in args.batches.split(",")]:
                r = run(name, model, base, batch, args.speedup, args.runs, args.refine,
                        tuple(float(x) for x in args.ratios.split(",")))
                rows.append(r)
                better = (r["target_quality"] > r["uniform_quality_at_same_speedup"]) == (r["quality_is"] != "relative output error")
                print(f"{name:<14} batch {batch:<3} speedup {r['measured_speedup']:.2f}x (asked {args.speedup}x, "
                      f"{r['chosen']} widths)  {r['quality_is']}: target {r['target_quality']:.4g}, uniform at "
                      f"that speed {r['uniform_quality_at_same_speedup']:.4g} ({'better' if better else 'worse'}); "
                      f"relative error {r['target_relative_error']:.4f} vs {r['uniform_relative_error_at_same_speedup']:.4f}",
                      flush=True)
                args.out.write_text(json.dumps({"rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
