"""How long `crossprune compress` takes, stage by stage, against an earlier version and against the floor.

    python tools/bench_speed.py --old 07f3a15 --out /tmp/speed.json
    python tools/bench_speed.py --models resnet50,yolov8n --methods cross --device cuda

Every run is a fresh process (`python -m pipeline compress ...`, timed from start to exit,
so imports count), for the code of this checkout and, with --old, for a git revision checked out
beside it. Models and commands:

  demo      the embedded teacher and its shots, K=5 (`crossprune demo`)
  vgg16     tools/teachers/vgg16.onnx, 5 Fashion-MNIST training images per class (seed 0)
  resnet56  tools/teachers/resnet56.onnx, the same shots
  resnet50  torchvision's ResNet-50 (seeded random weights) at 224x224, 64 of 128 images, --scope all --no-bench
  yolov8n   a YOLOv8n-class detector (tests/zoo.py) at 320x320, 64 of 128 images, --scope all --no-bench

all at --ratio 0.5. The floor of a pruning is what any layer-wise method must do with the same
inputs: one forward pass of the teacher and one of the student over them (timed here with the
torch twin) and the products of the Gram matrices cross distillation needs, G_tt and G_ss over
each consumer's rows as sampled (at this machine's measured float32 GEMM rate). A table is printed
and the rows are written as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
import fmnist  # noqa: E402

ASSETS = ROOT / "pipeline" / "assets"


@dataclass
class Setup:
    model: Path
    args: list[str]  # compress options besides the model, -o, --report
    data: Path | None = None
    options: dict = field(default_factory=dict)  # the same job as CompressOptions fields, for the floor


def setups(folder: Path, names: list[str]) -> dict[str, Setup]:
    out = {}
    for name in names:
        if name == "demo":
            out[name] = Setup(ASSETS / "demo_vgg.onnx", ["--data", str(ASSETS / "demo_shots"), "--shots", "5",
                                                         "--eval-data", str(ASSETS / "demo_eval.npz")],
                              ASSETS / "demo_shots", {"shots": 5})
        elif name in ("vgg16", "resnet56"):
            x, y = fmnist.load("train")
            idx = fmnist.balanced_subset(y, 5, 0)
            data = folder / "shots_k5.npz"
            np.savez(data, x=fmnist.normalise(x[idx], pad=2), y=y[idx])
            out[name] = Setup(ROOT / "tools" / "teachers" / f"{name}.onnx", ["--data", str(data), "--shots", "5"],
                              data, {"shots": 5})
        else:
            size = 224 if name == "resnet50" else 320
            model = _export(name, folder, size)
            data = folder / f"images_{size}.npz"
            x, _ = fmnist.load("t10k")
            grey = torch.from_numpy(fmnist.normalise(x[:128]))  # 64 drawn for pruning, the rest held out
            np.savez(data, x=torch.nn.functional.interpolate(grey, size=(size, size), mode="bilinear")
                     .repeat(1, 3, 1, 1).numpy())
            args = ["--data", str(data), "--samples", "64", "--scope", "all", "--no-bench",
                    "--min-fidelity", "0"]  # random weights: fidelity to them says nothing
            out[name] = Setup(model, args, data, {"samples": 64, "scope": "all"})
    return out


def _export(name: str, folder: Path, size: int) -> Path:
    from tests.zoo import export_zoo

    return export_zoo(name, folder / f"{name}.onnx", 17, size=size)


def run(tree: Path, setup: Setup, method: str, device: str, folder: Path, timeout: float) -> dict:
    """One compress in a fresh process of `tree`'s code."""
    report = folder / "report.json"
    report.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pipeline", "compress", str(setup.model), *setup.args, "--ratio", "0.5",
           "--method", method, "--device", device, "-o", str(folder / "slim.onnx"), "--force", "--quiet",
           "--report", str(report)]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True)
        peak = _watch(child, start + timeout)
        if peak is None:
            return {"seconds": None, "error": f"over {timeout:.0f} s"}
        seconds = time.perf_counter() - start
        err.seek(0)
        lines = err.read().strip().splitlines()
    if child.returncode != 0:
        return {"seconds": seconds, "error": lines[-1] if lines else "failed"}
    rep = json.loads(report.read_text())
    kept = [g["kept"] for g in rep["groups"]]
    return {"seconds": seconds, "stages": rep["stages_seconds"], "peak_rss_mb": peak,
            "accuracy": rep["quality"].get("student_accuracy"), "agreement": rep["quality"].get("agreement"),
            "flops_reduction": rep["totals"]["flops_reduction"], "kept": kept,
            "chosen": rep["auto"]["method"] + f" mu={rep['auto']['mu']}" if rep.get("auto") else None}


def _watch(child: subprocess.Popen, deadline: float) -> float | None:
    """The child's peak resident MB, read from its VmHWM until it exits (None: killed at the
    deadline). Read from outside, as getrusage's maxrss of a child starts from this process's."""
    peak = 0.0
    while child.poll() is None:
        if time.perf_counter() > deadline:
            child.kill()
            child.wait()
            return None
        try:
            with open(f"/proc/{child.pid}/status") as status:
                peak = max(peak, next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024)
        except (OSError, StopIteration):
            pass
        time.sleep(0.05)
    return peak


