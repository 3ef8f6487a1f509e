"""Models as other exporters write them than the TorchScript exporter the other tests use.

torch's dynamo exporter (the default of torch.onnx.export since 2.9): opset 18+ (ops onnx2torch
has no converter for, such as ReduceMean-18, run by onnxruntime in the twin), weights in an
external .data file, flattens written as Reshape with the feature count spelled out, and,
without dynamic shapes, a batch of 1 fixed in the input and baked into those Reshapes.
tf2onnx from Keras: NHWC input, batch norms as Mul/Add, Flatten as Transpose + Reshape.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from pipeline.analyze import find_groups
from pipeline.cli import main
from pipeline.convert import check_parity, to_torch
from pipeline.graph import GraphView
from pipeline.load import load_model, signature
from pipeline.runtime import AS_WRITTEN, SessionConfig, make_session
from pipeline.errors import VerificationError
from pipeline.verify import check_slim
from tests.conftest import (ChunkBlock, TinyMobile, TinyResidual, TinyVGG, export, export_dynamo, make_data,
                            randomise_bn)


class TinyConcatHead(nn.Module):
    """Two branches concatenated, pooled to 2x2 and flattened: the Reshape's feature count is
    shared by both branches' channels, as at the end of DenseNet or GoogLeNet."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 16, 1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(24 * 4, 10)

    def forward(self, x):
        x = self.stem(x)
        return self.fc(torch.flatten(self.pool(torch.cat([self.a(x), self.b(x)], 1)), 1))


def compress(model, data, out, *args):
    args = ["compress", model, "--data", data, "-o", out, "--quiet", "--shots", 2, "--augment", "none", *args]
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    x, y = make_data(2)
    path = tmp_path_factory.mktemp("shots") / "shots.npz"
    np.savez(path, x=x, y=y)
    return path


def test_external_weights_are_found_beside_the_model_from_any_folder(tmp_path, shots, monkeypatch):
    torch.manual_seed(0)
    path = export_dynamo(randomise_bn(TinyMobile()), tmp_path / "mobile.onnx")
    data_file = tmp_path / "mobile.onnx.data"
    assert data_file.is_file()  # the weights are not in the .onnx file
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # sessions made from bytes would look for the .data file here
    out, report = tmp_path / "slim.onnx", tmp_path / "report.json"
    compress(path, shots, out, "--scope", "all", "--report", report, "--batch", "2", "--runs", 3)
    rep = json.loads(report.read_text())
    assert rep["totals"]["bytes_before"] > data_file.stat().st_size  # the weights count in the size
    assert rep["totals"]["bytes_after"] < rep["totals"]["bytes_before"]
    assert rep["latency"]["timings"] and not rep["latency"]["unavailable"]
    assert signature(onnx.load(str(out))) == signature(load_model(path).proto)
    # two SE/head ReduceMean-18 nodes have no torch converter: both run in onnxruntime
    assert sum(name.startswith("node_mean") for name in rep["parity"]["run_by_onnxruntime"]) == 2


def test_every_node_without_a_converter_gets_its_own_fallback(tmp_path):
    torch.manual_seed(0)
    model = load_model(export_dynamo(randomise_bn(TinyMobile()), tmp_path / "mobile.onnx"))
    means = [n.name for n in model.proto.graph.node if n.op_type == "ReduceMean"]
    twin = to_torch(model.proto)
    assert len(means) == 2 and set(means) <= set(twin.fallbacks)
    assert check_parity(model, twin, make_data(1)[0]).worst < 1e-5


def test_a_fixed_batch_baked_into_a_reshape_is_honoured(tmp_path, shots):
    torch.manual_seed(0)
    path = export_dynamo(randomise_bn(TinyVGG()), tmp_path / "static.onnx", dynamic_batch=False)
    model = load_model(path)
    reshape = next(n for n in model.proto.graph.node if n.op_type == "Reshape")
    assert list(GraphView(model.proto).const(reshape.input[1])) == [1, 16]  # (batch 1, channels)
    twin = to_torch(model.proto)
    check_parity(model, twin, make_data(1)[0])
    assert twin.batch == 1  # the twin failed on 10 at once, so it runs one sample at a time
    groups = find_groups(GraphView(model.proto))
    assert sum(g.prunable for g in groups) == 5  # the conv before the Reshape too

    out, report = tmp_path / "slim.onnx", tmp_path / "report.json"
    compress(path, shots, out, "--report", report, "--batch", "1,4", "--runs", 3)
    rep = json.loads(report.read_text())
    assert {t["batch"] for t in rep["latency"]["timings"]} == {1}
    assert "fixed batch" in rep["latency"]["unavailable"]["cpu@4"]
    slim = onnx.load(str(out))
    assert signature(slim) == signature(model.proto)
    first_gemm = next(n.name for n in model.proto.graph.node if n.op_type == "Gemm")
    kept = next(g["channels_after"] for g in rep["groups"] if first_gemm in g["consumers"])
    sliced = next(n for n in slim.graph.node if n.name == reshape.name)
    assert list(GraphView(slim).const(sliced.input[1])) == [1, kept]
    x = make_data(1)[0][:1]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.run(None, {"image": x})[0].shape == (1, 10)


