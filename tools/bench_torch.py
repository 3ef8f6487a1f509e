"""Latency of ONNX models run as their torch twins on a torch device, labelled as such.

Where onnxruntime has no GPU provider (the lent GPU machine has onnxruntime's CPU build only),
this is the GPU figure that can be measured: the models go through the pipeline's own
onnx2torch stage and run in torch eager mode, so the numbers are torch-CUDA numbers, never to
be read as onnxruntime's. Models are timed in interleaved rounds (CUDA events on a GPU, wall
clock on the CPU) and the medians compared with the first model's, per dtype and batch size.

    python tools/bench_torch.py teacher.onnx slim.onnx --device cuda --graph --batch 1,32,256 --out t.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.convert import to_torch  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def input_shape(proto: onnx.ModelProto, batch: int) -> list[int]:
    """The first input's shape with `batch` as its leading dimension; other dimensions must be fixed."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    shape = [batch] + [d.dim_value for d in dims[1:]]
    if 0 in shape:
        raise SystemExit(f"{proto.graph.input[0].name}: only the batch dimension may be dynamic here")
    return shape


def timer(device: torch.device):
    """A callable returning milliseconds taken by fn(), timed on the device's own clock."""
    if device.type == "cuda":
        def run(fn) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
    else:
        def run(fn) -> float:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
    return run


def runner(net: torch.nn.Module, x: torch.Tensor, graph: bool):
    """fn() running one batch: eager, or replaying a CUDA graph of it (no launch overhead, so
    what is left is the kernels' own time). None where the model cannot be captured."""
    if not graph:
        return lambda: net(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            net(x)
    torch.cuda.current_stream().wait_stream(side)
    captured = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(captured):
            net(x)
    except RuntimeError as exc:
        print(f"graph capture failed ({str(exc).splitlines()[0]}): timed eager", file=sys.stderr)
        return None
    return captured.replay


@torch.no_grad()
def bench(paths: list[Path], device: torch.device, dtypes: list[str], batches: list[int], runs: int,
          rounds: int, graph: bool) -> list[dict]:
    protos = {str(p): onnx.load(str(p)) for p in paths}  # named as given: two model.onnx stay apart
    nets = {name: to_torch(proto, name).module.to(device) for name, proto in protos.items()}
    clock = timer(device)
    rows = []
    for dtype in dtypes:
        for net in nets.values():
            net.to(DTYPES[dtype])
        for batch in batches:
            x = {n: torch.randn(input_shape(protos[n], batch), device=device, dtype=DTYPES[dtype]) for n in nets}
            calls = {n: runner(net, x[n], graph) for n, net in nets.items()}
            mode = {n: "graph" if graph and calls[n] else "eager" for n in nets}
            calls = {n: call or runner(nets[n], x[n], False) for n, call in calls.items()}
            times: dict[str, list[float]] = {n: [] for n in nets}
            for _ in range(rounds):
                for name, call in calls.items():
                    for _ in range(5):
                        call()
                    times[name] += [clock(call) for _ in range(runs)]
            base = float(np.median(times[str(paths[0])]))
            for name, t in times.items():
                p50 = float(np.median(t))
                rows.append({"model": name, "engine": f"torch-{device.type}", "mode": mode[name], "dtype": dtype,
                             "batch": batch, "p50_ms": p50, "p90_ms": float(np.percentile(t, 90)),
                             "speedup": base / p50})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path, help="ONNX files; the first is the baseline")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float32,float16")
    parser.add_argument("--batch", default="1,32,256")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--graph", action="store_true", help="replay CUDA graphs (kernel time without launches)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device (pass --device cpu)")
    if args.graph and device.type != "cuda":
        raise SystemExit("--graph needs --device cuda")
    torch.backends.cudnn.benchmark = True
    rows = bench(args.models, device, args.dtype.split(","), [int(b) for b in args.batch.split(",")], args.runs,
                 args.rounds, args.graph)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    mode = "CUDA graphs" if args.graph else "eager"
    print(f"torch {torch.__version__}, {mode}, on {name} (torch numbers, not onnxruntime's)")
    width = max(24, *(len(r["model"]) for r in rows))
    print(f"{'model':<{width}} {'mode':<6} {'dtype':<9} {'batch':>5} {'p50 ms':>8} {'p90 ms':>8} {'speedup':>8}")
    for r in rows:
        print(f"{r['model']:<{width}} {r['mode']:<6} {r['dtype']:<9} {r['batch']:>5} {r['p50_ms']:8.3f} "
              f"{r['p90_ms']:8.3f} {r['speedup']:7.2f}x")
    if args.out:
        args.out.write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
