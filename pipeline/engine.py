"""Where torch computes: the twins' forward passes, the Gram matrices and the solver.

That work is dense linear algebra (products of patch matrices, inverse Gram updates), which a
GPU does in a fraction of the time a few CPU cores take; onnxruntime's part (parity,
verification, latency) does not move. A GPU's sums round differently from the CPU's in the
last bits, so the device is part of what a report records.
"""
from __future__ import annotations

import torch

from pipeline import hardware, limits
from pipeline.errors import UsageError

DEVICES = ("auto", "cpu", "cuda")


def resolve(name: str = "auto") -> torch.device:
    """`auto`: the GPU where torch sees one, else the CPU."""
    if name not in DEVICES:
        raise UsageError(f"--device {name}: expected one of {', '.join(DEVICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: this torch sees no CUDA device (a CPU-only build, or no driver); "
                             "use --device cpu or auto")
        # the twin is held to 1e-4 of onnxruntime: TF32 products (about 1e-3) would fail that, and
        # autotuned cuDNN kernels may differ from run to run, which --seed rules out
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    return torch.device(name)


def describe(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else hardware.cpu_name()
    return {"device": device.type, "name": name}


def memory(device: torch.device) -> int:
    """Bytes the device holds: what caches of statistics on it are sized by."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return limits.total_memory()
