"""INT8 after pruning: a drop-in QDQ model, and layers that quantize badly kept in float."""
from __future__ import annotations

import json

import onnx
from onnx import numpy_helper
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from pipeline import render
from pipeline.cli import main
from pipeline.load import signature
from pipeline.quantize import QuantConfig, quantize
from tests.conftest import export, make_data


def outlier_model() -> nn.Module:
    """Conv 2 makes one channel of huge activations that conv 3 reads: conv 3's input range is ruined."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                      nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    with torch.no_grad():
        m[2].weight[0].zero_()
        m[2].bias[0] = 1000.0
        m[4].weight[:, 0] = 1e-4
    return m.eval()


def test_outlier_layer_stays_float_and_error_holds(tmp_path):
    path = export(outlier_model(), tmp_path / "outlier.onnx", keep_bn=False)
    x, _ = make_data(6)
    result = quantize(path.read_bytes(), x[:30], x[30:], QuantConfig(max_error=0.05, speed_provider=None))
    assert result.sensitivity["/4/Conv"] > 0.5  # quantizing the reader of the outliers alone ruins the output
    assert "/4/Conv" in result.kept_float and "/0/Conv" not in result.kept_float
    assert result.error <= 0.05
    ops = [n.op_type for n in onnx.load_from_string(result.model).graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops


def test_a_model_that_quantizes_well_keeps_every_layer_int8(vgg_path):
    x, _ = make_data(6)
    result = quantize(vgg_path.read_bytes(), x[:30], x[30:], QuantConfig(max_error=0.5, speed_provider=None))
    assert result.kept_float == [] and result.sensitivity == {}


def test_shallow_layers_stay_float_only_where_measured_faster(vgg_path):
    """Which layers win is up to the machine; that the decisions follow the timings is not."""
    x, _ = make_data(6)
    result = quantize(vgg_path.read_bytes(), x[:30], x[30:], QuantConfig(max_error=0.5, speed_batch=8))
    trials = result.speed_trials
    assert trials and trials[0]["layer"] == "/features/features.0/Conv"  # the stem conv over 1 channel: 9 multiply-adds per output
    assert all(t["layer"] != "/features/features.3/Conv" for t in trials)  # 8 channels x 3x3 = 72: deep enough to stay int8
    for t in trials:
        assert t["kept_float"] == (t["float_ms"] < 0.95 * t["int8_ms"])
    assert all(t["kept_float"] for t in trials[:-1])  # the first layer float does not help ends the search
    float_layers = {n.name for n in onnx.load_from_string(result.model).graph.node if n.op_type in ("Conv", "Gemm")
                   and "DequantizeLinear" not in n.input[1]}
    assert result.float_for_speed == result.kept_float
    assert {t["layer"] for t in trials if t["kept_float"]} <= float_layers


@pytest.mark.parametrize("activations", ["auto", "uint8", "int8"])
def test_compress_with_int8_is_a_drop_in(vgg_path, npz_path, tmp_path, activations):
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    res = CliRunner().invoke(main, ["compress", str(vgg_path), "--data", str(npz_path), "--shots", "3", "-o", str(out),
                                    "--report", str(report), "--quantize", "int8", "--quant-activations", activations,
                                    "--no-quant-speed-check",
                                    "--runs", "3", "--batch", "2", "--quiet"])
    assert res.exit_code == 0, res.output
    q = onnx.load(str(out))
    assert signature(q) == signature(onnx.load(str(vgg_path)))
    assert any(n.op_type == "QuantizeLinear" for n in q.graph.node)
    rep = json.loads(report.read_text())
    assert [c["model"] for c in rep["chain"]] == ["teacher", "slim", "slim-int8"]
    int8_convs = [i for i in q.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4]
    assert len(int8_convs) == 4  # every conv's weights stored as int8
    assert {t["model"] for t in rep["latency"]["timings"]} == {"teacher", "slim", "slim-int8"}
    assert rep["quantization"]["relative_error_vs_float"] <= 0.05
    used = "uint8" if activations == "auto" else activations  # auto on the CPU provider
    assert rep["quantization"]["activations"] == used
    assert {_zero_point_type(q, n) for n in q.graph.node if n.op_type == "QuantizeLinear"} == {used}


def _zero_point_type(model: onnx.ModelProto, node: onnx.NodeProto) -> str:
    zp = next(i for i in model.graph.initializer if i.name == node.input[2])
    return {onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.INT8: "int8"}[zp.data_type]


def test_activations_follow_the_provider_the_model_is_meant_for(vgg_path, npz_path, tmp_path):
    assert QuantConfig().for_provider("cpu:1").activations == "uint8"
    assert QuantConfig().for_provider("cuda").activations == "int8"
    assert QuantConfig(activations="uint8").for_provider("tensorrt").activations == "uint8"  # asked for: kept
    out = tmp_path / "q.onnx"  # TensorRT is absent here: timed as unavailable, quantized for it all the same
    res = CliRunner().invoke(main, ["quantize", str(vgg_path), "--data", str(npz_path), "--shots", "3", "-o", str(out),
                                    "--providers", "tensorrt", "--batch", "2", "--runs", "3", "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["quantization"]["activations"] == "int8" and "tensorrt" in rep["latency"]["unavailable"]
    assert "int8 activations: int8" in render.markdown(rep)
    q = onnx.load(str(out))
    quants = [n for n in q.graph.node if n.op_type == "QuantizeLinear"]
    assert quants and {_zero_point_type(q, n) for n in quants} == {"int8"}
    zero_points = {n.input[2] for n in quants}
    assert all(not numpy_helper.to_array(i).any() for i in q.graph.initializer if i.name in zero_points)  # symmetric


def test_quantize_command_without_pruning(vgg_path, npz_path, tmp_path):
    out = tmp_path / "q.onnx"
    res = CliRunner().invoke(main, ["quantize", str(vgg_path), "--data", str(npz_path), "--shots", "3", "-o", str(out),
                                    "--no-bench", "--json", "--quiet"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert [c["model"] for c in rep["chain"]] == ["float", "int8"] and rep["quality"]["samples"] == 30
    q = onnx.load(str(out))
    assert signature(q) == signature(onnx.load(str(vgg_path)))
    assert [i.dims for i in q.graph.initializer if len(i.dims) == 4] == \
        [i.dims for i in onnx.load(str(vgg_path)).graph.initializer if len(i.dims) == 4]  # nothing pruned
    res = CliRunner().invoke(main, ["quantize", str(vgg_path), "--data", str(npz_path), "--shots", "3", "-o", str(out)])
    assert res.exit_code == 2 and "--force" in res.output
    again = tmp_path / "again.onnx"  # an int8 model given back: one line that says what to give instead
    for command, advice in (("compress", "prune the float model"), ("quantize", "quantize the float model")):
        res = CliRunner().invoke(main, [command, str(out), "--data", str(npz_path), "--shots", "3", "-o", str(again),
                                        "--no-bench", "--quiet"])
        assert res.exit_code == 3 and "already quantized" in res.output and advice in res.output, res.output
        assert not again.exists()
    res = CliRunner().invoke(main, ["inspect", str(out)])  # not two empty tables: the same line, the same code
    assert res.exit_code == 3 and "already quantized" in res.output and "'" in res.output, res.output


def test_without_a_bench_the_int8_model_is_still_timed_against_its_float_one(vgg_path, npz_path, tmp_path):
    report = tmp_path / "r.json"
    res = CliRunner().invoke(main, ["compress", str(vgg_path), "--data", str(npz_path), "--shots", "3", "-o",
                                    str(tmp_path / "q.onnx"), "--report", str(report), "--quantize", "int8",
                                    "--no-bench", "--quiet"])
    assert res.exit_code == 0, res.output
    rep = json.loads(report.read_text())
    assert rep["latency"] is None
    timed = rep["quantization"]["timed_against_float"]
    assert timed["provider"] == "cpu" and timed["batch"] == 32 and timed["float_ms"] > 0 and timed["int8_ms"] > 0
