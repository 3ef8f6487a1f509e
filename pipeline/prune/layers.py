"""The linear layers a group's channels feed, as the solver sees them: one entry per kind.

Every consumer is a matrix from input features to outputs. A kind says how its ONNX weights
become that matrix (rows: input features, each channel a run of `per` of them, then a bias
row), how its input becomes rows of that map, and how refit weights go back into the ONNX
layout and into the torch twin. Supporting another linear layer is one more entry in KINDS.
"""
from __future__ import annotations

import types
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.analyze import ChannelGroup, Consumer
from pipeline.convert import TorchModel
from pipeline.graph import GraphView

CONVS = (torch.nn.Conv1d, torch.nn.Conv2d)  # the convolutions a consumer refit handles (1-D as 2-D of height 1)


@dataclass
class LayerWeights:
    """New ONNX-layout weights of one consumer (full input width, dropped channels zero)."""

    weight: np.ndarray
    bias: np.ndarray | None  # None where the layer has no bias to refit (MatMul, ConvTranspose)
    bias_slot: int = 2  # the node input that holds the bias


@dataclass(frozen=True)
class Matrix:
    """A consumer's teacher weights in solver layout, and what its rows mean."""

    weight: np.ndarray  # (features + 1, outputs): input features, then the bias row
    per: int  # features per unit of the group (a channel's kernel taps, or its flattened positions)
    bias_fixed: bool  # the bias row is not refit (the layer has no bias input, or one per output patch)


class Kind:
    """How one kind of consumer maps between ONNX, the solver and torch."""

    modules: tuple[str, ...] = ()  # torch module types that can take its refit weights

    def accepts(self, module: torch.nn.Module | None) -> bool:
        return type(module).__name__ in self.modules

    def matrix(self, view: GraphView, consumer: Consumer) -> Matrix:
        raise NotImplementedError

    def positions(self, view: GraphView, consumer: Consumer, inp: torch.Tensor) -> int:
        """Rows one input gives (every output position of a conv, every token of a MatMul)."""
        raise NotImplementedError

    def rows(self, view: GraphView, consumer: Consumer, inp: torch.Tensor,
             pick: torch.Tensor | None = None) -> torch.Tensor:
        """The input as rows of the layer's matrix (without the ones column); `pick`: flat row
        indices to keep, in the order the rows of every sample's positions come."""
        raise NotImplementedError

    def to_onnx(self, view: GraphView, consumer: Consumer, w: np.ndarray) -> LayerWeights:
        raise NotImplementedError

    def write(self, student: TorchModel, view: GraphView, consumer: Consumer, layer: LayerWeights) -> None:
        """Put refit weights into the student's torch layer."""
        raise NotImplementedError


