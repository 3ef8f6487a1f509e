"""--ratio under --scope all: the default (the ratio's FLOPs spread by the loss curves where held-out
shots agree) against --uniform (one ratio for all), on trained squeeze-excitation teachers.

    python tools/bench_spread.py
    python tools/bench_spread.py --models tiny_se --ratios 0.5,0.6,0.7 --seeds 0

Teachers: tools/teachers/mobilenet_v3_small.onnx (not committed: `python tools/train_teacher.py
--arch mobilenet_v3_small --epochs 4`) and tools/teachers/tiny_se.onnx. K Fashion-MNIST training
images per class per seed, every test image scored (--eval-count), `--method auto` and the default
augmentation. A collapsed model is still scored (--min-fidelity 0) so that the table shows how far
it fell. Prints a table and writes results/spread.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import onnx

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
sys.path.insert(0, str(TOOLS.parent))
import bench_paper  # noqa: E402

from pipeline import CompressOptions, PruneConfig, Ratio, compress  # noqa: E402


def run(model: Path, folder: Path, k: int, seed: int, ratio: float, spread: bool, eval_count: int) -> dict:
    up = onnx.load(str(model)).graph.input[0].type.tensor_type.shape.dim[-1].dim_value // 32
    options = CompressOptions(data=bench_paper.write_shots(folder, k, seed, up), shots=k, seed=seed,
                              eval_data=bench_paper.write_eval(folder, eval_count, up), providers=[],
                              min_fidelity=0.0, prune=PruneConfig(ratio=ratio, scope="all"), mode=Ratio(spread),
                              auto_method=True, auto_mu=True)  # the command's defaults
    rep = compress(model, options).report
    q, alloc = rep["quality"], rep.get("allocation") or {}
    return {"teacher": q["teacher_accuracy"], "student": q["student_accuracy"], "agreement": q["top1_agreement"],
            "flops_reduction": rep["totals"]["flops_reduction"], "chosen": alloc.get("chosen", "uniform"),
            "seconds": sum(rep["stages_seconds"].values())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="mobilenet_v3_small,tiny_se")
    p.add_argument("--ratios", default="0.5")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--shots", type=int, default=10)
    p.add_argument("--eval-count", type=int, default=10000)
    p.add_argument("--out", type=Path, default=TOOLS.parent / "results" / "spread.json")
    args = p.parse_args()
    rows = []
    print("model               ratio  widths   seeds  teacher  student (per seed)      agreement  FLOPs  s/run")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model = TOOLS / "teachers" / f"{name}.onnx"
            if not model.is_file():
                raise SystemExit(f"{model}: not committed; python tools/train_teacher.py --arch {name} writes it")
            for ratio in map(float, args.ratios.split(",")):
                for spread in (True, False):
                    runs = [run(model, Path(tmp), args.shots, int(s), ratio, spread, args.eval_count)
                            for s in args.seeds.split(",")]
                    row = {"model": name, "ratio": ratio, "spread": spread, "shots": args.shots, "runs": runs}
                    rows.append(row)
                    print(f"{name:19s} {ratio:5.2f}  {'default' if spread else 'uniform':7s}  {len(runs):5d}  "
                          f"{bench_paper.seeds_line(runs)}  {'/'.join(r['chosen'] for r in runs)}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
