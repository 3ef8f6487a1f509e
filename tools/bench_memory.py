"""Peak memory of `crossprune compress` on the demo teacher as the number of shots grows.

    python tools/bench_memory.py --shots 10,100

Each run is a fresh process (peak RSS is per process) fed K training images per class from
Fashion-MNIST (Debian package dataset-fashion-mnist). Statistics are accumulated in chunks,
so memory should barely grow with K.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import fmnist  # noqa: E402

ASSETS = ROOT / "pipeline" / "assets"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shots", default="10,100")
    p.add_argument("--out", type=Path, default=Path("results") / "memory.json",
                   help="JSON written here (default: results/memory.json under the current directory)")
    args = p.parse_args()
    x, y = fmnist.load("train")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in [int(s) for s in args.shots.split(",")]:
            idx = fmnist.balanced_subset(y, k, seed=0)
            data = Path(tmp) / f"shots{k}.npz"
            np.savez(data, x=fmnist.normalise(x[idx]), y=y[idx])
            report = Path(tmp) / f"report{k}.json"
            cmd = [sys.executable, "-m", "pipeline", "compress", str(ASSETS / "demo_vgg.onnx"), "--data", str(data),
                   "--shots", str(k), "--eval-data", str(ASSETS / "demo_eval.npz"), "-o", str(Path(tmp) / f"s{k}.onnx"),
                   "--report", str(report), "--no-bench", "--quiet"]
            start = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            rep = json.loads(report.read_text())
            rows.append({"shots_per_class": k, "samples": len(idx), "peak_rss_mb": rep["peak_rss_mb"],
                         "wall_seconds": time.perf_counter() - start, "prune_seconds": rep["stages_seconds"]["prune"],
                         "accuracy": rep["quality"]["student_accuracy"]})
            r = rows[-1]
            print(f"K={k:<4} samples {r['samples']:<5} peak RSS {r['peak_rss_mb']:7.1f} MB  wall {r['wall_seconds']:6.1f} s"
                  f"  prune {r['prune_seconds']:6.2f} s  accuracy {100 * r['accuracy']:.2f}%", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "ratio_last_to_first": rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"]},
                                   indent=2))
    print(f"peak RSS ratio {rows[-1]['peak_rss_mb'] / rows[0]['peak_rss_mb']:.2f}x; wrote {args.out}")


if __name__ == "__main__":
    main()
