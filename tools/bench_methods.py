"""Methods side by side on identical few-shot samples: accuracy, fidelity and pruning time.

    python tools/bench_methods.py --shots 1 --seeds 0,1,2

Defaults to the embedded demo teacher and its data. Every method and solver of a seed sees
the same samples; the table gives mean and spread over seeds. No end-to-end fine-tuning.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import CompressOptions, FinetuneConfig, PruneConfig, compress  # noqa: E402
from pipeline.augment import DEFAULT_SPEC  # noqa: E402

ASSETS = ROOT / "pipeline" / "assets"
VARIANT_HELP = ("METHOD [mu=X] [pgd] [+aug] [+ft], e.g. 'l1', 'layerwise +aug', 'cross mu=0.9 +ft', "
                "'cross mu=0.6 pgd', 'auto +aug' (--method auto --mu auto)")
DEFAULT_VARIANTS = "l1,layerwise,cross mu=0.6,soft mu=0.5,cross mu=0.6 pgd"
FINETUNE = FinetuneConfig(steps=50, lr=1e-4, batch=16)  # "+ft": the short fine-tune of the tables


@dataclass(frozen=True)
class Variant:
    """One row of a methods table, parsed from its name (see VARIANT_HELP)."""

    name: str
    prune: dict = field(default_factory=dict)  # PruneConfig fields
    augment: str = "none"
    auto: bool = False
    finetune: bool = False

    def options(self, data: Path, eval_data: Path | None, shots: int, seed: int, ratio: float,
                **prune_fields) -> CompressOptions:
        """No timing; `prune_fields` add to the variant's PruneConfig (scope, exclude, pgd_iters)."""
        return CompressOptions(data=data, shots=shots, seed=seed, eval_data=eval_data, providers=[],
                               prune=PruneConfig(ratio=ratio, **self.prune, **prune_fields), augment=self.augment,
                               auto_method=self.auto, auto_mu=self.auto,
                               finetune=FINETUNE if self.finetune else FinetuneConfig())


def variant(name: str) -> Variant:
    method, *words = name.split()
    fields: dict = {} if method == "auto" else {"method": method}
    flags = {"augment": "none", "finetune": False}
    for word in words:
        if word.startswith("mu="):
            fields["mu"] = float(word[3:])
        elif word == "pgd":
            fields["solver"] = "pgd"
        elif word == "+aug":
            flags["augment"] = DEFAULT_SPEC
        elif word == "+ft":
            flags["finetune"] = True
        else:
            raise SystemExit(f"variant '{name}': unknown word '{word}' ({VARIANT_HELP})")
    return Variant(name, fields, auto=method == "auto", **flags)


def run(model: Path, data: Path, eval_data: Path, shots: int, seed: int, ratio: float, variant: Variant,
        **prune_fields) -> dict:
    """One compress; quality of the last link (fine-tuned if the variant says so)."""
    start = time.perf_counter()
    report = compress(model, variant.options(data, eval_data, shots, seed, ratio, **prune_fields)).report
    q = report["quality"]
    return {"accuracy": q["student_accuracy"], "teacher_accuracy": q["teacher_accuracy"],
            "agreement": q["top1_agreement"], "prune_seconds": report["stages_seconds"]["prune"],
            "compress_seconds": time.perf_counter() - start,
            "flops_reduction": report["totals"]["flops_reduction"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ASSETS / "demo_vgg.onnx")
    p.add_argument("--data", type=Path, default=ASSETS / "demo_shots")
    p.add_argument("--eval-data", type=Path, default=ASSETS / "demo_eval.npz")
    p.add_argument("--shots", default="1", help="comma-separated K values")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated; each {VARIANT_HELP}")
    p.add_argument("--pgd-seeds", type=int, default=1, help="run the slow pgd solver on this many seeds")
    p.add_argument("--out", type=Path, default=Path("results") / "methods.json",
                   help="JSON written here (default: results/methods.json under the current directory)")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for k in [int(s) for s in args.shots.split(",")]:
        for name in args.variants.split(","):
            use = seeds[:args.pgd_seeds] if "pgd" in name else seeds
            runs = [run(args.model, args.data, args.eval_data, k, s, args.ratio, variant(name)) for s in use]
            acc = [r["accuracy"] * 100 for r in runs]
            row = {"shots": k, "variant": name, "seeds": use, "runs": runs,
                   "accuracy_mean": statistics.mean(acc), "accuracy_std": statistics.pstdev(acc),
                   "teacher_accuracy": runs[0]["teacher_accuracy"] * 100,
                   "prune_seconds_mean": statistics.mean(r["prune_seconds"] for r in runs),
                   "compress_seconds_mean": statistics.mean(r["compress_seconds"] for r in runs)}
            rows.append(row)
            print(f"K={k:<2} {name:<18} acc {row['accuracy_mean']:6.2f} ± {row['accuracy_std']:4.2f}  "
                  f"(teacher {row['teacher_accuracy']:.2f}, seeds {use})  prune {row['prune_seconds_mean']:7.2f} s  "
                  f"whole {row['compress_seconds_mean']:6.2f} s",
                  flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": str(args.model), "ratio": args.ratio, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
