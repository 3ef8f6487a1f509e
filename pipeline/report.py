"""The report: one JSON-ready dict built by the stages (pipeline/render.py shows it to people).

Its top-level "schema" numbers the layout. `--widths` reads reports back, and only this subset,
which a change of SCHEMA must keep or migrate:

    schema                   int, at most SCHEMA (absent in reports written before it existed)
    groups[].producers       list of str: the ONNX nodes that write the group's channels
    groups[].channels_before int
    groups[].channels_after  int: channels kept (equal to channels_before where left whole)
"""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import resource
import sys


SCHEMA = 1


def versions() -> dict:
    names = ("onnx", "onnxruntime-gpu", "onnxruntime", "onnx2torch", "onnxslim", "torch", "numpy", "click")
    out = {"python": sys.version.split()[0]}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def peak_rss_mb() -> float:
    """Peak resident memory of this process. Linux's VmHWM, since getrusage's maxrss starts from
    the parent's at fork (a large parent that spawns crossprune would be reported instead)."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def dumps(report: dict) -> str:
    return json.dumps(report, indent=2, sort_keys=False, default=_jsonable)


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "to_json"):
        return value.to_json()
    return str(value)