def test_a_flatten_of_concatenated_groups_is_edited_by_each(tmp_path, shots):
    torch.manual_seed(0)
    path = export_dynamo(TinyConcatHead(), tmp_path / "concat.onnx")
    model = load_model(path)
    reshape = next(n for n in model.proto.graph.node if n.op_type == "Reshape")
    assert list(GraphView(model.proto).const(reshape.input[1])) == [-1, 96]
    out, report = tmp_path / "slim.onnx", tmp_path / "report.json"
    compress(path, shots, out, "--scope", "all", "--report", report, "--no-bench", "--ratio", 0.5)
    rep = json.loads(report.read_text())
    gemm = next(n.name for n in model.proto.graph.node if n.op_type == "Gemm")
    branches = {g["channels_before"]: g["channels_after"] for g in rep["groups"] if gemm in g["consumers"]}
    assert set(branches) == {8, 16}
    slim = onnx.load(str(out))
    sliced = next(n for n in slim.graph.node if n.name == reshape.name)
    assert list(GraphView(slim).const(sliced.input[1])) == [-1, 4 * sum(branches.values())]
    assert sum(branches.values()) < 24 and rep["parity"]["slim_vs_masked_student"] < 1e-4


def test_a_keras_model_exported_by_tf2onnx_compresses(tmp_path):
    """tools/teachers/keras_cnn.onnx: trained on Fashion-MNIST by tools/train_keras.py, NHWC input
    scaled to [0, 1] (its .preprocess.json), fed the demo's PNG shots."""
    root = Path(__file__).resolve().parents[1]
    model = root / "tools" / "teachers" / "keras_cnn.onnx"
    out, report = tmp_path / "slim.onnx", tmp_path / "report.json"
    res = CliRunner().invoke(main, ["compress", str(model), "--data", str(root / "pipeline" / "assets" / "demo_shots"),
                                    "--shots", "2", "--method", "cross", "-o", str(out), "--report", str(report), "--no-bench",
                                    "--quiet"])
    assert res.exit_code == 0, res.output
    rep = json.loads(report.read_text())
    assert rep["input"]["inputs"][0]["shape"][1:] == [28, 28, 1]
    assert sorted(g["channels_before"] for g in rep["groups"] if g["channels_after"] < g["channels_before"]) == [32, 64, 64]
    assert rep["parity"]["torch_vs_onnxruntime"] < 1e-5 and rep["parity"]["slim_vs_masked_student"] < 1e-4
    assert rep["quality"]["student_accuracy"] > 0.7  # 30 held-out demo images; the teacher: 90.29% on 10,000
    checks = rep["augmentation"]["checks"]  # image transforms checked on the NHWC shots, not skipped
    assert all(np.isfinite(c["teacher_agreement"]) for c in checks) and "cutmix" in [c["transform"] for c in checks
                                                                                      if c["kept"]]
    assert signature(onnx.load(str(out))) == signature(onnx.load(str(model)))


@pytest.mark.parametrize("opset", [22, 23])
def test_opsets_that_only_added_types_convert_as_before(tmp_path, shots, opset):
    """Conv-22 only added bfloat16: onnx2torch's Conv-11 converter still applies, so the convs
    stay torch layers the pruning can reach (run by onnxruntime, only the Gemms could be cut)."""
    torch.manual_seed(0)
    reports = {}
    for version in (20, opset):
        path = export_dynamo(randomise_bn(TinyVGG()), tmp_path / f"vgg{version}.onnx", opset=version)
        model = load_model(path)
        assert model.opset == version
        twin = to_torch(model.proto)
        convs = {n.name for n in model.proto.graph.node if n.op_type == "Conv"}
        assert convs and not convs & set(twin.fallbacks)
        out, report = tmp_path / f"slim{version}.onnx", tmp_path / f"report{version}.json"
        compress(path, shots, out, "--report", report, "--no-bench", "--method", "cross")
        reports[version] = json.loads(report.read_text())
    assert reports[opset]["totals"]["flops_after"] == reports[20]["totals"]["flops_after"] < reports[20]["totals"]["flops_before"] / 3


