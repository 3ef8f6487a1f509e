"""The architecture zoo: every architecture of tests/zoo.py through `compress --scope all --ratio 0.3`.

    python tools/bench_zoo.py --opsets 13,17
    python tools/bench_zoo.py --opsets dynamo --out results/zoo_dynamo.json
    python tools/bench_zoo.py --models vit_b16_shaped,bert --opsets 14,17,dynamo --ratio 0.5 --batches 1,32

Per model and opset ("dynamo": torch's dynamo exporter at its own opset, external weights):
channels prunable (scope internal / all), FLOPs before and after, whether the slim model equals
its masked student, and CPU latency (--batches, both models timed in one run, medians; latency
only for the last opset listed). Random weights: structure, not accuracy.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import CompressOptions, PruneConfig, compress  # noqa: E402
from pipeline.analyze import find_groups  # noqa: E402
from pipeline.errors import CrossPruneError  # noqa: E402
from pipeline.graph import GraphView  # noqa: E402
from pipeline.load import load_model  # noqa: E402
from tests.zoo import TOKENS, TRANSFORMERS, ZOO, export_transformer, export_zoo  # noqa: E402


def run(name: str, opset: int | None, folder: Path, data: Path, batches: list[int], runs: int, ratio: float) -> dict:
    export = export_transformer if name in TRANSFORMERS else export_zoo
    path = export(name, folder / f"{name}_{opset}.onnx", opset)
    model = load_model(path)
    groups = find_groups(GraphView(model.proto))
    total = sum(g.channels for g in groups)
    row = {"model": name, "exporter": "torchscript" if opset else "dynamo", "opset": model.opset,
           "groups": len(groups), "channels": total,
           "prunable_internal": sum(g.channels for g in groups if g.prunable and not g.coupling) / total,
           "prunable_all": sum(g.channels for g in groups if g.prunable) / total}
    options = CompressOptions(data=data, samples=8, augment="none", prune=PruneConfig(ratio=ratio, scope="all"),
                              providers=["cpu"] if batches else [], batches=batches, bench_runs=runs)
    start = time.perf_counter()
    try:
        report = compress(path, options, folder / f"{name}_{opset}.slim.onnx").report
    except CrossPruneError as exc:
        return {**row, "error": str(exc)}
    totals = report["totals"]
    row.update(seconds=time.perf_counter() - start, flops_before=totals["flops_before"],
               flops_after=totals["flops_after"], params_before=totals["params_before"],
               params_after=totals["params_after"], slim_vs_masked=report["parity"]["slim_vs_masked_student"])
    if report["latency"]:
        t = {(x["model"], x["batch"]): x for x in report["latency"]["timings"]}
        row.update(latency_before_ms=t["teacher", batches[0]]["p50_ms"],
                   latency_after_ms=t["slim", batches[0]]["p50_ms"],
                   speedup={b: t["slim", b]["speedup"] for b in batches})
    return row


def samples(folder: Path, name: str) -> Path:
    """8 inputs for the model: random smooth images (64x64, or 32x32 for the ViT), or token ids."""
    rng = np.random.default_rng(0)
    path = folder / f"{name}.npz"
    if name == "bert":
        np.savez(path, x=rng.integers(0, 1000, (8, TOKENS)))
        return path
    size = 32 if name in TRANSFORMERS else 64
    x = torch.from_numpy(rng.standard_normal((8, 3, size, size)).astype(np.float32))
    np.savez(path, x=torch.nn.functional.avg_pool2d(x, 3, 1, 1).numpy() * 2)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(ZOO))
    p.add_argument("--opsets", default="13,17", help="TorchScript exporter opsets, or 'dynamo'")
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--batches", default="1", help="batch sizes timed (for the last opset listed)")
    p.add_argument("--no-latency", action="store_true", help="skip timing (e.g. while the machine is busy)")
    p.add_argument("--out", type=Path, default=Path("results") / "zoo.json",
                   help="JSON written here (default: results/zoo.json under the current directory)")
    args = p.parse_args()
    torch.manual_seed(0)
    opsets = [None if o == "dynamo" else int(o) for o in args.opsets.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        batches = [int(b) for b in args.batches.split(",")] if not args.no_latency else []
        print(f"{'model':<20}{'opset':>6}{'prunable int/all':>18}{'MFLOPs before':>15}{'after':>9}"
              f"{'slim=masked':>13}{'ms before':>11}{'after':>8}{'speedup':>9}{'s':>7}")
        for name in args.models.split(","):
            for opset in opsets:
                r = run(name, opset, folder, samples(folder, name), batches if opset == opsets[-1] else [], args.runs,
                        args.ratio)
                rows.append(r)
                label = r["opset"] if opset else f"d{r['opset']}"
                if "error" in r:
                    print(f"{name:<20}{label:>6}{r['prunable_internal']:>9.0%}/{r['prunable_all']:<8.0%} {r['error']}")
                    continue
                lat = (f"{r['latency_before_ms']:>11.2f}{r['latency_after_ms']:>8.2f}"
                       + (" " + " ".join(f"{v:.2f}x" for v in r["speedup"].values())).rjust(9)
                       if "speedup" in r else f"{'-':>11}{'-':>8}{'-':>9}")
                print(f"{name:<20}{label:>6}{r['prunable_internal']:>9.0%}/{r['prunable_all']:<8.0%}"
                      f"{r['flops_before'] / 1e6:>15.1f}{r['flops_after'] / 1e6:>9.1f}{r['slim_vs_masked']:>13.1e}"
                      f"{lat}{r['seconds']:>7.0f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"ratio": args.ratio, "scope": "all", "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
