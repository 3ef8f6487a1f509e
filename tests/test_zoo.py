"""The zoo: real architectures exported by torch.onnx.export, at opsets 13 and 17 and by the
dynamo exporter (opset 18+, external weights).

CI runs the quicker half; CROSSPRUNE_ZOO=all runs every architecture (tools/bench_zoo.py
times them all and writes the table).
"""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from pipeline import CompressOptions, PruneConfig, compress
from pipeline.cli import main
from pipeline.load import signature
from tests.conftest import initializers_as_inputs, weights_as_constants
from tests.zoo import ZOO, export_zoo

QUICK = ["mobilenet_v2", "mobilenet_v3_small", "shufflenet_v2", "regnet_x_400mf", "unet", "yolo_block"]
NAMES = list(ZOO) if os.environ.get("CROSSPRUNE_ZOO") == "all" else QUICK


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    x = np.random.default_rng(0).standard_normal((8, 3, 64, 64)).astype(np.float32)
    path = tmp_path_factory.mktemp("zoo") / "images.npz"
    np.savez(path, x=torch.nn.functional.avg_pool2d(torch.from_numpy(x), 3, 1, 1).numpy() * 2)
    return path


def _compress(path, images, out):
    options = CompressOptions(data=images, samples=8, providers=[], augment="none",
                              prune=PruneConfig(ratio=0.3, scope="all"))
    return compress(path, options, out).report


@pytest.mark.parametrize("opset", [13, 17, None], ids=["opset13", "opset17", "dynamo"])
@pytest.mark.parametrize("name", NAMES)
def test_zoo_model_compresses_to_a_drop_in(name, opset, images, tmp_path):
    path = export_zoo(name, tmp_path / f"{name}.onnx", opset)
    listing = CliRunner().invoke(main, ["inspect", str(path), "--json"])
    assert listing.exit_code == 0, listing.output
    groups = json.loads(listing.output)["groups"]
    assert any(g["prunable"] for g in groups)
    out = tmp_path / "slim.onnx"
    report = _compress(path, images, out)
    assert report["parity"]["slim_vs_masked_student"] < 1e-4
    assert report["totals"]["flops_after"] < report["totals"]["flops_before"]
    original, slim = onnx.load(str(path)), onnx.load(str(out))
    assert signature(slim) == signature(original)
    assert slim.opset_import == original.opset_import
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.load(images)["x"][:3]
    assert session.run(None, {"image": x})[0].shape == ort.InferenceSession(
        str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0].shape


@pytest.mark.parametrize("rewrite", [weights_as_constants, initializers_as_inputs])
def test_other_exporters_weight_styles_compress_the_same(rewrite, images, tmp_path):
    path = export_zoo("mobilenet_v3_small", tmp_path / "m.onnx", 13)
    plain = _compress(path, images, tmp_path / "a.onnx")
    other = _compress(rewrite(path, tmp_path / "rewritten.onnx"), images, tmp_path / "b.onnx")
    kept = [[None if g["kept"] is None else g["kept"].tolist() for g in r["groups"]] for r in (plain, other)]
    assert kept[0] == kept[1] and any(k is not None for k in kept[0])
    assert other["totals"]["flops_after"] == plain["totals"]["flops_after"]
