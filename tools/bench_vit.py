"""Half the heads and half the FFN neurons of every block of the trained ViT, from K shots per class.

    python tools/bench_vit.py
    python tools/bench_vit.py --shots 10 --seeds 0 --batches 32,1
    python tools/bench_vit.py --shots 10 --peers --batches ''

Teacher: tools/teachers/vit.onnx (not committed: `python tools/train_teacher.py --arch vit --epochs
9` writes it, about 5.6 minutes an epoch on 2 cores). For each K and seed, K Fashion-MNIST training
images per class; every test image scored (--eval-count); `--scope internal --ratio 0.5` (every
head group and FFN group to half; the residual width and the convolutional stem whole) with the
command's other defaults, no fine-tuning. The first seed of the largest K is timed with the
teacher in one run (--batches). Prints a table and writes results/vit.json.

--peers adds, at the largest K, the same widths chosen by weight magnitude (`--method l1`, no
refit: what a norm-based pruner keeps) and both models after the short distillation fine-tune of
tools/bench_peers.py on the same shots. Torch-Pruning itself cannot give these widths here: its
nn.MultiheadAttention pruner removes heads together with the embedding width they share with the
residual stream.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
sys.path.insert(0, str(TOOLS.parent))
import bench_paper  # noqa: E402
import bench_peers  # noqa: E402

from pipeline import CompressOptions, PruneConfig, augment, compress  # noqa: E402
from pipeline.convert import run_torch, to_torch  # noqa: E402

MODEL = TOOLS / "teachers" / "vit.onnx"
STEM = ("/conv_proj/*",)  # the convolutional stem stays whole: only heads and FFN neurons are pruned


def run(folder: Path, k: int, seed: int, eval_count: int, batches: list[int], method: str = "auto") -> dict:
    options = CompressOptions(data=bench_paper.write_shots(folder, k, seed), shots=k, seed=seed,
                              eval_data=bench_paper.write_eval(folder, eval_count), min_fidelity=0.0,
                              providers=["cpu"] if batches else [], batches=batches,
                              prune=PruneConfig(ratio=0.5, scope="internal", exclude=STEM,
                                                method="cross" if method == "auto" else method),
                              auto_method=method == "auto", auto_mu=method == "auto")
    result = compress(MODEL, options)
    rep = result.report
    q = rep["quality"]
    timings = (rep["latency"] or {}).get("timings", [])
    return {"k": k, "seed": seed, "teacher": q["teacher_accuracy"], "student": q["student_accuracy"],
            "agreement": q["top1_agreement"], "flops_reduction": rep["totals"]["flops_reduction"],
            "parity": rep["parity"]["slim_vs_masked_student"], "seconds": sum(rep["stages_seconds"].values()),
            "heads": [g["channels_after"] // g["unit"] for g in rep["groups"] if g["heads"]],
            "speedup": {t["batch"]: t["speedup"] for t in timings if t["model"] != "teacher"},
            "ms": {f"{t['model']}@{t['batch']}": t["p50_ms"] for t in timings}, "slim": result.slim}


def peers(folder: Path, ours: dict, eval_count: int, steps: int, lr: float) -> dict[str, float]:
    """Accuracy of magnitude pruning and of crossprune (`ours`: its run on these shots) at the
    same widths, each also fine-tuned, and the seconds of each fine-tune."""
    k, seed = ours["k"], ours["seed"]
    shots = np.load(bench_paper.write_shots(folder, k, seed))
    test = np.load(bench_paper.write_eval(folder, eval_count))
    twin = to_torch(onnx.load(str(MODEL)))
    teacher_logits = lambda batch: run_torch(twin, batch)[0]  # noqa: E731
    transforms = augment.build(augment.DEFAULT_SPEC, None, seed, shots["x"], teacher_logits).transforms
    out = {}
    for name, slim in (("magnitude (l1)", run(folder, k, seed, eval_count, [], "l1")), ("crossprune", ours)):
        out[name] = slim["student"]
        start = time.perf_counter()
        net = bench_peers.finetune(to_torch(onnx.load_from_string(slim["slim"])).module, teacher_logits, shots["x"],
                                   transforms, steps, lr, seed)
        out[f"{name} +ft seconds"] = time.perf_counter() - start
        out[f"{name} +ft"] = bench_peers.accuracy(bench_peers.to_onnx(net, MODEL, shots["x"]), test["x"], test["y"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shots", default="1,5,10")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--eval-count", type=int, default=10000)
    p.add_argument("--batches", default="32,1")
    p.add_argument("--peers", action="store_true", help="magnitude pruning and fine-tuned rows at the largest K")
    p.add_argument("--ft-steps", type=int, default=300)
    p.add_argument("--ft-lr", type=float, default=1e-4)
    p.add_argument("--out", type=Path, default=TOOLS.parent / "results" / "vit.json")
    args = p.parse_args()
    if not MODEL.is_file():
        raise SystemExit(f"{MODEL}: missing; python tools/train_teacher.py --arch vit --epochs 9 writes it")
    shots = [int(k) for k in args.shots.split(",")]
    rows, largest = [], []
    print("K   seeds  teacher  slim (per seed)              agreement  FLOPs  s/run  drop   speedup")
    with tempfile.TemporaryDirectory() as tmp:
        for k in shots:
            runs = [run(Path(tmp), k, int(s), args.eval_count,
                        [int(b) for b in args.batches.split(",") if b] if (k == max(shots) and i == 0) else [])
                    for i, s in enumerate(args.seeds.split(","))]
            rows += [{key: v for key, v in r.items() if key != "slim"} for r in runs]
            largest = runs if k == max(shots) else largest
            drop = runs[0]["teacher"] - statistics.mean(r["student"] for r in runs)
            speed = next((r["speedup"] for r in runs if r["speedup"]), {})
            print(f"{k:<3d} {len(runs):5d}  {bench_paper.seeds_line(runs)}  {100 * drop:5.2f}  "
                  f"{', '.join(f'b{b} {v:.2f}x' for b, v in speed.items())}", flush=True)
        if args.peers:  # beside crossprune's own runs at the largest K
            found = [peers(Path(tmp), ours, args.eval_count, args.ft_steps, args.ft_lr) for ours in largest]
            for name in (n for n in found[0] if not n.endswith("seconds")):
                acc = [100 * f[name] for f in found]
                took = f"  fine-tune {statistics.mean(f[name + ' seconds'] for f in found):.0f} s" if name.endswith(
                    "+ft") else ""
                print(f"K={max(shots)} {name:22s} {statistics.mean(acc):6.2f} ± {statistics.pstdev(acc):.2f}  "
                      f"({', '.join(f'{a:.2f}' for a in acc)}){took}", flush=True)
            rows.append({"peers": found, "ft_steps": args.ft_steps, "ft_lr": args.ft_lr})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
