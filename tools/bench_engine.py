"""Pruning time with torch on the CPU and on a GPU (`--device`): same machine, model and shots.

    python tools/bench_engine.py --models demo,resnet50,resnext50 --devices cpu,cuda \
        --methods cross,auto

Per model, method and device: seconds of each stage and of the whole compress (no latency
timing: this measures the pruning, not the model), whether the GPU kept the very channels the
CPU kept, and the largest difference between the two slim models' outputs (relative to the
CPU's largest output). demo: its own shots, K=5, ratio 0.5; zoo models (tests/zoo.py): random
weights, 64x64, 16 smooth random inputs, `--scope all --ratio 0.3 --augment none`.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import CompressOptions, PruneConfig, compress  # noqa: E402
from pipeline.runtime import make_session, run_batched  # noqa: E402
from tests.zoo import export_zoo  # noqa: E402

ASSETS = ROOT / "pipeline" / "assets"
AUGMENT = "none"  # zoo models: as tools/bench_zoo.py prunes them


def setup(name: str, folder: Path) -> tuple[Path, CompressOptions]:
    if name == "demo":
        return ASSETS / "demo_vgg.onnx", CompressOptions(data=ASSETS / "demo_shots", shots=5,
                                                         eval_data=ASSETS / "demo_eval.npz", providers=[])
    x = np.random.default_rng(0).standard_normal((16, 3, 64, 64)).astype(np.float32)
    np.savez(folder / "x.npz", x=torch.nn.functional.avg_pool2d(torch.from_numpy(x), 3, 1, 1).numpy() * 2)
    path = export_zoo(name, folder / f"{name}.onnx", 17)
    return path, CompressOptions(data=folder / "x.npz", samples=16, prune=PruneConfig(ratio=0.3, scope="all"),
                                 augment=AUGMENT, providers=[])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="demo,resnet50")
    p.add_argument("--devices", default="cpu,cuda")
    p.add_argument("--methods", default="cross,auto", help="cross (mu 0.6) and/or auto")
    p.add_argument("--out", type=Path, default=Path("results") / "engine.json",
                   help="JSON written here (default: results/engine.json under the current directory)")
    args = p.parse_args()
    rows = []
    print(f"{'model':<11}{'method':<7}{'device':<7}{'total s':>9}{'choose':>8}{'prune':>8}{'convert':>9}"
          f"{'same channels':>15}{'max diff':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            path, base = setup(name, Path(tmp))
            x = np.load(base.data)["x"][:8] if base.data.suffix == ".npz" else np.load(ASSETS / "demo_eval.npz")["x"][:8]
            for method in args.methods.split(","):
                first = None
                for device in args.devices.split(","):
                    options = replace(base, device=device, auto_method=method == "auto", auto_mu=method == "auto",
                                      prune=replace(base.prune, method="cross", mu=0.6))
                    start = time.perf_counter()
                    result = compress(path, options)
                    seconds = time.perf_counter() - start
                    kept = [None if g["kept"] is None else [int(k) for k in g["kept"]] for g in result.report["groups"]]
                    out = run_batched(make_session(result.slim), x)[0]
                    first = first or (kept, out)
                    diff = float(np.abs(out - first[1]).max() / np.abs(first[1]).max())
                    stages = result.report["stages_seconds"]
                    row = {"model": name, "method": method, "device": device,
                           "device_name": result.report["engine"]["name"], "seconds": seconds, "stages": stages,
                           "same_channels_as_first": kept == first[0], "max_output_difference": diff,
                           "chosen": result.report["auto"]}
                    rows.append(row)
                    print(f"{name:<11}{method:<7}{device:<7}{seconds:>9.1f}{stages.get('choose', 0):>8.1f}"
                          f"{stages['prune']:>8.1f}{stages['convert']:>9.1f}{str(kept == first[0]):>15}"
                          f"{diff:>10.1e}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
