"""crossprune beside what a deployment engineer would otherwise reach for, on the same ONNX
teacher and the same few labelled shots.

    pip install torch-pruning==1.6.1     # the peer; not a dependency of crossprune
    python tools/bench_peers.py --shots 5 --seeds 0,1,2
    python tools/bench_peers.py --model tools/teachers/vgg16.onnx --paper --exclude '*Gemm*' --out results/peers_vgg16.json

Rows, each from the same shots per seed:
* Torch-Pruning (DepGraph) on the onnx2torch twin of the teacher, at the same keep ratio (so
  the same widths, FLOPs and speed as crossprune here), with its magnitude (L2, no data) and
  Taylor (gradients of the cross-entropy on the shots) importances; then each fine-tuned on
  the shots (KL to the teacher's outputs, the shots' augmentation, Adam), as a user of it
  with a handful of samples would.
* onnxruntime's quantize_static (QDQ, per-channel int8 weights, uint8 activations, after its
  pre-processing), calibrated on the shots: INT8 alone, no pruning.
* crossprune with its defaults, and with --quantize int8.
Accuracy on the evaluation set for every seed; CPU latency of the first seed's models, all
timed together in one run (interleaved rounds, medians), at batch 1 and 32.
"""
from __future__ import annotations

import argparse
import copy
import fnmatch
import io
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import CompressOptions, PruneConfig, compress  # noqa: E402
from pipeline import augment, bench, data  # noqa: E402
from pipeline.convert import run_torch, to_torch  # noqa: E402
from pipeline.load import load_model  # noqa: E402
from pipeline.runtime import make_session, run_batched  # noqa: E402

ASSETS = ROOT / "pipeline" / "assets"


def shots_and_eval(model: Path, data_path: Path, eval_path: Path, k: int, seed: int, folder: Path):
    """The shots crossprune draws for this seed (written out, so every row reads the same ones),
    and the evaluation set, both preprocessed as crossprune preprocesses them."""
    loaded = load_model(model)
    pre, _ = data.preprocess_for(loaded.path, loaded.inputs[0])
    shots = data.draw_shots(data.load_samples(data_path, loaded.inputs[0], pre), shots=k, count=None, seed=seed).calib
    path = folder / f"shots_s{seed}.npz"
    np.savez(path, x=shots.x, y=shots.y)
    evalset = data.load_samples(eval_path, loaded.inputs[0], pre)
    return path, shots.x, shots.y, evalset.x, evalset.y


def accuracy(model: bytes, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(run_batched(make_session(model), x)[0].argmax(1) == y))


def torch_pruned(teacher: torch.nn.Module, x: np.ndarray, y: np.ndarray, ratio: float, importance: str,
                 exclude: list[str]) -> torch.nn.Module:
    """Torch-Pruning's MetaPruner on a copy of the twin, every prunable layer to `ratio` of its
    channels; Linear layers (the classifier) and layers matching `exclude` left as they are."""
    import torch_pruning as tp

    net = copy.deepcopy(teacher).eval()
    named = dict(net.named_modules())
    ignored = [m for n, m in named.items() if isinstance(m, torch.nn.Linear)
               or any(fnmatch.fnmatchcase("/" + n, p) for p in exclude)]
    example = torch.from_numpy(x[:2])
    if importance == "taylor":
        imp = tp.importance.TaylorImportance()
    else:
        imp = tp.importance.MagnitudeImportance(p=2)
    pruner = tp.pruner.MetaPruner(net, example, importance=imp, pruning_ratio=1 - ratio, ignored_layers=ignored)
    if importance == "taylor":
        net.zero_grad()
        F.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y)).backward()
    pruner.step()
    net.zero_grad()
    return net


def finetune(net: torch.nn.Module, teacher_logits, x: np.ndarray, transforms, steps: int, lr: float,
             seed: int) -> torch.nn.Module:
    """KL to the teacher's outputs on freshly augmented shots each step; BatchNorm in training
    mode, as a fine-tune usually runs."""
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for _ in range(steps):
        batch = augment.apply(x, transforms, rng)
        target = F.softmax(torch.from_numpy(teacher_logits(batch)), 1)
        loss = F.kl_div(F.log_softmax(net(torch.from_numpy(batch)), 1), target, reduction="batchmean")
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def to_onnx(net: torch.nn.Module, like: Path, x: np.ndarray) -> bytes:
    """The peer's torch model exported with the teacher's input and output names, batch free."""
    proto = load_model(like).proto
    inputs, outputs = [i.name for i in proto.graph.input], [o.name for o in proto.graph.output]
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(net.eval(), (torch.from_numpy(x[:1]),), buffer, input_names=inputs, output_names=outputs,
                          dynamic_axes={n: {0: "batch"} for n in inputs + outputs}, opset_version=17, dynamo=False)
    return buffer.getvalue()


