"""Which label-free closeness to the teacher tells the more accurate of two equally fast models?

`--target-speedup` and `--target-flops` choose widths by how close the pruned model's outputs stay
to the teacher's (relative squared error, no labels). This benchmark asks whether that score, or
another one, ranks models as top-1 accuracy does when their costs are equal: the demo is pruned
with one ratio for all (0.5) and with FLOPs allocated across groups to the same share (0.3 of the
FLOPs lands on 0.250 against 0.252), and with ratio 0.6 as a second pair, for several seeds. Every
score is computed on the 5,000 evaluation images and on random 24-image subsets (about what a
quarter of the shots and their augmented variants give the search). With the Fashion-MNIST
package installed, each pair is also compared on 5,000 random images of the training split the
demo teacher learned from and its shots were drawn from (`--train-images`), to tell the score's
fault from a difference between where the shots come from and where the model is tested.

    python tools/bench_scores.py --seeds 0,1,2,3,4,5,6,7,8,9 --out results/scores.json
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fmnist  # noqa: E402
from pipeline import CompressOptions, FlopsShare, PruneConfig, compress  # noqa: E402
from pipeline.convert import relative_squared_error  # noqa: E402
from pipeline.runtime import make_session, run_batched  # noqa: E402

ASSETS = ROOT / "pipeline" / "assets"
LOWER_IS_CLOSER = ("relative squared error", "KL(teacher || model)", "Brier vs teacher", "margin loss")


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def scores(teacher: np.ndarray, model: np.ndarray) -> dict[str, float]:
    """Closeness of `model`'s logits to the teacher's, by several label-free measures."""
    lt, lm = _log_softmax(teacher), _log_softmax(model)
    top = teacher.argmax(1)
    rows = np.arange(len(model))
    rival = np.where(np.eye(model.shape[1], dtype=bool)[top], -np.inf, model).max(1)
    return {"relative squared error": relative_squared_error(teacher, model),
            "KL(teacher || model)": float(np.mean((np.exp(lt) * (lt - lm)).sum(1))),
            "Brier vs teacher": float(np.mean(((np.exp(lm) - np.exp(lt)) ** 2).sum(1))),
            "margin loss": float(np.mean(np.logaddexp(0, rival - model[rows, top]))),  # soft count of flips
            "top-1 agreement": float(np.mean(model.argmax(1) == top))}


def ranks_as_accuracy(name: str, a: dict, b: dict, gain: float) -> bool:
    """Whether score `name` says b is closer than a exactly when b is the more accurate."""
    closer = b[name] < a[name] if name in LOWER_IS_CLOSER else b[name] > a[name]
    return closer == (gain > 0)


def _train_split(count: int) -> tuple[np.ndarray, np.ndarray] | None:
    """`count` random training-split images (the demo's shots come from that split), or None
    where the Fashion-MNIST package is not installed."""
    if count <= 0:
        return None
    try:
        images, labels = fmnist.load("train")
    except SystemExit as exc:
        print(f"--train-images skipped: {exc}", file=sys.stderr)
        return None
    pick = np.random.default_rng(123).choice(len(images), count, replace=False)
    return fmnist.normalise(images[pick]), labels[pick]


def _gain(logits: dict[str, np.ndarray], a: str, b: str, labels: np.ndarray) -> float:
    return float(np.mean(logits[b].argmax(1) == labels) - np.mean(logits[a].argmax(1) == labels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--subset", type=int, default=24, help="inputs per random subset")
    parser.add_argument("--draws", type=int, default=200, help="random subsets per pair")
    parser.add_argument("--train-images", type=int, default=5000,
                        help="unseen training-split images to compare each pair on too (0: none)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    data = np.load(ASSETS / "demo_eval.npz")
    x, y = data["x"], data["y"]
    train = _train_split(args.train_images)
    logits = lambda model, images=x: run_batched(make_session(model), images)[0].astype(np.float64)
    teacher = logits((ASSETS / "demo_vgg.onnx").read_bytes())
    teacher_train = logits((ASSETS / "demo_vgg.onnx").read_bytes(), train[0]) if train else None
    setups = {"ratio 0.5": dict(prune=PruneConfig(ratio=0.5)), "ratio 0.6": dict(prune=PruneConfig(ratio=0.6)),
              "flops 0.3": dict(mode=FlopsShare(0.3))}
    pairs = [("ratio 0.5", "flops 0.3"), ("ratio 0.5", "ratio 0.6")]
    rng = np.random.default_rng(0)
    models, rows, hits = [], [], {}
    for seed in [int(s) for s in args.seeds.split(",")]:
        base = CompressOptions(data=ASSETS / "demo_shots", shots=5, seed=seed, providers=[], batches=[])
        out, out_train = {}, {}
        for name, change in setups.items():
            result = compress(ASSETS / "demo_vgg.onnx", replace(base, **change))
            z = logits(result.slim)
            out[name] = z
            if train:
                out_train[name] = logits(result.slim, train[0])
            models.append({"seed": seed, "model": name, "flops_share": 1 / result.report["totals"]["flops_reduction"],
                           "accuracy": float(np.mean(z.argmax(1) == y)), **scores(teacher, z)})
            print(models[-1], flush=True)
        for a, b in pairs:
            gain = _gain(out, a, b, y)
            sa, sb = scores(teacher, out[a]), scores(teacher, out[b])
            rows.append({"seed": seed, "pair": f"{a} -> {b}", "accuracy_gain": gain,
                         "train_accuracy_gain": _gain(out_train, a, b, train[1]) if train else None,
                         "train_brier_change": (scores(teacher_train, out_train[b])["Brier vs teacher"]
                                                / scores(teacher_train, out_train[a])["Brier vs teacher"] - 1
                                                if train else None),
                         "change": {n: sb[n] / sa[n] - 1 for n in sa},
                         "ranks_as_accuracy": {n: ranks_as_accuracy(n, sa, sb, gain) for n in sa}})
            for _ in range(args.draws):
                idx = rng.choice(len(x), args.subset, replace=False)
                ta, tb = scores(teacher[idx], out[a][idx]), scores(teacher[idx], out[b][idx])
                for n in ta:
                    hits.setdefault(n, []).append(ranks_as_accuracy(n, ta, tb, gain))
    names = list(hits)
    print(f"\n{'seed':>4}  {'pair':<22} {'accuracy':>9}  " + "  ".join(f"{n:>22}" for n in names)
          + ("  train accuracy  train Brier" if train else ""))
    for r in rows:
        cells = "  ".join(f"{100 * r['change'][n]:+20.1f}%{'*' if r['ranks_as_accuracy'][n] else ' '}"
                          for n in names)
        extra = (f"  {100 * r['train_accuracy_gain']:+13.2f}p  {100 * r['train_brier_change']:+10.1f}%"
                 if train else "")
        print(f"{r['seed']:>4}  {r['pair']:<22} {100 * r['accuracy_gain']:+8.2f}p  {cells}{extra}")
    print("(* = the score ranks the pair as accuracy on 5,000 images does)")
    share = {n: float(np.mean(h)) for n, h in hits.items()}
    print(f"\nshare of {args.draws} random {args.subset}-image subsets per pair ranking it as accuracy does:")
    for n, s in share.items():
        print(f"  {n:<24} {s:.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"models": models, "pairs": rows, "subset_share": share,
                                        "subset": args.subset, "draws": args.draws}, indent=1))


if __name__ == "__main__":
    main()
