"""--target-flops against one uniform --ratio at the same FLOPs.

    python tools/bench_allocation.py --shots 1,5 --seeds 0,1,2 --ratio 0.5

For each K and seed, the uniform run sets the FLOPs share; the allocated run targets that share.
Both see the same shots; accuracy on the demo's held-out images; CPU latency at batch 32 of
teacher, uniform and allocated models timed in one run (medians).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import CompressOptions, FlopsShare, PruneConfig, compress  # noqa: E402
from pipeline.bench import bench  # noqa: E402

ASSETS = ROOT / "pipeline" / "assets"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ASSETS / "demo_vgg.onnx")
    p.add_argument("--data", type=Path, default=ASSETS / "demo_shots")
    p.add_argument("--eval-data", type=Path, default=ASSETS / "demo_eval.npz")
    p.add_argument("--shots", default="1,5")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--round-to", type=int, default=0, help="--round-to (0: the tool's default per group and CPU)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--out", type=Path, default=Path("results") / "allocation.json",
                   help="JSON written here (default: results/allocation.json under the current directory)")
    args = p.parse_args()
    rows = []
    for k in [int(s) for s in args.shots.split(",")]:
        for seed in [int(s) for s in args.seeds.split(",")]:
            base = CompressOptions(data=args.data, shots=k, seed=seed, eval_data=args.eval_data, providers=[],
                                   prune=PruneConfig(ratio=args.ratio, round_to=args.round_to))
            uniform = compress(args.model, base)
            share = 1 / uniform.report["totals"]["flops_reduction"]
            allocated = compress(args.model, replace(base, mode=FlopsShare(share)))
            timing = bench([("teacher", args.model.read_bytes()), ("uniform", uniform.slim),
                                  ("allocated", allocated.slim)], ["cpu"], [args.batch], runs=args.runs)
            speed = {t.model: t.speedup for t in timing.timings}
            row = {"shots": k, "seed": seed, "flops_share_uniform": share,
                   "flops_share_allocated": 1 / allocated.report["totals"]["flops_reduction"],
                   "accuracy_uniform": uniform.report["quality"]["student_accuracy"] * 100,
                   "accuracy_allocated": allocated.report["quality"]["student_accuracy"] * 100,
                   "teacher_accuracy": uniform.report["quality"]["teacher_accuracy"] * 100,
                   "speedup_uniform": speed["uniform"], "speedup_allocated": speed["allocated"],
                   "keep": allocated.report["allocation"]["keep"], "chosen": allocated.report["allocation"]["chosen"],
                   "refinement": allocated.report["allocation"].get("refinement"),
                   "seconds": allocated.report["stages_seconds"]}
            rows.append(row)
            print(f"K={k} seed={seed}: FLOPs share {share:.3f}/{row['flops_share_allocated']:.3f}  "
                  f"acc uniform {row['accuracy_uniform']:.2f}  allocated {row['accuracy_allocated']:.2f}  "
                  f"speedup b{args.batch} {speed['uniform']:.2f}x / {speed['allocated']:.2f}x ({row['chosen']})", flush=True)
    for k in sorted({r["shots"] for r in rows}):
        sel = [r for r in rows if r["shots"] == k]
        print(f"K={k} mean: uniform {statistics.mean(r['accuracy_uniform'] for r in sel):.2f}  "
              f"allocated {statistics.mean(r['accuracy_allocated'] for r in sel):.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": str(args.model), "ratio": args.ratio, "round_to": args.round_to,
                                    "batch": args.batch, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
