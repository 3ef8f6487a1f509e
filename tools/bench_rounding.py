"""Uniform ratios with kept widths rounded to different multiples, all timed in one run.

onnxruntime's CPU convolutions pad every width to a multiple of their channel block (16 with
AVX-512), so the same ratio can run much faster or slower depending on the rounding. Models as
in tools/bench_target.py (the demo, or a zoo architecture with random weights and 16 smooth
random shots, --scope all); each ratio and multiple is one `compress`, then the teacher and every
slim model are timed together (CPU, medians, lowest-highest round in brackets).

    python tools/bench_rounding.py --model resnet18 --ratios 0.6,0.7 --multiples 8,16
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import bench_target  # noqa: E402
from pipeline import compress  # noqa: E402
from pipeline.bench import bench  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--ratios", default="0.6,0.7")
    p.add_argument("--multiples", default="8,16")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--out", type=Path, default=Path("results") / "rounding.json",
                   help="JSON written here (default: results/rounding.json under the current directory)")
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model, base = bench_target.setups(Path(tmp), [args.model])[args.model]
        models, rows = [("teacher", model.read_bytes())], {}
        for ratio in [float(r) for r in args.ratios.split(",")]:
            for step in [int(m) for m in args.multiples.split(",")]:
                res = compress(model, replace(base, providers=[], prune=replace(base.prune, ratio=ratio, round_to=step)))
                name = f"ratio {ratio}, multiples of {step}"
                widths = sorted({g["channels_after"] for g in res.report["groups"] if g["multiple"]})
                rows[name] = {"ratio": ratio, "multiple": step, "widths": widths,
                              "flops_reduction": res.report["totals"]["flops_reduction"],
                              "relative_error": res.report["quality"]["relative_error"]}
                models.append((name, res.slim))
        timed = bench(models, ["cpu"], batches, runs=args.runs, rounds=7)
    for t in timed.timings:
        if t.model in rows:
            rows[t.model][f"batch {t.batch}"] = {"p50_ms": t.p50_ms, "speedup": t.speedup,
                                                 "speedup_low": t.speedup_low, "speedup_high": t.speedup_high}
    print(f"| {args.model} | widths | FLOPs fewer | " + " | ".join(f"batch {b}" for b in batches) + " |")
    for name, r in rows.items():
        cells = [f"{r[f'batch {b}']['speedup']:.2f}x ({r[f'batch {b}']['speedup_low']:.2f}-"
                 f"{r[f'batch {b}']['speedup_high']:.2f})" for b in batches]
        print(f"| {name} | {', '.join(map(str, r['widths']))} | {r['flops_reduction']:.2f}x | " + " | ".join(cells) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "rows": rows, "timing": timed.to_json()}, indent=2,
                                   default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
