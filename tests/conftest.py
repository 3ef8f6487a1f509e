"""Real models for the tests: small torch architectures exported with torch.onnx.export."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn


def conv_bn(cin: int, cout: int, act: nn.Module | None = None, bias: bool = False) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=bias), nn.BatchNorm2d(cout), act or nn.ReLU()]


class TinyVGG(nn.Module):
    """A VGG-style chain of the basic CNN ops: Conv, BN, Relu/Clip, pools, GAP/Flatten, Gemm."""

    def __init__(self, widths=(8, 16, 16), classes: int = 10, head: str = "gap"):
        super().__init__()
        a, b, c = widths
        layers = conv_bn(1, a) + conv_bn(a, a, nn.ReLU6()) + [nn.MaxPool2d(2)]
        layers += conv_bn(a, b, bias=True) + [nn.AvgPool2d(2)] + conv_bn(b, c)
        self.features = nn.Sequential(*layers)
        self.head = head
        self.pool = nn.AdaptiveAvgPool2d(1 if head == "gap" else 2)
        self.fc1 = nn.Linear(c * (1 if head == "gap" else 4), 24)
        self.fc2 = nn.Linear(24, classes)

    def forward(self, x):
        x = self.pool(self.features(x))
        x = x.view(x.size(0), -1) if self.head == "view" else torch.flatten(x, 1)
        return self.fc2(torch.relu(self.fc1(x)))


class TinyResidual(nn.Module):
    """One residual block: the Add couples its input and output channels."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(*conv_bn(1, 8))
        self.inner = nn.Sequential(*conv_bn(8, 12), nn.Conv2d(12, 8, 3, padding=1))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.inner(x))
        return self.fc(x.mean(dim=(2, 3)))


class TinyMobile(nn.Module):
    """A MobileNetV3-style inverted residual: depthwise conv, squeeze-excitation gate, shortcut Add."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.Hardswish())
        self.expand = nn.Sequential(nn.Conv2d(8, 24, 1, bias=False), nn.BatchNorm2d(24), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(24, 24, 3, padding=1, groups=24, bias=False), nn.BatchNorm2d(24),
                                nn.Hardswish())
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(24, 8, 1), nn.ReLU(), nn.Conv2d(8, 24, 1),
                                nn.Hardsigmoid())
        self.project = nn.Sequential(nn.Conv2d(24, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.head = nn.Sequential(nn.Conv2d(8, 16, 1), nn.Hardswish(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(16, 10))

    def forward(self, x):
        x = self.stem(x)
        h = self.dw(self.expand(x))
        return self.head(x + self.project(h * self.se(h)))


class TinyGrouped(nn.Module):
    """A ResNeXt bottleneck: 1x1, a grouped 3x3 (4 groups of 4 channels), 1x1, shortcut Add.
    With `split`, the grouped conv reads two convs concatenated (6 + 10 channels), whose
    channels do not line up with its groups."""

    def __init__(self, split: bool = False):
        super().__init__()
        self.split = split
        self.stem = nn.Sequential(*conv_bn(1, 8))
        self.a = nn.Conv2d(8, 6, 1) if split else nn.Sequential(*conv_bn(8, 16))
        self.a2 = nn.Conv2d(8, 10, 1) if split else None
        self.b = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.c = nn.Sequential(nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        h = torch.cat([self.a(x), self.a2(x)], 1) if self.split else self.a(x)
        x = torch.relu(x + self.c(self.b(h)))
        return self.fc(x.mean((2, 3)))


class TinyGroupNorm(nn.Module):
    """GroupNorm where BiT and diffusion U-Nets put it: after a conv, on the branch of a residual
    Add, over a Concat of two convs (8 + 8 channels, groups of 4), and in groups of 8 before the
    classifier. With `straddle`, the Concat is 6 + 10 channels: its convs do not line up with
    the groups."""

    def __init__(self, straddle: bool = False):
        super().__init__()
        self.stem, self.n0 = nn.Conv2d(1, 16, 3, padding=1), nn.GroupNorm(4, 16)
        self.a, self.na = nn.Conv2d(16, 16, 3, padding=1), nn.GroupNorm(4, 16)
        self.b1, self.b2 = nn.Conv2d(16, 6 if straddle else 8, 3, padding=1), nn.Conv2d(16, 10 if straddle else 8, 1)
        self.nb = nn.GroupNorm(4, 16)
        self.head, self.nh = nn.Conv2d(16, 24, 3, padding=1), nn.GroupNorm(3, 24)
        self.fc = nn.Linear(24, 10)
        g = torch.Generator().manual_seed(0)
        for norm in (self.n0, self.na, self.nb, self.nh):  # slicing the wrong channels shows in the outputs
            norm.weight.data.copy_(torch.rand(norm.num_channels, generator=g) + 0.5)
            norm.bias.data.copy_(torch.randn(norm.num_channels, generator=g) * 0.3)

    def forward(self, x):
        s = torch.relu(self.n0(self.stem(x)))
        s = torch.relu(s + self.na(self.a(s)))
        c = torch.relu(self.nb(torch.cat([self.b1(s), self.b2(s)], 1)))
        return self.fc(torch.relu(self.nh(self.head(c))).mean((2, 3)))


class TinyChannelsLast(nn.Module):
    """A ConvNeXt-style MLP: Linear layers on an NHWC tensor export as MatMul + Add."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.mlp = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.mlp(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.fc(x.mean(dim=(2, 3)))


