"""Architectures for the zoo test and benchmark: torchvision's definitions plus two written here,
and three transformers (a ViT-B/16-shaped torchvision model, a BERT-style encoder and a ViT from
transformers configs) with an exporter of sequences or images.

Weights are random (structure is what the channel analysis sees) with BatchNorm statistics
randomised, so that slicing the wrong channel shows in the outputs.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torchvision.models as tvm


def _cbs(cin: int, cout: int, k: int = 3, s: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout), nn.SiLU())


class UNet(nn.Module):
    """Two-level U-Net: skip concatenations, ConvTranspose upsampling, a per-pixel head."""

    def __init__(self, cin: int = 3, width: int = 16, classes: int = 4):
        super().__init__()
        w = width
        self.enc1 = nn.Sequential(_cbs(cin, w), _cbs(w, w))
        self.enc2 = nn.Sequential(_cbs(w, 2 * w), _cbs(2 * w, 2 * w))
        self.mid = nn.Sequential(_cbs(2 * w, 4 * w), _cbs(4 * w, 4 * w))
        self.up2 = nn.ConvTranspose2d(4 * w, 2 * w, 2, 2)
        self.dec2 = nn.Sequential(_cbs(4 * w, 2 * w), _cbs(2 * w, 2 * w))
        self.up1 = nn.ConvTranspose2d(2 * w, w, 2, 2)
        self.dec1 = nn.Sequential(_cbs(2 * w, w), _cbs(w, w))
        self.head = nn.Conv2d(w, classes, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(nn.functional.max_pool2d(e1, 2))
        m = self.mid(nn.functional.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        return self.head(d1)


class C2f(nn.Module):
    """YOLOv8-style bottleneck stack: Split on channels, bottlenecks (residual in the backbone), Concat."""

    def __init__(self, cin: int, cout: int, n: int = 1, shortcut: bool = True):
        super().__init__()
        self.c, self.shortcut = cout // 2, shortcut
        self.cv1 = _cbs(cin, 2 * self.c, 1)
        self.m = nn.ModuleList(nn.Sequential(_cbs(self.c, self.c), _cbs(self.c, self.c)) for _ in range(n))
        self.cv2 = _cbs((2 + n) * self.c, cout, 1)

    def forward(self, x):
        y = list(self.cv1(x).split((self.c, self.c), 1))
        for m in self.m:
            y.append(y[-1] + m(y[-1]) if self.shortcut else m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.cv1 = _cbs(c, c // 2, 1)
        self.cv2 = _cbs(c * 2, c, 1)
        self.pool = nn.MaxPool2d(5, 1, 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.pool(x)
        y2 = self.pool(y1)
        return self.cv2(torch.cat([x, y1, y2, self.pool(y2)], 1))


class YoloBlock(nn.Module):
    """A YOLO-style detector: C2f stages, SPPF, Resize upsampling and a decoded head with Reshape."""

    def __init__(self, classes: int = 4, w: int = 16):
        super().__init__()
        self.stem = nn.Sequential(_cbs(3, w, 3, 2), _cbs(w, 2 * w, 3, 2), C2f(2 * w, 2 * w))
        self.down = nn.Sequential(_cbs(2 * w, 4 * w, 3, 2), C2f(4 * w, 4 * w), SPPF(4 * w))
        self.fuse = C2f(6 * w, 2 * w)
        self.head = nn.Conv2d(2 * w, 4 + classes, 1)
        self.outputs = 4 + classes

    def forward(self, x):
        p3 = self.stem(x)
        p4 = self.down(p3)
        up = nn.functional.interpolate(p4, scale_factor=2.0, mode="nearest")
        y = self.head(self.fuse(torch.cat([up, p3], 1)))
        b = y.shape[0]
        y = y.reshape(b, self.outputs, -1)  # (batch, 4 + classes, anchors)
        box, cls = y.split([4, self.outputs - 4], 1)
        return torch.cat([box * 2.0, cls.sigmoid()], 1)


class YoloV8n(nn.Module):
    """A YOLOv8n-class detector (widths 16-256, C2f depths 1-2-2-1, SPPF, a PAN neck over three
    scales and a decoupled head whose boxes and class scores are decoded and concatenated into
    (batch, 4 + classes, anchors)); about 4.4 GFLOPs per 320x320 image, as YOLOv8n at that size."""

    def __init__(self, classes: int = 80):
        super().__init__()
        self.p3 = nn.Sequential(_cbs(3, 16, 3, 2), _cbs(16, 32, 3, 2), C2f(32, 32, 1), _cbs(32, 64, 3, 2), C2f(64, 64, 2))
        self.p4 = nn.Sequential(_cbs(64, 128, 3, 2), C2f(128, 128, 2))
        self.p5 = nn.Sequential(_cbs(128, 256, 3, 2), C2f(256, 256, 1), SPPF(256))
        self.up4, self.up3 = C2f(384, 128, 1, False), C2f(192, 64, 1, False)
        self.down4, self.out4 = _cbs(64, 64, 3, 2), C2f(192, 128, 1, False)
        self.down5, self.out5 = _cbs(128, 128, 3, 2), C2f(384, 256, 1, False)
        self.box = nn.ModuleList(nn.Sequential(_cbs(c, 64), _cbs(64, 64), nn.Conv2d(64, 4, 1)) for c in (64, 128, 256))
        self.cls = nn.ModuleList(nn.Sequential(_cbs(c, 80), _cbs(80, 80), nn.Conv2d(80, classes, 1))
                                 for c in (64, 128, 256))
        self.classes = classes

    def forward(self, x):
        p3 = self.p3(x)
        p4 = self.p4(p3)
        p5 = self.p5(p4)
        up = lambda t: nn.functional.interpolate(t, scale_factor=2.0, mode="nearest")  # noqa: E731
        n4 = self.up4(torch.cat([up(p5), p4], 1))
        n3 = self.up3(torch.cat([up(n4), p3], 1))
        n4 = self.out4(torch.cat([self.down4(n3), n4], 1))
        n5 = self.out5(torch.cat([self.down5(n4), p5], 1))
        outs = []
        for feature, box, cls, stride in zip((n3, n4, n5), self.box, self.cls, (8.0, 16.0, 32.0)):
            b = feature.shape[0]
            outs.append(torch.cat([box(feature).reshape(b, 4, -1) * stride,
                                   cls(feature).reshape(b, self.classes, -1).sigmoid()], 1))
        return torch.cat(outs, 2)


ZOO: dict[str, Callable[[], nn.Module]] = {
    "resnet18": lambda: tvm.resnet18(num_classes=10),
    "resnet50": lambda: tvm.resnet50(num_classes=10),
    "mobilenet_v2": lambda: tvm.mobilenet_v2(num_classes=10),
    "mobilenet_v3_small": lambda: tvm.mobilenet_v3_small(num_classes=10),
    "efficientnet_b0": lambda: tvm.efficientnet_b0(num_classes=10),
    "shufflenet_v2": lambda: tvm.shufflenet_v2_x0_5(num_classes=10),
    "densenet121": lambda: tvm.densenet121(num_classes=10),
    "regnet_x_400mf": lambda: tvm.regnet_x_400mf(num_classes=10),
    "resnext50": lambda: tvm.resnext50_32x4d(num_classes=10),
    "googlenet": lambda: tvm.googlenet(num_classes=10, aux_logits=False, init_weights=False),
    "convnext_tiny": lambda: tvm.convnext_tiny(num_classes=10),
    "unet": UNet,
    "yolo_block": YoloBlock,
    "yolov8n": YoloV8n,
}


def export_zoo(name: str, path, opset: int | None = 17, size: int = 64):
    """torch.onnx.export of the architecture as a user would, with a dynamic batch axis: the
    TorchScript exporter at `opset`, or with opset None the dynamo exporter (torch's default
    since 2.9) at its own opset, weights in an external file."""
    import warnings

    from tests.conftest import export_dynamo

    if opset is None:
        return export_dynamo(build(name), path, (1, 3, size, size))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(build(name), (torch.randn(1, 3, size, size),), str(path), dynamo=False,
                          opset_version=opset, input_names=["image"], output_names=["out"],
                          dynamic_axes={"image": {0: "batch"}, "out": {0: "batch"}})
    return path


def build(name: str, seed: int = 0) -> nn.Module:
    """The architecture with seeded random weights and randomised BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = ZOO[name]()
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


