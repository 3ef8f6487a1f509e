"""Default augmentation against none, on identical shots: accuracy and whole-run time.

    python tools/bench_augment.py --shots 1,2,3,5,10 --seeds 0,1,2

Each row runs the complete `compress` with the command's defaults (`--method auto --mu auto`,
CPU bench at batch 32 included), so the time ratio is what a user of the command sees.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import CompressOptions, compress  # noqa: E402
from pipeline.augment import DEFAULT_SPEC  # noqa: E402

ASSETS = ROOT / "pipeline" / "assets"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shots", default="1,2,3,5,10")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", type=Path, default=Path("results") / "augment_default.json",
                   help="JSON written here (default: results/augment_default.json under the current directory)")
    args = p.parse_args()
    rows = []
    for k in [int(s) for s in args.shots.split(",")]:
        for spec in ("none", DEFAULT_SPEC):
            accs, seconds = [], []
            for seed in [int(s) for s in args.seeds.split(",")]:
                start = time.perf_counter()
                options = CompressOptions(data=ASSETS / "demo_shots", shots=k, seed=seed, augment=spec,
                                          eval_data=ASSETS / "demo_eval.npz", batches=[32], bench_runs=20,
                                          auto_method=True, auto_mu=True)
                report = compress(ASSETS / "demo_vgg.onnx", options).report
                accs.append(100 * report["quality"]["student_accuracy"])
                seconds.append(time.perf_counter() - start)
            rows.append({"shots": k, "augment": spec, "factor": report["augmentation"]["factor"],
                         "accuracy_mean": statistics.mean(accs), "accuracy_std": statistics.pstdev(accs),
                         "runs": accs, "seconds_mean": statistics.mean(seconds)})
            r = rows[-1]
            print(f"K={k:<3} {spec:<14} factor {r['factor']:<2} acc {r['accuracy_mean']:6.2f} ± {r['accuracy_std']:4.2f}"
                  f"  whole run {r['seconds_mean']:5.2f} s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
