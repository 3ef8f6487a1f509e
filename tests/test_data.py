"""Few-shot data: image folders and npz, labeled and unlabeled, and every way they can be wrong."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pipeline.data import Preprocess, draw_shots, load_samples, preprocess_for
from pipeline.errors import DataError
from pipeline.load import IOSpec

SPEC = IOSpec("image", 1, ("batch", 1, 16, 16))
GRAY = Preprocess(size=(16, 16), channels="gray", scale=255.0, mean=(0.5,), std=(0.25,))


def write_folder(root, classes=("0_cat", "1_dog", "2_fox"), per=4, size=(20, 18)):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per):
            Image.fromarray(rng.integers(0, 256, size[::-1], dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_labeled_folder_is_resized_and_normalised(tmp_path):
    s = load_samples(write_folder(tmp_path / "d"), SPEC, GRAY)
    assert s.x.shape == (12, 1, 16, 16) and s.x.dtype == np.float32
    assert s.y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert -2.1 < s.x.min() and s.x.max() < 2.1  # (p/255 - 0.5)/0.25 lies in [-2, 2]


def test_folder_labels_follow_leading_integers_not_sort_order(tmp_path):
    s = load_samples(write_folder(tmp_path / "d", classes=("10_z", "2_a")), SPEC, GRAY)
    assert sorted(set(s.y.tolist())) == [2, 10]


def test_unlabeled_flat_folder(tmp_path):
    root = write_folder(tmp_path / "d", classes=("only",))
    s = load_samples(root / "only", SPEC, GRAY)
    assert s.y is None and len(s) == 4


def test_npz_labeled_and_unlabeled(tmp_path):
    x = np.zeros((5, 1, 16, 16), np.float32)
    np.savez(tmp_path / "a.npz", x=x, y=np.arange(5))
    np.savez(tmp_path / "b.npz", x=x)
    assert load_samples(tmp_path / "a.npz", SPEC, GRAY).y.tolist() == list(range(5))
    assert load_samples(tmp_path / "b.npz", SPEC, GRAY).y is None


def test_shots_per_class_are_deterministic_and_balanced(tmp_path):
    s = load_samples(write_folder(tmp_path / "d", per=6), SPEC, GRAY)
    a = draw_shots(s, shots=2, count=None, seed=3)
    b = draw_shots(s, shots=2, count=None, seed=3)
    c = draw_shots(s, shots=2, count=None, seed=4)
    assert np.array_equal(a.calib.x, b.calib.x) and not np.array_equal(a.calib.x, c.calib.x)
    assert np.bincount(a.calib.y).tolist() == [2, 2, 2] and len(a.holdout) == 12


def test_unlabeled_samples_count(tmp_path):
    x = np.random.default_rng(0).standard_normal((30, 1, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "u.npz", x=x)
    few = draw_shots(load_samples(tmp_path / "u.npz", SPEC, GRAY), shots=None, count=12, seed=0)
    assert len(few.calib) == 12 and len(few.holdout) == 18


def test_preprocess_json_beside_model_then_options(tmp_path):
    model = tmp_path / "m.onnx"
    (tmp_path / "m.preprocess.json").write_text(json.dumps({"mean": [0.3], "std": [0.2], "size": [16, 16]}))
    pre, notes = preprocess_for(model, SPEC, std=[0.5])
    assert pre.mean == (0.3,) and pre.std == (0.5,) and pre.channels == "gray" and notes


@pytest.mark.parametrize("case,message", [
    ("missing", "no such file"),
    ("empty_dir", "no images"),
    ("empty_class", "class folder holds no images"),
    ("bad_image", "unreadable image"),
    ("wrong_shape", "expects 1x16x16"),
    ("nan", "NaN or Inf"),
    ("int_npz", "expected preprocessed floats"),
    ("no_x", "no array 'x'"),
    ("bad_y", "y must be integer labels"),
])
def test_bad_data_is_a_clear_error(tmp_path, case, message):
    path = tmp_path / "data.npz"
    if case == "missing":
        path = tmp_path / "nope"
    elif case == "empty_dir":
        path = tmp_path / "empty"
        path.mkdir()
    elif case == "empty_class":
        path = write_folder(tmp_path / "d")
        (path / "3_empty").mkdir()
    elif case == "bad_image":
        path = write_folder(tmp_path / "d")
        (path / "0_cat" / "broken.png").write_bytes(b"not a png")
    elif case == "wrong_shape":
        np.savez(path, x=np.zeros((2, 3, 16, 16), np.float32))
    elif case == "nan":
        x = np.zeros((2, 1, 16, 16), np.float32)
        x[1, 0, 0, 0] = np.nan
        np.savez(path, x=x)
    elif case == "int_npz":
        np.savez(path, x=np.zeros((2, 1, 16, 16), np.uint8))
    elif case == "no_x":
        np.savez(path, images=np.zeros((2, 1, 16, 16), np.float32))
    elif case == "bad_y":
        np.savez(path, x=np.zeros((2, 1, 16, 16), np.float32), y=np.array([0.5, 1.5]))
    with pytest.raises(DataError, match=message):
        load_samples(path, SPEC, GRAY)


def test_too_few_samples_for_shots(tmp_path):
    root = write_folder(tmp_path / "d", per=6)
    for f in sorted((root / "1_dog").iterdir())[:4]:
        f.unlink()
    s = load_samples(root, SPEC, GRAY)
    with pytest.raises(DataError, match="class '1_dog' has 2 samples, fewer than --shots 5"):
        draw_shots(s, shots=5, count=None, seed=0)


def test_shots_need_labels(tmp_path):
    np.savez(tmp_path / "u.npz", x=np.zeros((4, 1, 16, 16), np.float32))
    with pytest.raises(DataError, match="--shots needs labels"):
        draw_shots(load_samples(tmp_path / "u.npz", SPEC, GRAY), shots=1, count=None, seed=0)


def test_pickled_npz_is_refused(tmp_path):
    np.savez(tmp_path / "p.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match="unreadable"):
        load_samples(tmp_path / "p.npz", SPEC, GRAY)