TOKENS = 16  # the BERT-style encoder's samples; its sequence axis stays free in the export


def vit_b16_shaped() -> nn.Module:
    """ViT-B/16's blocks (width 768, 12 heads of 64, MLP 3072), two of them, on 32x32 images
    (4 patches and the class token); the classifier drawn at random (torchvision zeroes it)."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=12, hidden_dim=768,
                              mlp_dim=3072, num_classes=10)
    nn.init.normal_(model.heads.head.weight, std=0.05)
    return model.eval()


HF_MODELS = {  # name -> (config class, model class, config, the forward's argument); weights drawn, not downloaded
    "bert": ("BertConfig", "BertForSequenceClassification",  # 2 blocks of width 256, 4 heads of 64, FFN 1024
             dict(vocab_size=1000, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=1024, max_position_embeddings=64, num_labels=3), "input_ids"),
    "hf_vit": ("ViTConfig", "ViTForImageClassification",  # 32x32 in 8x8 patches, 2 blocks of 192, 3 heads of 64
               dict(image_size=32, patch_size=8, hidden_size=192, num_hidden_layers=2, num_attention_heads=3,
                    intermediate_size=384, num_labels=10), "pixel_values"),
}


class HFClassifier(nn.Module):
    """A transformers classifier of HF_MODELS built from its config: one input in, logits out."""

    def __init__(self, name: str):
        super().__init__()
        import transformers

        config, model, kwargs, self.argument = HF_MODELS[name]
        torch.manual_seed(0)
        self.net = getattr(transformers, model)(getattr(transformers, config)(**kwargs)).eval()

    def forward(self, x):
        return self.net(**{self.argument: x}).logits


# name -> (builder, example input, input name, whether the second axis is a free sequence length)
TRANSFORMERS: dict[str, tuple[Callable[[], nn.Module], Callable[[], torch.Tensor], str, bool]] = {
    "vit_b16_shaped": (vit_b16_shaped, lambda: torch.randn(2, 3, 32, 32), "image", False),
    "bert": (lambda: HFClassifier("bert"), lambda: torch.randint(0, 1000, (2, TOKENS)), "input_ids", True),
    "hf_vit": (lambda: HFClassifier("hf_vit"), lambda: torch.randn(2, 3, 32, 32), "pixel_values", False),
}


def export_sequence(model: nn.Module, x: torch.Tensor, path, opset: int | None, name: str,
                    free_tokens: bool = False, outputs: tuple[str, ...] = ("logits",)):
    """torch.onnx.export with the batch (and with free_tokens the sequence axis) free: TorchScript
    at `opset`, or dynamo with opset None."""
    import warnings

    axes = {0: "batch", 1: "sequence"} if free_tokens else {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if opset is None:
            dims = ({k: torch.export.Dim(v, min=2, max=64) for k, v in axes.items()},)
            torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=[name], output_names=list(outputs),
                              dynamic_shapes=dims, external_data=True, verbose=False)
        else:
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset, input_names=[name],
                              output_names=list(outputs),
                              dynamic_axes={name: axes, **{o: {0: "batch"} for o in outputs}})
    return path


def export_transformer(name: str, path, opset: int | None):
    build, example, input_name, free = TRANSFORMERS[name]
    return export_sequence(build(), example(), path, opset, input_name, free)
