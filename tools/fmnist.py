"""Fashion-MNIST from the Debian package `dataset-fashion-mnist` (IDX files, MIT licence)."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("tshirt-top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
           "ankle-boot")
MEAN, STD = 0.2860, 0.3530  # of the 60,000 training images, pixels scaled to [0, 1]
BACKGROUND = -MEAN / STD  # a black pixel after normalisation


def load(split: str, root: Path = DEFAULT_ROOT) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 28, 28) and int64 labels of the 'train' or 't10k' split."""
    images = root / f"{split}-images-idx3-ubyte.gz"
    labels = root / f"{split}-labels-idx1-ubyte.gz"
    if not images.is_file() or not labels.is_file():
        raise SystemExit(f"{root}: Fashion-MNIST not found; run `apt-get install dataset-fashion-mnist`")
    with gzip.open(images) as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(labels) as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int64)
    return x, y


def normalise(images: np.ndarray, pad: int = 0, upsample: int = 1) -> np.ndarray:
    """uint8 (N, 28, 28) -> float32 NCHW; `pad` black pixels on each side (32x32 for CIFAR-style nets),
    then every pixel repeated `upsample` times along both axes (64x64 for ImageNet-style stems,
    which divide the input by 32)."""
    x = ((images.astype(np.float32) / 255.0 - MEAN) / STD)[:, None]
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=BACKGROUND) if pad else x
    return x.repeat(upsample, 2).repeat(upsample, 3) if upsample > 1 else x


def balanced_subset(labels: np.ndarray, per_class: int, seed: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """Sorted indices of `per_class` samples of every class, drawn with `seed`."""
    rng = np.random.default_rng(seed)
    allowed = np.ones(len(labels), bool)
    if exclude is not None:
        allowed[exclude] = False
    picks = [rng.choice(np.flatnonzero((labels == c) & allowed), per_class, replace=False)
             for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))
