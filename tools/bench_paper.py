"""The paper's protocol on Fashion-MNIST (32x32): methods side by side for K shots per class.

    python tools/bench_paper.py --net vgg16 --shots 1,2,3,5,10 --seeds 0,1,2 --out docs/paper_vgg16.json

Teachers come from tools/train_teacher.py (committed under tools/teachers/). For each K and seed,
K training images per class are drawn once and every method sees exactly those; accuracy is
measured on --eval-count test images (balanced, fixed). VGG-16 keeps half of every conv's
channels except the last conv's (read by the classifier), as the paper pruned the input
channels of the 3x3 convs only; ResNet-56 prunes the channel inside each residual block
(--scope internal) and, in a separate row, the coupled ones too (--scope all).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
import bench_methods  # noqa: E402
import fmnist  # noqa: E402

NETS = {  # net -> (PruneConfig fields of the protocol, mu of the authors' scripts)
    "vgg16": (dict(exclude=("*Gemm*",)), 0.6),
    "resnet56": (dict(scope="internal"), 0.9),
    "resnet56-all": (dict(scope="all"), 0.9),
}
DEFAULT_VARIANTS = "l1,layerwise,cross mu={mu},soft mu=0.5,cross mu={mu} +aug"


def write_shots(folder: Path, k: int, seed: int) -> Path:
    x, y = fmnist.load("train")
    idx = fmnist.balanced_subset(y, k, seed)
    path = folder / f"shots_k{k}_s{seed}.npz"
    np.savez(path, x=fmnist.normalise(x[idx], pad=2), y=y[idx])
    return path


def write_eval(folder: Path, count: int) -> Path:
    x, y = fmnist.load("t10k")
    idx = fmnist.balanced_subset(y, count // 10, seed=1234)
    path = folder / "test.npz"
    np.savez(path, x=fmnist.normalise(x[idx], pad=2), y=y[idx])
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--net", choices=sorted(NETS), default="vgg16")
    p.add_argument("--shots", default="1,2,3,5,10")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help=f"comma-separated; each {bench_methods.VARIANT_HELP}; {{mu}} is the net's mu")
    p.add_argument("--pgd-shots", default="1,5", help="K values that also run the pgd solver (first seed)")
    p.add_argument("--pgd-iters", type=int, default=3000, help="the paper's 3000 on CIFAR")
    p.add_argument("--eval-count", type=int, default=2000)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--teacher", type=Path, help="default: tools/teachers/<net>.onnx")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    teacher = args.teacher or TOOLS / "teachers" / f"{args.net.split('-')[0]}.onnx"
    out = args.out or TOOLS.parent / "docs" / f"paper_{args.net}.json"
    seeds = [int(s) for s in args.seeds.split(",")]
    pgd_shots = {int(k) for k in args.pgd_shots.split(",") if k}
    fields, mu = NETS[args.net]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        evalset = write_eval(folder, args.eval_count)
        for k in [int(s) for s in args.shots.split(",")]:
            shots = {s: write_shots(folder, k, s) for s in seeds}
            names = args.variants.format(mu=mu).split(",") + ([f"cross mu={mu} pgd"] if k in pgd_shots else [])
            for name in names:
                use = seeds[:1] if "pgd" in name else seeds
                extra = {"pgd_iters": args.pgd_iters} if "pgd" in name else {}
                runs = [bench_methods.run(teacher, shots[s], evalset, k, s, args.ratio, bench_methods.variant(name),
                                          **fields, **extra) for s in use]
                acc = [r["accuracy"] * 100 for r in runs]
                row = {"shots": k, "variant": name, "seeds": use, "runs": runs,
                       "accuracy_mean": statistics.mean(acc), "accuracy_std": statistics.pstdev(acc),
                       "teacher_accuracy": runs[0]["teacher_accuracy"] * 100,
                       "prune_seconds_mean": statistics.mean(r["prune_seconds"] for r in runs),
                       "flops_reduction": runs[0]["flops_reduction"]}
                rows.append(row)
                _save(out, args, teacher, rows)  # after every row: a long run interrupted keeps its table
                print(f"{args.net} K={k:<2} {name:<20} acc {row['accuracy_mean']:6.2f} ± {row['accuracy_std']:4.2f} "
                      f"(teacher {row['teacher_accuracy']:.2f})  prune {row['prune_seconds_mean']:6.2f} s  "
                      f"FLOPs {row['flops_reduction']:.2f}x fewer", flush=True)
    print(f"wrote {out}")


def _save(out: Path, args, teacher: Path, rows: list[dict]) -> None:
    out.write_text(json.dumps({"net": args.net, "teacher": str(teacher), "ratio": args.ratio,
                               "eval_count": args.eval_count, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