def test_a_chunk_exported_as_split_with_num_outputs_is_cut_per_part(tmp_path, shots):
    torch.manual_seed(0)
    path = export_dynamo(ChunkBlock(), tmp_path / "chunk.onnx")
    assert any(a.name == "num_outputs" for n in onnx.load(str(path)).graph.node if n.op_type == "Split"
               for a in n.attribute)
    out, report = tmp_path / "slim.onnx", tmp_path / "report.json"
    compress(path, shots, out, "--scope", "all", "--report", report, "--no-bench", "--method", "cross")
    rep = json.loads(report.read_text())
    parts = [g for g in rep["groups"] if g["producers"][0].endswith("conv2d") and g["channels_before"] == 8]
    assert len(parts) == 2 and all(g["channels_after"] < 8 for g in parts)
    split = next(n for n in onnx.load(str(out)).graph.node if n.op_type == "Split")
    slim_view = GraphView(onnx.load(str(out)))
    assert list(slim_view.const(split.input[1])) == [g["channels_after"] for g in parts]
    assert rep["parity"]["slim_vs_masked_student"] < 1e-4


class Float16Inside(nn.Module):
    """float32 inputs and outputs around a float16 network, as converters that keep the I/O
    types write it: Casts at the edges."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net.half()

    def forward(self, x):
        return self.net(x.half()).float()


def _float_types(proto: onnx.ModelProto) -> set[int]:
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16}
    return {i.data_type for i in proto.graph.initializer if i.data_type in floats}


def test_a_float16_model_is_pruned_as_its_float32_self_and_written_in_float16(tmp_path, shots):
    torch.manual_seed(0)
    net = randomise_bn(TinyResidual())
    paths = {dtype: export(net.to(dtype), tmp_path / f"{dtype}.onnx".replace("torch.", ""), dtype=dtype)
             for dtype in (torch.float32, torch.float16)}
    reports, weight_bytes = {}, {}
    for dtype, path in paths.items():
        out, report = tmp_path / f"slim_{path.name}", tmp_path / f"{path.stem}.json"
        compress(path, shots, out, "--scope", "all", "--ratio", 0.5, "--report", report, "--no-bench",
                 "--finetune-steps", 3)  # the trained weights are checked as the file stores them
        reports[dtype] = json.loads(report.read_text())
        slim = onnx.load(str(out))
        assert signature(slim) == signature(onnx.load(str(path)))
        assert _float_types(slim) == {onnx.TensorProto.FLOAT16 if dtype == torch.float16 else onnx.TensorProto.FLOAT}
        weight_bytes[dtype] = sum(onnx.numpy_helper.to_array(i).nbytes for i in slim.graph.initializer)
    half, full = reports[torch.float16], reports[torch.float32]
    assert half["parity"]["slim_vs_masked_student"] < 1e-4  # the widened graph, checked exactly
    assert 1e-6 < half["parity"]["torch_vs_onnxruntime"] < 3e-2  # float16 rounding, and no more
    assert half["totals"]["flops_after"] == full["totals"]["flops_after"] < full["totals"]["flops_before"]
    assert weight_bytes[torch.float16] == weight_bytes[torch.float32] // 2
    for a, b in zip(half["groups"], full["groups"]):
        assert a["channels_after"] == b["channels_after"]
        assert (a["loss"] is None) == (b["loss"] is None)
        assert a["loss"] is None or a["loss"] == pytest.approx(b["loss"], rel=0.05, abs=1e-4)
    assert any("float16" in note for note in half["input"]["normalisation"])


def test_a_float16_network_inside_float32_casts_keeps_both(tmp_path, shots):
    torch.manual_seed(0)
    path = export(Float16Inside(randomise_bn(TinyMobile())), tmp_path / "mixed.onnx")
    out = tmp_path / "slim.onnx"
    compress(path, shots, out, "--scope", "all", "--ratio", 0.5, "--no-bench")
    slim = onnx.load(str(out))
    assert signature(slim) == signature(onnx.load(str(path)))  # float32 in and out
    assert _float_types(slim) == {onnx.TensorProto.FLOAT16}
    assert [n.op_type for n in slim.graph.node].count("Cast") == 2


def test_float16_overflow_after_the_refit_fails_verification(tmp_path):
    """The widened graph can agree with the student exactly while the float16 file overflows:
    the second check must catch that."""
    torch.manual_seed(0)
    net = randomise_bn(TinyVGG()).half()
    path = export(net, tmp_path / "half.onnx", keep_bn=False, dtype=torch.float16)
    proto = load_model(path).proto
    x = make_data(1)[0]
    twin = to_torch(proto)
    assert check_slim(proto, twin, x, ["logits"]) < 1e-4  # as written: both checks pass
    last = [n for n in proto.graph.node if n.op_type == "Gemm"][-1]  # writes the logits
    for index, scale in ((1, 60000), (2, 60000)):  # float16 values; the logits they give are not
        tensor = next(i for i in proto.graph.initializer if i.name == last.input[index])
        value = onnx.numpy_helper.to_array(tensor).astype(np.float32)
        big = value * (scale / np.abs(value).max()) if index == 1 else np.full_like(value, scale)
        tensor.CopyFrom(onnx.numpy_helper.from_array(big.astype(np.float16), tensor.name))
    with pytest.raises(VerificationError, match="float16 slim model differs"):
        check_slim(proto, to_torch(proto), x, ["logits"])


def test_int8_on_a_float16_model_is_refused_before_any_work(tmp_path, shots):
    path = export(randomise_bn(TinyVGG()).half(), tmp_path / "half.onnx", dtype=torch.float16)
    out = tmp_path / "slim.onnx"
    res = CliRunner().invoke(main, ["compress", str(path), "--data", str(shots), "--shots", "2", "-o", str(out),
                                    "--quantize", "int8"])
    assert res.exit_code != 0 and "float16 model" in res.output and "--quantize" in res.output
    assert not out.exists()


def test_an_image_size_exported_as_dynamic_is_measured_at_the_datas(tmp_path, shots):
    """dynamic_axes on height and width (segmentation, detection, many classifiers): FLOPs,
    latency and a latency target need a size, and the data has one; the slim model keeps the
    dynamic axes."""
    torch.manual_seed(0)
    path = export(randomise_bn(TinyVGG()), tmp_path / "dynamic.onnx", keep_bn=False, dynamic_size=True)
    out, report = tmp_path / "slim.onnx", tmp_path / "report.json"
    compress(path, shots, out, "--ratio", 0.5, "--report", report, "--batch", "2", "--runs", 3)
    rep = json.loads(report.read_text())
    assert 0 < rep["totals"]["flops_after"] < rep["totals"]["flops_before"]
    assert {t["model"] for t in rep["latency"]["timings"]} == {"teacher", "slim"}
    assert signature(onnx.load(str(out))) == signature(onnx.load(str(path)))  # height and width still free
    x = make_data(1)[0][:2]
    big = np.repeat(np.repeat(x, 2, axis=2), 2, axis=3)  # another size than the shots'
    slim_out = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"image": big})[0]
    assert slim_out.shape == (2, 10)
    runner = CliRunner()
    res = runner.invoke(main, ["bench", str(path), str(out), "--batch", "1", "--runs", "2"])
    assert res.exit_code != 0 and "--shape" in res.output
    res = runner.invoke(main, ["bench", str(path), str(out), "--batch", "1", "--runs", "2", "--shape", "1,24,24"])
    assert res.exit_code == 0, res.output
    free = json.loads(runner.invoke(main, ["inspect", str(path), "--json"]).output)
    assert all(c["flops"] == 0 for c in free["layers"] if c["op"] == "Conv")  # no size to count at: it says so
    assert "give --shape C,H,W or --data" in runner.invoke(main, ["inspect", str(path)]).output
    costs = {}
    for given in (["--shape", "1,16,16"], ["--data", str(shots)], ["--shape", "1,32,32"]):
        res = runner.invoke(main, ["inspect", str(path), "--json", *given])
        assert res.exit_code == 0, res.output
        costs[given[1]] = sum(c["flops"] for c in json.loads(res.output)["layers"] if c["op"] == "Conv")
    assert 0 < costs["1,16,16"] == costs[str(shots)] and costs["1,32,32"] == 4 * costs["1,16,16"]
    target = tmp_path / "target.json"  # a latency target times every candidate at the data's size too
    compress(path, shots, tmp_path / "t.onnx", "--target-speedup", 1.2, "--target-batch", 4, "--batch", "4",
             "--runs", 3, "--method", "cross", "--report", target)
    steered = json.loads(target.read_text())["allocation"]
    assert steered["attempts"] and all(a["measured_ms"] > 0 for a in steered["attempts"])


class RawPixels(nn.Module):
    """A deployment export that takes uint8 NHWC pixels and does its own preprocessing."""

    def __init__(self):
        super().__init__()
        self.net = randomise_bn(TinyVGG())

    def forward(self, img):
        return torch.softmax(self.net((img.permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.25), dim=1)


def test_a_model_taking_uint8_pixels_is_fed_them(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "raw.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(RawPixels().eval(), (torch.zeros(1, 16, 16, 1, dtype=torch.uint8),), str(path), dynamo=False,
                          opset_version=17, input_names=["img"], output_names=["probs"],
                          dynamic_axes={"img": {0: "batch"}, "probs": {0: "batch"}})
    data = tmp_path / "pixels.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.integers(0, 256, (40, 16, 16, 1), dtype=np.uint8), y=np.repeat(np.arange(10), 4))
    out, report = tmp_path / "slim.onnx", tmp_path / "report.json"
    compress(path, data, out, "--ratio", 0.5, "--report", report, "--no-bench")
    rep = json.loads(report.read_text())
    assert rep["input"]["inputs"][0]["dtype"] == "uint8" and rep["data"]["preprocess"]["scale"] == 1.0
    assert rep["totals"]["flops_after"] < rep["totals"]["flops_before"]
    assert signature(onnx.load(str(out))) == signature(onnx.load(str(path)))
    floats = tmp_path / "floats.npz"  # a float model still refuses integer x: it wants preprocessed inputs
    np.savez(floats, x=rng.integers(0, 256, (20, 1, 16, 16), dtype=np.uint8))
    res = CliRunner().invoke(main, ["compress", str(export(randomise_bn(TinyVGG()), tmp_path / "f.onnx")), "--data",
                                    str(floats), "--samples", "8", "-o", str(tmp_path / "f_slim.onnx")])
    assert res.exit_code != 0 and "expected preprocessed floats" in res.output


@pytest.mark.parametrize("opset", [7, 8])
def test_the_oldest_opsets_convert_every_layer(tmp_path, shots, opset):
    """Opsets 7 and 8 (IR version 3, the ONNX model zoo's classic CNNs): initializers are listed
    as graph inputs, and BatchNormalization-7, Gemm-7, Flatten-1 and MaxPool-1 have no
    onnx2torch converter of their own; the versions after them changed nothing these use."""
    torch.manual_seed(0)
    reports = {}
    for version in (17, opset):
        path = export(randomise_bn(TinyVGG()), tmp_path / f"vgg{version}.onnx", opset=version)
        model = load_model(path)
        assert to_torch(model.proto).fallbacks == []
        out, report = tmp_path / f"slim{version}.onnx", tmp_path / f"report{version}.json"
        compress(path, shots, out, "--report", report, "--no-bench", "--method", "cross")
        reports[version] = json.loads(report.read_text())
        assert signature(onnx.load(str(out))) == signature(onnx.load(str(path)))
    assert onnx.load(str(tmp_path / f"vgg{opset}.onnx")).ir_version == 3
    assert reports[opset]["totals"]["flops_after"] == reports[17]["totals"]["flops_after"] < reports[17]["totals"]["flops_before"] / 3


class PaddedPoolStem(nn.Module):
    """timm's BiT stem: conv, a zero Pad, MaxPool without padding, then GroupNorm blocks. The
    conv's outputs are negative in places, where the zero padding wins the max."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.pool = nn.Sequential(nn.ConstantPad2d(1, 0.0), nn.MaxPool2d(3, 2))
        self.body = nn.Sequential(nn.GroupNorm(4, 16), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                                  nn.GroupNorm(8, 32), nn.ReLU())
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.body(self.pool(self.stem(x) - 0.5)).mean((2, 3)))


