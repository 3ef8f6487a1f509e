"""`--target-speedup` against uniform ratios at the same measured speedup.

For each model, seed and batch size: one `compress --target-speedup S --target-batch B`, and the
same shots pruned with uniform ratios (once per model and seed). All slim models and the teacher
are then timed in one run (CPU, medians), and the target is compared with one ratio for all in two
ways: the uniform ratios' quality interpolated at the speedup the target run reached, and the best
uniform model at least as fast as the target. The first assumes uniform models exist between the
measured ones; with widths rounded to multiples of 8 or 16 they may not (the demo's jump from 1.40x
at ratio 0.65 to 2.72x at 0.6), and the second is what one ratio for all can actually deliver at
that speed. Quality: top-1 accuracy where labels exist, otherwise relative output error against
the teacher on held-out inputs (zoo models with random weights, 64x64, --scope all); the relative
output error and the top-1 agreement with the teacher are recorded for every model. Labels exist
for the demo and for the teachers trained on Fashion-MNIST (tools/teachers/, K=5 shots, 2000 test
images or --eval-count, needs the dataset-fashion-mnist package): the paper-protocol vgg16 and
resnet56 (resnet56-all also prunes the channels the residual adds couple), and the zoo's ResNet-18
(resnet18-trained, --scope all), MobileNetV2 (mobilenet_v2-trained, --scope internal: with all,
pruning its residual stream at 0.5 lost 30 points where the expansions alone lost 2) and GoogLeNet
(googlenet-trained, --scope all: the branches' outputs, concatenated, are coupled groups), and
ResNet-50 (resnet50-trained, --scope all: its bottlenecks' inner widths and the residual stream);
MobileNetV3-Small (mobilenet_v3_small-trained, --scope internal: its expansions; mobilenet_v3_small-all,
--scope all: its residual stream too). With
several seeds, a last summary gives the mean gain over both readings per model and batch.

    python tools/bench_target.py --models demo,resnet56,vgg16
    python tools/bench_target.py --models demo --seeds 0,1,2,3,4 --batches 32,1 --out results/target_seeds.json
    python tools/bench_target.py --models mobilenet_v2-trained --batches 1 --threads 1 --eval-count 10000
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import CompressOptions, LatencyTarget, PruneConfig, compress  # noqa: E402
from pipeline.bench import bench  # noqa: E402
import bench_paper  # noqa: E402
from tests.zoo import export_zoo  # noqa: E402

ASSETS = ROOT / "pipeline" / "assets"
# name -> (tools/teachers file, prune settings), as bench_paper for the paper's nets
PAPER = {"vgg16": ("vgg16", dict(exclude=("*Gemm*",))), "resnet56": ("resnet56", dict(scope="internal")),
         "resnet56-all": ("resnet56", dict(scope="all")), "resnet18-trained": ("resnet18", dict(scope="all")),
         "mobilenet_v2-trained": ("mobilenet_v2", dict(scope="internal")),
         "googlenet-trained": ("googlenet", dict(scope="all")), "resnet50-trained": ("resnet50", dict(scope="all")),
         "mobilenet_v3_small-trained": ("mobilenet_v3_small", dict(scope="internal")),
         "mobilenet_v3_small-all": ("mobilenet_v3_small", dict(scope="all"))}
RATIOS = (0.3, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8)


def setups(folder: Path, names: list[str], eval_count: int = 2000) -> dict[str, tuple[Path, CompressOptions]]:
    out = {}
    if "demo" in names:
        out["demo"] = (ASSETS / "demo_vgg.onnx",
                       CompressOptions(data=ASSETS / "demo_shots", shots=5, eval_data=ASSETS / "demo_eval.npz"))
    for name in set(names) & set(PAPER):  # trained on Fashion-MNIST: real shots, real accuracy
        teacher, prune = PAPER[name]
        path = ROOT / "tools" / "teachers" / f"{teacher}.onnx"
        if not path.is_file():
            raise SystemExit(f"{path}: not committed; python tools/train_teacher.py --arch {teacher} writes it")
        up = onnx.load(path).graph.input[0].type.tensor_type.shape.dim[-1].dim_value // 32  # 32x32 images, repeated
        shots, test = bench_paper.write_shots(folder, 5, 0, up), bench_paper.write_eval(folder, eval_count, up)
        out[name] = (path, CompressOptions(data=shots, shots=5, eval_data=test, prune=PruneConfig(**prune)))
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


def sweep(model: Path, base: CompressOptions, ratios: tuple[float, ...]) -> dict[float, object]:
    """One ratio for all at each of `ratios`, pruned once per model and seed and timed at every
    batch size: the widths do not depend on the batch."""
    return {r: compress(model, replace(base, providers=[], prune=replace(base.prune, ratio=r))) for r in ratios}


def run(name: str, model: Path, base: CompressOptions, uniform: dict[float, object], batch: int, speedup: float,
        runs: int, refine: int) -> dict:
    base = replace(base, providers=[], batches=[batch])
    target = compress(model, replace(base, mode=LatencyTarget(speedup=speedup, batch=batch, refine_evals=refine)))
    distinct = {}  # ratios whose widths round to the same model are timed once
    for r, u in uniform.items():
        distinct.setdefault(u.slim, []).append(r)
    timed = bench([("teacher", model.read_bytes()), ("target", target.slim)]
                  + [(f"ratio {rs[0]}", slim) for slim, rs in distinct.items()], ["cpu"], [batch], runs=runs,
                  threads=base.threads)
    speed = {t.model: t.speedup for t in timed.timings}
    curve = sorted((speed[f"ratio {rs[0]}"], quality(uniform[rs[0]].report),
                    uniform[rs[0]].report["quality"]["relative_error"], rs,
                    uniform[rs[0]].report["quality"]["top1_agreement"]) for rs in distinct.values())
    reached = speed["target"]
    at = lambda i: float(np.interp(reached, [c[0] for c in curve], [c[i] for c in curve]))
    accuracy = target.report["quality"]["student_accuracy"] is not None
    point = lambda c: {"ratios": c[3], "speedup": c[0], "quality": c[1], "relative_error": c[2],
                       "top1_agreement": c[4]}
    alloc = target.report["allocation"]
    row = {"model": name, "seed": base.seed, "batch": batch, "threads": base.threads or "all",
           "target_speedup": speedup, "measured_speedup": reached,
           "target_quality": quality(target.report), "uniform_quality_at_same_speedup": at(1),
           "target_relative_error": target.report["quality"]["relative_error"],
           "uniform_relative_error_at_same_speedup": at(2),
           "target_top1_agreement": target.report["quality"]["top1_agreement"],
           "uniform_top1_agreement_at_same_speedup": at(4),
           "quality_is": "accuracy %" if accuracy else "relative output error",
           "teacher_accuracy": target.report["quality"]["teacher_accuracy"],
           "target_flops_reduction": target.report["totals"]["flops_reduction"],
           "chosen": alloc.get("chosen"), "target_keep": alloc["keep"], "attempts": alloc["attempts"],
           "candidates": alloc.get("candidates"), "timed_together": alloc.get("timed_together"),
           "refinement": alloc.get("refinement"), "allocation_confirmation": alloc.get("allocation_confirmation"),
           "seconds": target.report["stages_seconds"],
           "uniform": [point(c) for c in curve],
           "p50_ms": {t.model: t.p50_ms for t in timed.timings}}
    return {**row, "readings": readings(row)}


def readings(row: dict) -> dict[str, float | bool | None]:
    """The target against one ratio for all, from a row's uniform sweep (rows of earlier runs
    too): gain over the interpolated uniform quality at the same speed, gain over the best
    uniform model at least as fast, and whether a uniform model was at least as fast and
    better (the target dominated: no reading of the sweep can excuse that)."""
    accuracy = row["quality_is"] == "accuracy %"
    gain = lambda q: row["target_quality"] - q if accuracy else q - row["target_quality"]
    fast = [u for u in row["uniform"] if u["speedup"] >= row["measured_speedup"]]
    best = (max if accuracy else min)(fast, key=lambda u: u["quality"]) if fast else None
    return {"interpolated": gain(row["uniform_quality_at_same_speedup"]),
            "at_least_as_fast": gain(best["quality"]) if best else None,
            "dominated": best is not None and gain(best["quality"]) < 0}


def summary(rows: list[dict]) -> None:
    """Per model and batch over the seeds: mean gains against both readings of one ratio for all,
    and how often a uniform model dominated the target."""
    for key in sorted({(r["model"], r["batch"]) for r in rows}):
        group = [readings(r) for r in rows if (r["model"], r["batch"]) == key]
        interp = [g["interpolated"] for g in group]
        fast = [g["at_least_as_fast"] for g in group if g["at_least_as_fast"] is not None]
        speed = np.mean([r["measured_speedup"] for r in rows if (r["model"], r["batch"]) == key])
        print(f"{key[0]:<14} batch {key[1]:<3} {len(group)} runs, {speed:.2f}x: gain over uniform interpolated at "
              f"that speed {np.mean(interp):+.3g} ({sum(g > 0 for g in interp)} ahead); over the best uniform at "
              f"least as fast {np.mean(fast) if fast else float('nan'):+.3g} ({sum(g > 0 for g in fast)} of "
              f"{len(fast)} ahead); dominated by a uniform model in {sum(g['dominated'] for g in group)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="demo,resnet18,mobilenet_v2")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--seeds", default="0", help="seeds of the shots (labeled data) or of the pruning")
    p.add_argument("--speedup", type=float, default=2.0)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--threads", type=int, default=0,
                   help="intra-op threads the target and the comparison are timed on (0: all cores)")
    p.add_argument("--refine", type=int, default=LatencyTarget.refine_evals, help="--target-refine")
    p.add_argument("--ratios", default=",".join(map(str, RATIOS)),
                   help="uniform ratios to compare with; the measured speedup must fall within their range")
    p.add_argument("--eval-count", type=int, default=2000,
                   help="Fashion-MNIST test images the trained teachers are scored on (10000: all)")
    p.add_argument("--out", type=Path, default=Path("results") / "target.json",
                   help="JSON written here (default: results/target.json under the current directory)")
    p.add_argument("--summarize", type=Path, nargs="+", help="only print the summary of these earlier outputs")
    args = p.parse_args()
    if args.summarize:
        summary([r for f in args.summarize for r in json.loads(f.read_text())["rows"]])
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    ratios = tuple(float(x) for x in args.ratios.split(","))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model, base) in setups(Path(tmp), args.models.split(","), args.eval_count).items():
            for seed in [int(s) for s in args.seeds.split(",")]:
                seeded = replace(base, seed=seed, threads=args.threads)
                uniform = sweep(model, seeded, ratios)
                for batch in [int(b) for b in args.batches.split(",")]:
                    r = run(name, model, seeded, uniform, batch, args.speedup, args.runs, args.refine)
                    rows.append(r)
                    g = r["readings"]
                    fast = g["at_least_as_fast"] if g["at_least_as_fast"] is not None else float("nan")
                    print(f"{name:<14} seed {seed} batch {batch:<3} speedup {r['measured_speedup']:.2f}x (asked "
                          f"{args.speedup}x, {r['chosen']} widths)  {r['quality_is']}: target {r['target_quality']:.4g}; "
                          f"gain over uniform interpolated at that speed {g['interpolated']:+.3g}, over the best "
                          f"uniform at least as fast {fast:+.3g}"
                          f"{' (dominated)' if g['dominated'] else ''}; relative error "
                          f"{r['target_relative_error']:.4f} vs {r['uniform_relative_error_at_same_speedup']:.4f}",
                          flush=True)
                    args.out.write_text(json.dumps({"rows": rows}, indent=2))
    summary(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
