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
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fmnist  # noqa: E402
import training  # noqa: E402


def vgg_small(classes: int = 10) -> nn.Module:
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    layers = block(1, 32) + block(32, 32) + [nn.MaxPool2d(2)] + block(32, 64) + block(64, 64)
    layers += [nn.MaxPool2d(2)] + block(64, 128) + block(128, 128)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, classes))


def train(epochs: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    torch.set_num_threads(2)
    x_img, y = fmnist.load("train")
    return training.fit(vgg_small(), torch.from_numpy(fmnist.normalise(x_img)), torch.from_numpy(y),
                        epochs=epochs, seed=seed, background=fmnist.BACKGROUND)


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
    training.export(model, (1, 28, 28), args.out / "demo_vgg.onnx")
    write_assets(args.out, args.seed, args.eval_count)
    x_test, y_test = fmnist.load("t10k")
    with torch.no_grad():
        acc = float((model(torch.from_numpy(fmnist.normalise(x_test))).argmax(1).numpy() == y_test).mean())
    print(f"test accuracy (all 10,000): {acc:.4f}")


if __name__ == "__main__":
    main()