class ChunkBlock(nn.Module):
    """YOLOv8's C2f as written (`cv1(x).chunk(2, 1)`): the dynamo exporter gives Split with
    num_outputs, the TorchScript exporter two Slices of the channel axis."""

    def __init__(self):
        super().__init__()
        self.cv1, self.inner = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.cv2, self.fc = nn.Conv2d(24, 8, 1), nn.Linear(8, 10)

    def forward(self, x):
        a, b = torch.relu(self.cv1(x)).chunk(2, 1)
        y = torch.cat([a, b, b + torch.relu(self.inner(b))], 1)
        return self.fc(torch.relu(self.cv2(y)).mean((2, 3)))


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics, so that slicing them wrongly changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def export(model: nn.Module, path: Path, keep_bn: bool = True, opset: int = 17,
           shape=(1, 1, 16, 16), dtype: torch.dtype = torch.float32, dynamic_size: bool = False) -> Path:
    """torch.onnx.export as a user would; keep_bn keeps BatchNormalization nodes unfused;
    dynamic_size leaves the height and width free, as the batch."""
    kwargs = dict(training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False) if keep_bn else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.randn(*shape, dtype=dtype),), str(path), dynamo=False, opset_version=opset,
                          input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch", **({2: "height", 3: "width"} if dynamic_size else {})},
                                        "logits": {0: "batch"}}, **kwargs)
    return path


def export_dynamo(model: nn.Module, path: Path, shape=(1, 1, 16, 16), dynamic_batch: bool = True,
                  opset: int | None = None) -> Path:
    """torch.onnx.export as recent torch does by default (the dynamo exporter: opset 18+, weights
    in an external .data file beside the model); without dynamic_batch the batch is fixed at
    shape[0] and baked into Reshapes, as an export without dynamic shapes leaves it."""
    dims = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    x = torch.randn(*shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.cat([x, x]) if dynamic_batch else x,), str(path), dynamo=True,
                          input_names=["image"], output_names=["logits"], dynamic_shapes=dims,
                          external_data=True, verbose=False, opset_version=opset)
    return path


def weights_as_constants(src: Path, dst: Path) -> Path:
    """Rewrite every initializer as a Constant node, as some exporters do."""
    import onnx

    proto = onnx.load(str(src))
    consts = [onnx.helper.make_node("Constant", [], [i.name], name=f"const_{i.name}", value=i)
              for i in proto.graph.initializer]
    del proto.graph.initializer[:]
    nodes = consts + list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    onnx.save(proto, str(dst))
    return dst


def initializers_as_inputs(src: Path, dst: Path) -> Path:
    """List every initializer as a graph input too, as IR < 4 exporters had to."""
    import onnx

    proto = onnx.load(str(src))
    for init in proto.graph.initializer:
        proto.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, init.dims))
    onnx.save(proto, str(dst))
    return dst


def make_data(n_per_class: int = 6, classes: int = 10, shape=(1, 16, 16), seed: int = 0):
    """Smooth random images (blurred noise), closer to real inputs than white noise."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_per_class * classes, *shape)).astype(np.float32)
    x = torch.nn.functional.avg_pool2d(torch.from_numpy(x), 3, 1, 1).numpy() * 3
    y = np.repeat(np.arange(classes), n_per_class).astype(np.int64)
    return x, y


@pytest.fixture(scope="session")
def vgg_path(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return export(randomise_bn(TinyVGG()), tmp_path_factory.mktemp("models") / "vgg.onnx")


@pytest.fixture(scope="session")
def npz_path(tmp_path_factory) -> Path:
    x, y = make_data()
    path = tmp_path_factory.mktemp("data") / "shots.npz"
    np.savez(path, x=x, y=y)
    return path