def ort_int8(model: Path, x: np.ndarray) -> bytes:
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quant_pre_process,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            name = load_model(model).proto.graph.input[0].name
            self.feeds = iter([{name: x[i:i + 1]} for i in range(len(x))])

        def get_next(self):
            return next(self.feeds, None)

    with tempfile.TemporaryDirectory() as tmp:
        prep, out = Path(tmp) / "prep.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(model), str(prep), skip_symbolic_shape=True)
        quantize_static(str(prep), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        return out.read_bytes()


def run_seed(args, seed: int, folder: Path) -> tuple[dict[str, float], dict[str, bytes], dict[str, float]]:
    shots_path, x, y, ex, ey = shots_and_eval(args.model, args.data, args.eval_data, args.shots, seed, folder)
    teacher_twin = to_torch(load_model(args.model).proto)
    teacher_logits = lambda batch: run_torch(teacher_twin, batch)[0]  # noqa: E731
    transforms = augment.build(augment.DEFAULT_SPEC, None, seed, x, teacher_logits).transforms
    models, seconds = {"teacher": args.model.read_bytes()}, {}
    torch.manual_seed(seed)
    for importance in ("l2", "taylor"):
        start = time.perf_counter()
        net = torch_pruned(teacher_twin.module, x, y, args.ratio, importance, args.exclude)
        models[f"torch-pruning {importance}"] = to_onnx(net, args.model, x)
        seconds[f"torch-pruning {importance}"] = time.perf_counter() - start
        net = finetune(net, teacher_logits, x, transforms, args.ft_steps, args.ft_lr, seed)
        models[f"torch-pruning {importance} +ft"] = to_onnx(net, args.model, x)
        seconds[f"torch-pruning {importance} +ft"] = time.perf_counter() - start
    start = time.perf_counter()
    models["onnxruntime int8"] = ort_int8(args.model, x)
    seconds["onnxruntime int8"] = time.perf_counter() - start
    for name, int8 in (("crossprune", False), ("crossprune int8", True)):
        start = time.perf_counter()
        options = CompressOptions(data=shots_path, shots=args.shots, seed=seed, eval_data=None, providers=[],
                                  prune=PruneConfig(ratio=args.ratio, scope=args.scope, exclude=tuple(args.exclude)),
                                  auto_method=True, auto_mu=True, int8=int8)
        result = compress(args.model, options)
        models[name] = result.models.get("slim-int8", result.slim) if int8 else result.slim
        seconds[name] = time.perf_counter() - start
    start = time.perf_counter()  # the same fine-tune from crossprune's refit instead of from magnitude pruning
    net = finetune(to_torch(onnx.load_from_string(models["crossprune"])).module, teacher_logits, x,
                   transforms, args.ft_steps, args.ft_lr, seed)
    models["crossprune +ft"] = to_onnx(net, args.model, x)
    seconds["crossprune +ft"] = seconds["crossprune"] + time.perf_counter() - start
    acc = {name: accuracy(m, ex, ey) for name, m in models.items()}
    return acc, models, seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=ASSETS / "demo_vgg.onnx")
    p.add_argument("--data", type=Path, default=ASSETS / "demo_shots")
    p.add_argument("--eval-data", type=Path, default=ASSETS / "demo_eval.npz")
    p.add_argument("--paper", action="store_true",
                   help="Fashion-MNIST 32x32 shots and 2,000 test images as tools/bench_paper.py writes them")
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--ratio", type=float, default=0.5, help="share of channels kept, every row")
    p.add_argument("--scope", default="internal")
    p.add_argument("--exclude", action="append", default=[], help="node pattern left whole by every row")
    p.add_argument("--ft-steps", type=int, default=300)
    p.add_argument("--ft-lr", type=float, default=1e-3)
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--out", type=Path, default=Path("results") / "peers.json",
                   help="JSON written here (default: results/peers.json under the current directory)")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows: dict[str, list[float]] = {}
    timing: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if args.paper:
            sys.path.insert(0, str(ROOT / "tools"))
            import bench_paper

            args.eval_data = bench_paper.write_eval(folder, 2000)
        first = None
        for seed in seeds:
            if args.paper:
                args.data = bench_paper.write_shots(folder, args.shots, seed)
            acc, models, seconds = run_seed(args, seed, folder)
            first = first or models
            for name, value in acc.items():
                rows.setdefault(name, []).append(100 * value)
                timing.setdefault(name, []).append(seconds.get(name, 0.0))
            print(f"seed {seed}: " + ", ".join(f"{n} {100 * v:.2f}" for n, v in acc.items()), flush=True)
        shape = tuple(np.load(args.eval_data)["x"].shape[1:]) if args.eval_data.suffix == ".npz" else None
        timed = bench.bench(list(first.items()), ["cpu"], [1, 32], runs=args.runs, rounds=10, shape=shape)
    speed = {(t.model, t.batch): t for t in timed.timings}
    table = []
    for name, acc in rows.items():
        b1, b32 = speed.get((name, 1)), speed.get((name, 32))
        table.append({"model": name, "accuracy_mean": statistics.mean(acc), "accuracy_std": statistics.pstdev(acc),
                      "accuracy": acc, "seconds_mean": statistics.mean(timing[name]),
                      "bytes": len(first[name]), "speedup_b1": b1.speedup if b1 else None,
                      "speedup_b32": b32.speedup if b32 else None,
                      "p50_ms_b1": b1.p50_ms if b1 else None, "p50_ms_b32": b32.p50_ms if b32 else None})
    print(f"\n| model | top-1 (mean ± sd, seeds {args.seeds}) | size | CPU batch 1 | CPU batch 32 | seconds |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in table:
        print(f"| {r['model']} | {r['accuracy_mean']:.2f} ± {r['accuracy_std']:.2f} | {r['bytes'] / 1e3:.0f} kB | "
              f"{r['p50_ms_b1']:.3f} ms ({r['speedup_b1']:.2f}x) | {r['p50_ms_b32']:.3f} ms ({r['speedup_b32']:.2f}x) | "
              f"{r['seconds_mean']:.1f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": str(args.model), "shots": args.shots, "ratio": args.ratio,
                                    "seeds": seeds, "ft_steps": args.ft_steps, "ft_lr": args.ft_lr,
                                    "rows": table, "bench": timed.to_json()}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
