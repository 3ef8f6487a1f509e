"""crossprune: few-shot channel pruning of ONNX models by cross distillation.

    from pipeline import compress, CompressOptions, PruneConfig
    result = compress("model.onnx", CompressOptions(data="shots/", shots=5), "model.slim.onnx")
    result.report["totals"]["flops_reduction"]

The names are resolved on first use, so that importing one stage does not import them all.
"""
from __future__ import annotations

import importlib

_API = {"compress": "pipeline.workflow", "CompressOptions": "pipeline.workflow",
        "CompressResult": "pipeline.workflow", "PruneConfig": "pipeline.prune", "FinetuneConfig": "pipeline.finetune",
        "Ratio": "pipeline.search", "FlopsShare": "pipeline.search", "LatencyTarget": "pipeline.search",
        "WidthsFrom": "pipeline.search"}
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
