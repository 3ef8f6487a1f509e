"""Label-free augmentation of the layer statistics: parsing, determinism, the invariance check."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from pipeline import augment
from pipeline.cli import main
from pipeline.convert import run_torch, to_torch
from pipeline.errors import UsageError
from pipeline.load import load_model
from tests.conftest import export


def left_right_data(n: int = 64, seed: int = 0):
    """16x16 images with one bright bar in the left or the right half; the label is the side."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 1, 16, 16)).astype(np.float32) * 0.1
    y = rng.integers(0, 2, n)
    for i, side in enumerate(y):
        col = rng.integers(1, 6) + (9 if side else 0)
        x[i, 0, 3:13, col] += 2.0
    return x, y.astype(np.int64)


@pytest.fixture(scope="module")
def left_right_model(tmp_path_factory):
    """A small CNN trained to tell left from right: its answer flips when the image does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 16 * 16, 2))
    x, y = left_right_data(256)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        opt.step()
    assert (model(torch.from_numpy(x)).argmax(1).numpy() == y).mean() > 0.95
    return export(model.eval(), tmp_path_factory.mktemp("lr") / "leftright.onnx", keep_bn=False)


def teacher_of(path):
    twin = to_torch(load_model(path).proto)
    return lambda x: run_torch(twin, x)[0]


def test_flip_is_rejected_for_a_left_right_classifier(left_right_model):
    x, _ = left_right_data(20, seed=1)
    aug = augment.build("flip,shift:1", 4, 0, x, teacher_of(left_right_model))
    checks = {c.transform.name: c for c in aug.checks}
    assert not checks["flip"].kept and "changes its answer" in checks["flip"].reason
    assert checks["shift"].kept
    assert [t.name for t in aug.transforms] == ["shift"]


def test_rejection_is_in_the_report(left_right_model, tmp_path):
    x, y = left_right_data(20, seed=2)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    res = CliRunner().invoke(main, ["compress", str(left_right_model), "--data", str(tmp_path / "d.npz"),
                                    "--shots", "4", "-o", str(tmp_path / "s.onnx"), "--no-bench", "--json"])
    assert res.exit_code == 0, res.output
    checks = {c["transform"]: c for c in json.loads(res.stdout)["augmentation"]["checks"]}
    assert checks["flip"]["kept"] is False and checks["shift"]["kept"] is True


def test_non_image_inputs_get_no_geometric_transforms(tmp_path):
    torch.manual_seed(0)
    path = export(nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3)), tmp_path / "mlp.onnx",
                  keep_bn=False, shape=(1, 32))
    x = np.random.default_rng(0).standard_normal((12, 32)).astype(np.float32)
    aug = augment.build("flip,shift:2,noise:0.02,mixup:0.1,cutmix", 4, 0, x, teacher_of(path))
    assert [t.name for t in aug.transforms] == ["noise", "mixup"]
    assert all(c.reason == "input is not an NCHW image" for c in aug.checks
               if c.transform.name in ("flip", "shift", "cutmix"))


def test_a_blend_is_kept_when_the_teacher_answers_like_one_of_its_two_shots(left_right_model):
    """Half a left bar over half a right bar is still left or right: mixup is kept, though the
    answer differs from the first shot's on most of the cross-side blends."""
    x, y = left_right_data(20, seed=3)
    left, right = np.flatnonzero(y == 0), np.flatnonzero(y == 1)
    n = min(len(left), len(right))
    x = x[np.stack([left[:n], right[:n]], 1).ravel()]  # left, right, left, ...: neighbours from opposite sides
    teacher = teacher_of(left_right_model)
    base = teacher(x).argmax(1)
    blended = teacher(augment.apply(x, augment.parse("mixup:0.5"), np.random.default_rng(0), always=True)).argmax(1)
    assert np.mean(blended == base) < augment.MIN_AGREEMENT  # the plain invariance check would drop it
    aug = augment.build("mixup:0.5,cutmix:0.5", 4, 0, x, teacher)
    assert [t.name for t in aug.transforms] == ["mixup", "cutmix"], [c.reason for c in aug.checks]


def test_a_blend_is_dropped_when_the_teacher_answers_neither(tmp_path):
    """Three classes along one direction (-1, 0, +1): a half-half blend of -1 and +1 reads as 0."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    centre = rng.integers(-1, 2, 300)
    x = (centre[:, None] + 0.1 * rng.standard_normal((300, 8))).astype(np.float32)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(centre + 1)).backward()
        opt.step()
    path = export(model.eval(), tmp_path / "line.onnx", keep_bn=False, shape=(1, 8))
    shots = np.stack([np.full(8, (-1.0) ** i, np.float32) for i in range(10)])  # +1, -1, +1, ...
    aug = augment.build("noise:0.02,mixup:0.5", 4, 0, shots, teacher_of(path))
    checks = {c.transform.name: c for c in aug.checks}
    assert [t.name for t in aug.transforms] == ["noise"]
    assert not checks["mixup"].kept and "like neither shot" in checks["mixup"].reason


def test_cli_default_is_the_module_default():
    spec = next(p for p in main.commands["compress"].params if p.name == "augment").default
    assert spec == augment.DEFAULT_SPEC


def test_variants_are_deterministic_and_start_with_the_shots():
    aug = augment.Augmenter(augment.parse("flip,shift:2,scale:0.1,noise:0.05,mixup:0.2,cutmix:0.3"), 4, seed=7)
    x = np.random.default_rng(0).standard_normal((6, 1, 16, 16)).astype(np.float32)
    first, second = list(aug.variants(x, 3)), list(aug.variants(x, 3))
    assert len(first) == 4 and first[0] is x
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert not np.array_equal(first[1], first[2])
    assert not np.array_equal(first[1], list(aug.variants(x, 4))[1])  # other chunk, other draw
    assert all(v.shape == x.shape and v.dtype == x.dtype for v in first)


def test_parse_errors():
    assert augment.parse("none") == []
    assert augment.parse("shift:3")[0].amount == 3
    with pytest.raises(UsageError, match="unknown transform 'rotate'"):
        augment.parse("rotate")
    with pytest.raises(UsageError, match="needs a number"):
        augment.parse("shift:far")
    for spec in ("mixup:0.9", "cutmix:0.6", "noise:-1"):
        with pytest.raises(UsageError, match="out of range"):
            augment.parse(spec)


@pytest.mark.parametrize("args,message", [(["--augment", "rotate"], "unknown transform"),
                                          (["--augment-factor", "0"], "--augment-factor")])
def test_bad_augment_options(vgg_path, npz_path, tmp_path, args, message):
    res = CliRunner().invoke(main, ["compress", str(vgg_path), "--data", str(npz_path), "--shots", "2",
                                    "-o", str(tmp_path / "s.onnx"), "--no-bench", *args])
    assert res.exit_code == 2 and message in res.output


def test_channels_last_images_are_transformed_as_images():
    x = left_right_data(8)[0].repeat(3, axis=1)  # NCHW, 3 channels
    transforms = augment.parse("flip,shift:2,scale:0.1,cutmix:0.5,mixup:0.5")
    nchw = augment.apply(x, transforms, np.random.default_rng(0))
    nhwc = augment.apply(x.transpose(0, 2, 3, 1), transforms, np.random.default_rng(0), layout="NHWC")
    assert np.array_equal(nhwc, nchw.transpose(0, 2, 3, 1)) and not np.array_equal(nchw, x)
    assert augment.is_image(x.transpose(0, 2, 3, 1), "NHWC") and not augment.is_image(x.transpose(0, 2, 3, 1))
