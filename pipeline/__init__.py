"""crossprune: few-shot channel pruning of ONNX models by cross distillation.

    from pipeline import compress, CompressOptions, PruneConfig
    result = compress("model.onnx", CompressOptions(data="shots/", shots=5), "model.slim.onnx")
    result.report["totals"]["flops_reduction"]
"""
from pipeline.compress import CompressOptions, CompressResult, compress
from pipeline.prune import PruneConfig

__all__ = ["compress", "CompressOptions", "CompressResult", "PruneConfig"]