def test_a_runtime_rewrite_that_changes_outputs_is_reported_not_refused(tmp_path, shots):
    """onnxruntime's optimizer folds a zero Pad into the next MaxPool, whose padding is -inf,
    and so changes what the file computes. The twin is held to the graph as written, so is the
    slim model; the report says how far the optimized runtime moves the teacher's outputs."""
    torch.manual_seed(0)
    path = export(PaddedPoolStem(), tmp_path / "padded.onnx")
    x = make_data(1)[0]
    written, optimized = (make_session(str(path), config).run(None, {"image": x})[0]
                          for config in (AS_WRITTEN, SessionConfig()))
    if np.abs(written - optimized).max() < 1e-3 * np.abs(written).max():
        pytest.skip(f"onnxruntime {ort.__version__} no longer folds a zero Pad into a MaxPool")
    out, report = tmp_path / "slim.onnx", tmp_path / "report.json"
    compress(path, shots, out, "--ratio", 0.5, "--report", report, "--no-bench", "--method", "cross")
    parity = json.loads(report.read_text())["parity"]
    assert parity["optimizer_changes_outputs"] and parity["onnxruntime_optimized_vs_as_written"] > 1e-3
    assert parity["torch_vs_onnxruntime"] < 1e-5 and parity["slim_vs_masked_student"] < 1e-4
    res = CliRunner().invoke(main, ["report", str(report)])
    assert "graph optimizations change the teacher's outputs" in res.output