def gemm_rate() -> float:
    """float32 GFLOP/s of this machine's torch matrix product (two threads here)."""
    a, b = torch.randn(8192, 1024), torch.randn(8192, 1024)
    a.T @ b
    start = time.perf_counter()
    for _ in range(3):
        a.T @ b
    return 3 * 2 * 8192 * 1024 * 1024 / (time.perf_counter() - start) / 1e9


def floor(setup: Setup, rate: float) -> dict:
    """Seconds of one teacher and one student forward over the pruning's inputs, plus G_tt and
    G_ss of every consumer of a pruned group over its sampled rows at `rate`."""
    from pipeline import allocator, prune, workflow
    from pipeline.prune import stats
    from pipeline.prune.core import _units

    config = prune.PruneConfig(ratio=0.5, scope=setup.options.get("scope", "internal"))
    options = workflow.CompressOptions(data=setup.data, prune=config, providers=[],
                                       **{k: v for k, v in setup.options.items() if k != "scope"})
    ready = workflow.prepare(setup.model, options)
    units = _units(ready.shots.calib.x, config.chunk, ready.layer_augmenter(config), ready.teacher)
    start = time.perf_counter()
    with torch.no_grad(), allocator.reuse_freed():  # as compress allocates
        for unit in units:
            for piece in unit:
                ready.teacher.module(piece)
    forward = time.perf_counter() - start
    teacher = ready.teacher
    pruned = [(g, c) for g in ready.groups if g.prunable and not prune.skip_reason(teacher, g, config)
              for c in g.consumers]
    shapes: dict[str, torch.Size] = {}  # each consumer's input shape, from one forward of one sample

    def seen(node: str):
        def hook(_module, args) -> None:  # a pre-hook that returns something replaces the inputs
            shapes.setdefault(node, args[0].shape)
        return hook

    handles = [teacher.entry(c.node).register_forward_pre_hook(seen(c.node)) for _, c in pruned]
    with torch.no_grad():
        teacher.module(units[0][0][:1])
    for handle in handles:
        handle.remove()
    flops = 0.0
    for group, c in pruned:
        dim = len(prune.problem(ready.view, c, group.size, None, teacher.device).weight)
        per_sample = stats.positions(ready.view, c, torch.empty(shapes[c.node]))
        rows = stats.picked(sum(len(piece) for unit in units for piece in unit) * per_sample, config.rows)
        flops += 2 * rows * dim * (dim + 1)  # two symmetric Gram matrices, G_tt and G_ss
    return {"forward_s": forward, "gram_gflop": flops / 1e9, "floor_s": 2 * forward + flops / 1e9 / rate}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="demo,vgg16,resnet56,resnet50,yolov8n")
    p.add_argument("--methods", default="cross,auto", help="methods this checkout runs ('' for none)")
    p.add_argument("--old", help="git revision to time beside this checkout")
    p.add_argument("--old-methods", default="cross,auto", help="methods the old code runs (auto is slow there)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--timeout", type=float, default=1800, help="seconds a run may take before it is recorded as over")
    p.add_argument("--out", type=Path, default=Path("speed.json"))
    args = p.parse_args()
    rate = gemm_rate()
    print(f"float32 GEMM: {rate:.0f} GFLOP/s; {torch.get_num_threads()} torch threads; device {args.device}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        trees = [("new", ROOT)]
        if args.old:
            old = folder / "old"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.old], check=True,
                           capture_output=True)
            trees.append(("old", old))
        try:
            header = (f"{'model':<10}{'code':<5}{'method':<7}{'total s':>9}{'choose':>8}{'prune':>8}{'bench':>7}"
                      f"{'peak MB':>9}{'floor s':>9}{'prune/floor':>12}  chosen")
            print(header)
            runs = {code: [m for m in methods.split(",") if m] for code, methods in (("new", args.methods),
                                                                                  ("old", args.old_methods))}
            for name, setup in setups(folder, args.models.split(",")).items():
                low = floor(setup, rate)
                for method, (code, tree) in ((m, t) for m in dict.fromkeys(runs["new"] + runs["old"]) for t in trees):
                    if method not in runs[code]:  # old and new in turn, method by method
                        continue
                    got = run(tree, setup, method, args.device, folder, args.timeout)
                    row = {"model": name, "code": code, "method": method, "device": args.device, **low, **got}
                    rows.append(row)
                    st = got.get("stages", {})
                    work = st.get("prune", 0) + st.get("choose", 0)
                    total = f"{got['seconds']:.1f}" if got.get("seconds") is not None else "-"
                    print(f"{name:<10}{code:<5}{method:<7}{total:>9}{st.get('choose', 0):>8.1f}"
                          f"{st.get('prune', 0):>8.1f}{st.get('bench', 0):>7.1f}{got.get('peak_rss_mb', 0):>9.0f}"
                          f"{low['floor_s']:>9.1f}{work / low['floor_s']:>12.1f}  "
                          f"{got.get('chosen') or got.get('error', '')}", flush=True)
        finally:
            if args.old:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(folder / "old")],
                               capture_output=True)
    args.out.write_text(json.dumps({"gemm_gflops": rate, "torch": torch.__version__, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
