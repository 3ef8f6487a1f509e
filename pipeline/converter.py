"""onnx2torch, imported without importing torchvision until a model needs it.

onnx2torch imports torchvision at start-up for two converters only (NonMaxSuppression and
RoiAlign), and torchvision pulls in torch's compiler stack: about 1.6 s of every command's start
on a 2-core machine, for graphs that almost never hold those operators. While onnx2torch is
imported, `torchvision` and `torchvision.ops` are stand-ins whose attributes import the real
package when first used; afterwards the stand-ins leave sys.modules, so that any other import
gets the real one.
"""
from __future__ import annotations

import importlib
import sys
import types


class _Deferred(types.ModuleType):
    """A module whose attributes come from the real module of the same name, imported on first use."""

    def __getattr__(self, name: str):
        if name.startswith("__"):  # introspection (inspect, pickle) must not trigger the import
            raise AttributeError(name)
        return getattr(importlib.import_module(self.__name__), name)


def _deferred_function(module: str, name: str):
    def call(*args, **kwargs):
        return getattr(importlib.import_module(module), name)(*args, **kwargs)
    return call


def _import_onnx2torch() -> None:
    if "torchvision" in sys.modules or "onnx2torch" in sys.modules:
        return
    stand_ins = {name: _Deferred(name) for name in ("torchvision", "torchvision.ops")}
    stand_ins["torchvision"].ops = stand_ins["torchvision.ops"]
    stand_ins["torchvision.ops"].roi_align = _deferred_function("torchvision.ops", "roi_align")  # `from ... import`
    sys.modules.update(stand_ins)
    try:
        importlib.import_module("onnx2torch")
    finally:
        for name, module in stand_ins.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]


_import_onnx2torch()

from onnx2torch import convert  # noqa: E402
from onnx2torch.node_converters.registry import add_converter, get_converter  # noqa: E402
from onnx2torch.onnx_graph import OnnxGraph  # noqa: E402
from onnx2torch.utils.common import OnnxToTorchModule, OperationConverterResult, onnx_mapping_from_node  # noqa: E402

__all__ = ["OnnxGraph", "OnnxToTorchModule", "OperationConverterResult", "add_converter", "convert", "get_converter",
           "onnx_mapping_from_node"]