class _Conv(Kind):
    """Conv (1-D or 2-D): each output position reads a patch of every input channel."""

    modules = ("Conv1d", "Conv2d")

    def matrix(self, view, consumer):
        node = view.nodes[consumer.node]
        w = view.const(node.input[1]).astype(np.float64)
        bias = view.const(node.input[2]).astype(np.float64) if len(node.input) > 2 and node.input[2] else None
        out = w.shape[0]
        return Matrix(_with_bias(w.reshape(out, -1).T, bias), consumer.block * int(np.prod(w.shape[2:])), False)

    def _geometry(self, view, consumer, inp):
        """The input as 2-D (a 1-D conv, audio or series, is a 2-D one over a height of 1), its
        kernel, strides, dilations, (before, after) pads per axis and output size."""
        node = view.nodes[consumer.node]
        w_shape = view.initializers[node.input[1]].dims
        axes = len(w_shape) - 2
        kernel = tuple(view.attr(node, "kernel_shape", w_shape[2:]))
        strides = tuple(view.attr(node, "strides", (1,) * axes))
        dil = tuple(view.attr(node, "dilations", (1,) * axes))
        pads = view.pads(node, inp.shape[2:], kernel, strides, dil)
        if axes == 1:
            inp, kernel, strides, dil, pads = inp.unsqueeze(2), (1, *kernel), (1, *strides), (1, *dil), [(0, 0), *pads]
        out = [(size + sum(pad) - d * (k - 1) - 1) // s + 1
               for size, pad, k, s, d in zip(inp.shape[2:], pads, kernel, strides, dil)]
        return inp, kernel, strides, dil, pads, out

    def positions(self, view, consumer, inp):
        out = self._geometry(view, consumer, inp)[-1]
        return out[0] * out[1]

    def rows(self, view, consumer, inp, pick=None):
        inp, kernel, strides, dil, pads, (oh, ow) = self._geometry(view, consumer, inp)
        if pick is None:
            cols = F.unfold(F.pad(inp, (*pads[1], *pads[0])), kernel, dilation=dil, stride=strides)  # (N, C*kh*kw, L)
            return cols.transpose(1, 2).reshape(-1, cols.shape[1])
        # only the picked patches, (sample, output row, output column) each, read from the unpadded
        # input: taps that fall in the padding read a clamped pixel and are then zeroed
        sample, rest = pick // (oh * ow), pick % (oh * ow)
        dev = inp.device
        ys = (rest // ow * strides[0] - pads[0][0])[:, None] + torch.arange(kernel[0], device=dev)[None] * dil[0]
        xs = (rest % ow * strides[1] - pads[1][0])[:, None] + torch.arange(kernel[1], device=dev)[None] * dil[1]
        height, width = inp.shape[2:]
        patches = inp[sample[:, None, None], :, ys.clamp(0, height - 1)[:, :, None],
                      xs.clamp(0, width - 1)[:, None, :]]  # (R, kh, kw, C)
        outside = ((ys < 0) | (ys >= height))[:, :, None] | ((xs < 0) | (xs >= width))[:, None, :]
        if outside.any():
            patches = patches.masked_fill(outside[..., None], 0.0)
        return patches.permute(0, 3, 1, 2).reshape(len(pick), -1)

    def to_onnx(self, view, consumer, w):
        orig = view.const(view.nodes[consumer.node].input[1])
        return LayerWeights(w[:-1].T.reshape(orig.shape).astype(orig.dtype), w[-1].astype(orig.dtype))

    @torch.no_grad()
    def write(self, student, view, consumer, layer):
        module = student.layer(consumer.node)
        module.weight.copy_(torch.from_numpy(layer.weight))
        _set_bias(module, torch.from_numpy(layer.bias))
        _skip_dropped_inputs(module)


def _skip_dropped_inputs(conv: torch.nn.Module) -> None:
    """Let the student's conv read only the input channels its weights still use. The walk runs
    every student forward through the masked layers, and a convolution multiplies its zero
    weights as dearly as any other: at half the channels this halves its work, with the same
    outputs (up to the order of summation). The twin's nn.Conv keeps the weights, so every later
    write and the verification still see the whole masked layer."""
    weight = conv.weight.detach()
    live = torch.nonzero(weight.abs().sum(dim=[0, *range(2, weight.dim())]) != 0).squeeze(1)
    conv.__dict__.pop("forward", None)  # a later write (another group's channels) starts afresh
    if conv.groups == 1 and len(live) < weight.shape[1]:
        conv.live_inputs = live
        conv.forward = types.MethodType(_live_forward, conv)  # bound, so that a deep copy reads its own weights


def _live_forward(conv: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    live = conv.live_inputs
    return conv._conv_forward(x.index_select(1, live), conv.weight.index_select(1, live), conv.bias)


class _Deconv(Kind):
    """A ConvTranspose whose stride equals its kernel: each input pixel writes a patch of its
    own, a matrix from input channels to (output channel, patch position). Its bias is per
    output channel, not per patch entry, so it is kept rather than refit."""

    modules = ("ConvTranspose2d",)

    def matrix(self, view, consumer):
        w = view.const(view.nodes[consumer.node].input[1]).astype(np.float64)
        return Matrix(_with_bias(w.reshape(w.shape[0], -1), None), consumer.block, True)

    def positions(self, view, consumer, inp):
        return int(np.prod(inp.shape[2:]))

    def rows(self, view, consumer, inp, pick=None):
        return _pick(inp.movedim(1, -1).reshape(-1, inp.shape[1]), pick)

    def to_onnx(self, view, consumer, w):
        orig = view.const(view.nodes[consumer.node].input[1])
        return LayerWeights(w[:-1].reshape(orig.shape).astype(orig.dtype), None)

    @torch.no_grad()
    def write(self, student, view, consumer, layer):
        student.layer(consumer.node).weight.copy_(torch.from_numpy(layer.weight))


class _Gemm(Kind):
    """Gemm or MatMul by a constant matrix: every sample (Gemm) or every position of an N...C
    tensor (MatMul) is a row. MatMul has no bias input, so its bias row stays zero."""

    modules = ("Linear", "OnnxMatMul")

    def matrix(self, view, consumer):
        node = view.nodes[consumer.node]
        w = view.const(node.input[1]).astype(np.float64)
        mat = (w.T if consumer.in_axis == 1 else w) * view.attr(node, "alpha", 1.0)
        bias = view.const(node.input[2]).astype(np.float64) if len(node.input) > 2 and node.input[2] else None
        if bias is not None:
            bias = np.broadcast_to(bias * view.attr(node, "beta", 1.0), (mat.shape[1],))
        return Matrix(_with_bias(mat, bias), consumer.block, node.op_type == "MatMul")

    def positions(self, view, consumer, inp):
        return int(np.prod(inp.shape[1:-1])) if inp.dim() > 2 else 1

    def rows(self, view, consumer, inp, pick=None):
        flat = inp.reshape(-1, inp.shape[-1]) if inp.dim() > 2 else inp.reshape(inp.shape[0], -1)
        return _pick(flat, pick)

    def to_onnx(self, view, consumer, w):
        node = view.nodes[consumer.node]
        orig = view.const(node.input[1])
        mat = w[:-1] / view.attr(node, "alpha", 1.0)
        weight = (mat.T if consumer.in_axis == 1 else mat).astype(orig.dtype)
        if node.op_type == "MatMul":
            return LayerWeights(weight, None)
        return LayerWeights(weight, (w[-1] / (view.attr(node, "beta", 1.0) or 1.0)).astype(orig.dtype))

    @torch.no_grad()
    def write(self, student, view, consumer, layer):
        node = view.nodes[consumer.node]
        if node.op_type == "MatMul":  # onnx2torch keeps its weight as a graph constant
            student.constant_input(consumer.node, 1).copy_(torch.from_numpy(layer.weight))
            return
        module = student.layer(consumer.node)  # a Linear: onnx2torch folded alpha and beta in
        alpha, beta = view.attr(node, "alpha", 1.0), view.attr(node, "beta", 1.0) or 1.0
        w = layer.weight if consumer.in_axis == 1 else layer.weight.T
        module.weight.copy_(torch.from_numpy(alpha * w))
        _set_bias(module, torch.from_numpy(beta * layer.bias))


class _Recurrent(_Gemm):
    """The input projection of an LSTM, GRU or RNN: W, (directions, gates x hidden, inputs), maps
    every step of the sequence to every gate of every direction, a matrix like a MatMul's, and
    the first half of B (Wb) is its bias; the recurrence (R and Rb) never sees the channels.
    onnx2torch has no converter for these nodes, so onnxruntime runs them in the twin, fed W and
    B as constants."""

    modules = ("OrtNode",)

    def matrix(self, view, consumer):
        w = view.const(view.nodes[consumer.node].input[1]).astype(np.float64)
        b = self._bias(view, consumer)
        bias = None if b is None else b[:, :w.shape[1]].reshape(-1)
        return Matrix(_with_bias(w.transpose(2, 0, 1).reshape(w.shape[2], -1), bias), consumer.block, b is None)

    def to_onnx(self, view, consumer, w):
        orig = view.const(view.nodes[consumer.node].input[1])
        directions, gates, inputs = orig.shape
        weight = w[:-1].reshape(inputs, directions, gates).transpose(1, 2, 0).astype(orig.dtype)
        b = self._bias(view, consumer)
        if b is None:
            return LayerWeights(weight, None, 3)
        bias = b.copy()
        bias[:, :gates] = w[-1].reshape(directions, gates)
        return LayerWeights(weight, bias, 3)

    @torch.no_grad()
    def write(self, student, view, consumer, layer):
        student.constant_input(consumer.node, 1).copy_(torch.from_numpy(layer.weight))
        if layer.bias is not None:
            student.constant_input(consumer.node, 3).copy_(torch.from_numpy(layer.bias))

    @staticmethod
    def _bias(view: GraphView, consumer: Consumer) -> np.ndarray | None:
        node = view.nodes[consumer.node]
        return view.const(node.input[3]) if len(node.input) > 3 and node.input[3] else None


KINDS: dict[str, Kind] = {"conv": _Conv(), "deconv": _Deconv(), "gemm": _Gemm(), "rnn": _Recurrent()}


def _with_bias(mat: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    bias_row = np.zeros((1, mat.shape[1])) if bias is None else np.asarray(bias).reshape(1, mat.shape[1])
    return np.concatenate([mat, bias_row])


def _pick(flat: torch.Tensor, pick: torch.Tensor | None) -> torch.Tensor:
    return flat if pick is None else flat[pick]


def _set_bias(module: torch.nn.Module, bias: torch.Tensor) -> None:
    """A new Parameter: the layer may have had no bias, or a broadcast one of another shape."""
    module.bias = torch.nn.Parameter(bias.to(module.weight.device, module.weight.dtype), requires_grad=False)


def unsupported(teacher: TorchModel, group: ChannelGroup) -> str:
    """Why the torch twin cannot take refit weights for one of the group's consumers, or ''."""
    for c in group.consumers:
        module = teacher.modules_by_node.get(c.node)
        if not KINDS[c.kind].accepts(module):
            return (f"consumer '{c.node}' became {type(module).__name__} in torch, not "
                    f"{'/'.join(KINDS[c.kind].modules)}")
    return ""
