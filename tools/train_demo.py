"""One-time training of the embedded demo teacher and its assets (Fashion-MNIST, fixed seed).

    python tools/train_demo.py --epochs 6

Writes pipeline/assets/: demo_vgg.onnx (BatchNormalization kept as its own nodes),
demo_vgg.preprocess.json, demo_shots/ (10 training PNGs per class) and demo_eval.npz
(held-out test images, preprocessed). The test split is used for evaluation only.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fmnist  # noqa: E402


def vgg_small(classes: int = 10) -> nn.Module:
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    layers = block(1, 32) + block(32, 32) + [nn.MaxPool2d(2)] + block(32, 64) + block(64, 64)
    layers += [nn.MaxPool2d(2)] + block(64, 128) + block(128, 128)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, classes))


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and shifts of up to 2 pixels."""
    flip = torch.rand(len(x), generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    padded = nn.functional.pad(x, (2, 2, 2, 2), value=float(-fmnist.MEAN / fmnist.STD))
    dx, dy = torch.randint(0, 5, (2,), generator=gen).tolist()
    return padded[:, :, dy:dy + 28, dx:dx + 28]


def train(epochs: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    torch.set_num_threads(2)
    x_img, y = fmnist.load("train")
    x = torch.from_numpy(fmnist.normalise(x_img))
    y = torch.from_numpy(y)
    model = vgg_small()
    steps = epochs * (len(x) // 128)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps, pct_start=0.2)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        start, correct = time.time(), 0
        for i in range(len(x) // 128):
            idx = order[i * 128:(i + 1) * 128]
            xb = augment(x[idx], gen)
            out = model(xb)
            loss = nn.functional.cross_entropy(out, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            correct += int((out.argmax(1) == y[idx]).sum())
        print(f"epoch {epoch + 1}/{epochs}: train acc {correct / (len(x) // 128 * 128):.4f}, "
              f"{time.time() - start:.0f} s", flush=True)
    return model.eval()


def export(model: nn.Module, path: Path) -> None:
    """ONNX with BatchNormalization kept: PRESERVE on an eval-mode model exports inference BN."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert any(n.op_type == "BatchNormalization" for n in proto.graph.node)


def write_assets(out: Path, seed: int, eval_count: int) -> None:
    (out / "demo_vgg.preprocess.json").write_text(json.dumps(
        {"size": [28, 28], "channels": "gray", "scale": 255.0, "mean": [fmnist.MEAN], "std": [fmnist.STD],
         "layout": "NCHW"}, indent=2) + "\n")
    x_train, y_train = fmnist.load("train")
    shots = out / "demo_shots"
    for idx in fmnist.balanced_subset(y_train, 10, seed):
        folder = shots / f"{y_train[idx]}_{fmnist.CLASSES[y_train[idx]]}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x_train[idx]).save(folder / f"{idx:08d}.png")
    x_test, y_test = fmnist.load("t10k")
    pick = fmnist.balanced_subset(y_test, eval_count // 10, seed)
    np.savez_compressed(out / "demo_eval.npz", x=fmnist.normalise(x_test[pick]), y=y_test[pick])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-count", type=int, default=5000, help="held-out test images shipped")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "pipeline" / "assets")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = train(args.epochs, args.seed)
    export(model, args.out / "demo_vgg.onnx")
    write_assets(args.out, args.seed, args.eval_count)
    x_test, y_test = fmnist.load("t10k")
    with torch.no_grad():
        acc = float((model(torch.from_numpy(fmnist.normalise(x_test))).argmax(1).numpy() == y_test).mean())
    print(f"test accuracy (all 10,000): {acc:.4f}")


if __name__ == "__main__":
    main()