class SamePadded(nn.Module):
    """Convs declared with padding="same" and "valid", as Hugging Face's EfficientNet does: the
    exporter writes auto_pad SAME_UPPER (a kernel of 4 pads 1 before and 2 after) and VALID."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 16, 3, padding="same"), nn.ReLU(), nn.Conv2d(16, 16, 4, padding="same"),
                                 nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding="valid"), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("dynamic_size", [False, True])
def test_convs_with_auto_pad_convert_and_keep_it(tmp_path, shots, dynamic_size):
    """onnx2torch refuses auto_pad; the twin gets the pads it means (at the graph's size, or any
    size where the stride is 1) and the slim file keeps auto_pad, so it still takes any size."""
    torch.manual_seed(0)
    path = export(SamePadded(), tmp_path / "same.onnx", dynamic_size=dynamic_size)
    auto = lambda p: sorted({a.s for n in onnx.load(str(p)).graph.node for a in n.attribute if a.name == "auto_pad"})
    assert auto(path) == [b"SAME_UPPER", b"VALID"]
    out, report = tmp_path / "slim.onnx", tmp_path / "report.json"
    compress(path, shots, out, "--ratio", 0.5, "--report", report, "--no-bench", "--method", "cross",
             "--min-fidelity", 0)  # untrained weights: how the answers move says nothing; the graph is the test
    rep = json.loads(report.read_text())
    assert rep["parity"]["torch_vs_onnxruntime"] < 1e-5 and rep["parity"]["slim_vs_masked_student"] < 1e-5
    assert [g["channels_after"] for g in rep["groups"] if g["prunable"]][:3] == [8, 8, 16]
    assert auto(out) == [b"SAME_UPPER", b"VALID"]


class PooledEvenly(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.AvgPool2d(3, 2, padding=1))
        self.b = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                               nn.Linear(16, 10))

    def forward(self, x):
        return self.b(self.a(x))


def test_a_node_onnx2torch_refuses_for_its_attributes_is_run_by_onnxruntime(tmp_path, shots):
    """A strided AveragePool with auto_pad SAME_UPPER over 16 pixels pads 0 before and 1 after,
    which onnx2torch refuses ("AvgPool with non symmetrical padding"): that node alone is run by
    onnxruntime in the twin, and the conv before it is still pruned."""
    torch.manual_seed(0)
    path = export(PooledEvenly(), tmp_path / "pooled.onnx")
    model = onnx.load(str(path))
    pool = next(n for n in model.graph.node if n.op_type == "AveragePool")
    kept = [a for a in pool.attribute if a.name != "pads"]
    del pool.attribute[:]
    pool.attribute.extend(kept + [onnx.helper.make_attribute("auto_pad", "SAME_UPPER")])
    onnx.save(model, str(path))
    out, report = tmp_path / "slim.onnx", tmp_path / "report.json"
    compress(path, shots, out, "--ratio", 0.5, "--report", report, "--no-bench", "--method", "cross")
    rep = json.loads(report.read_text())
    assert rep["parity"]["run_by_onnxruntime"] == [pool.name]
    assert rep["parity"]["torch_vs_onnxruntime"] < 1e-5 and rep["parity"]["slim_vs_masked_student"] < 1e-5
    assert [g["channels_after"] for g in rep["groups"] if g["prunable"]][:2] == [8, 8]
