"""Loading, normalisation and the onnx2torch parity check, on real exported models."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from pipeline.analyze import find_groups
from pipeline.convert import check_parity, relative_error, to_torch
from pipeline.errors import ModelError
from pipeline.graph import GraphView
from pipeline.load import load_model
from tests.conftest import TinyVGG, export, initializers_as_inputs, make_data, randomise_bn, weights_as_constants


def test_parity_of_converted_model(vgg_path):
    model = load_model(vgg_path)
    x, _ = make_data(2)
    assert check_parity(model, to_torch(model.proto), x).worst < 1e-5


def test_parity_check_can_fail(vgg_path):
    model = load_model(vgg_path)
    twin = to_torch(model.proto)
    with torch.no_grad():
        next(m for m in twin.module.modules() if isinstance(m, torch.nn.Conv2d)).weight.mul_(1.5)
    with pytest.raises(ModelError, match="differs from onnxruntime"):
        check_parity(model, twin, make_data(2)[0])


def test_constant_weights_become_initializers(vgg_path, tmp_path):
    path = weights_as_constants(vgg_path, tmp_path / "const.onnx")
    model = load_model(path)
    assert not any(n.op_type == "Constant" for n in model.proto.graph.node)
    assert [i.name for i in model.inputs] == ["image"] and model.inputs[0].shape == ("batch", 1, 16, 16)
    assert [o.name for o in model.outputs] == ["logits"]
    assert check_parity(model, to_torch(model.proto), make_data(1)[0]).worst < 1e-5


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_opsets_and_fused_export(tmp_path, opset):
    path = export(randomise_bn(TinyVGG()), tmp_path / "m.onnx", keep_bn=False, opset=opset)
    model = load_model(path)
    assert model.opset == opset
    assert check_parity(model, to_torch(model.proto), make_data(1)[0]).worst < 1e-5


def test_initializers_as_graph_inputs(vgg_path, tmp_path):
    model = load_model(initializers_as_inputs(vgg_path, tmp_path / "ir3.onnx"))
    assert [i.name for i in model.inputs] == ["image"]
    assert any("graph inputs" in n for n in model.notes)
    assert check_parity(model, to_torch(model.proto), make_data(1)[0]).worst < 1e-5


def test_missing_file(tmp_path):
    with pytest.raises(ModelError, match="no such file"):
        load_model(tmp_path / "nope.onnx")


def test_not_onnx(tmp_path):
    path = tmp_path / "junk.onnx"
    path.write_bytes(np.random.default_rng(0).bytes(1000))
    with pytest.raises(ModelError, match="junk.onnx"):
        load_model(path)


def test_truncated_model(vgg_path, tmp_path):
    path = tmp_path / "cut.onnx"
    path.write_bytes(vgg_path.read_bytes()[:-700])
    with pytest.raises(ModelError, match="cut.onnx"):
        load_model(path)


def test_checker_failure_is_one_line(vgg_path, tmp_path):
    proto = onnx.load(str(vgg_path))
    proto.graph.node[3].input[0] = "nowhere"
    path = tmp_path / "broken.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(ModelError, match="onnx.checker") as err:
        load_model(path)
    assert "\n" not in str(err.value)


class ChannelsLastFlatten(torch.nn.Module):
    """Keras' Flatten before a Dense as tf2onnx writes it: transpose to NHWC, flatten, multiply
    (Gemm with transB from nn.Linear, or MatMul by a plain matrix)."""

    def __init__(self, head: str):
        super().__init__()
        self.conv1, self.conv2 = torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.Conv2d(8, 16, 3, stride=4)
        self.head = head
        self.fc = torch.nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x)))).permute(0, 2, 3, 1).reshape(-1, 16 * 4 * 4)
        return self.fc(x) if self.head == "gemm" else x @ self.fc.weight.T


@pytest.mark.parametrize("head", ["gemm", "matmul"])
def test_channels_last_flatten_is_folded_into_the_classifier(tmp_path, head):
    torch.manual_seed(0)
    model = load_model(export(ChannelsLastFlatten(head), tmp_path / "nhwc.onnx"))
    assert not any(n.op_type == "Transpose" for n in model.proto.graph.node)
    assert any("channels-last flatten" in note for note in model.notes)
    assert check_parity(model, to_torch(model.proto), make_data(1)[0]).worst < 1e-5
    groups = find_groups(GraphView(model.proto))
    assert sorted(g.size for g in groups if g.prunable) == [8, 16]  # the conv before the flatten too


def test_operator_without_converter_runs_in_onnxruntime(vgg_path, tmp_path):
    proto = onnx.load(str(vgg_path))
    head = onnx.helper.make_node("Hardmax", ["logits_raw"], ["logits"], name="the_head", axis=1)
    proto.graph.node[-1].output[0] = "logits_raw"
    proto.graph.node.append(head)  # valid ONNX, but onnx2torch has no Hardmax converter
    path = tmp_path / "hardmax.onnx"
    onnx.save(proto, str(path))
    model = load_model(path)
    twin = to_torch(model.proto)
    assert twin.fallbacks == ["the_head"]
    x = make_data(2)[0]
    assert check_parity(model, twin, x).worst == 0.0  # one-hot outputs, equal


def test_operator_nobody_runs_is_named(vgg_path, tmp_path):
    proto = onnx.load(str(vgg_path))
    head = proto.graph.node[-1]
    head.op_type, head.domain, head.name = "Mystery", "com.example", "odd_one"
    del head.attribute[:]
    proto.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    path = tmp_path / "mystery.onnx"
    onnx.save(proto, str(path))
    model = load_model(path)
    with pytest.raises(ModelError, match="onnxruntime cannot run it.*Mystery"):
        check_parity(model, to_torch(model.proto), make_data(1)[0])


def test_relative_error_is_scale_free():
    a = np.array([100.0, -200.0])
    assert relative_error(a, a * (1 + 1e-6)) < 2e-6
    assert relative_error(a, a[:1]) == float("inf")


def test_detection_operators_convert_though_torchvision_loads_only_when_used():
    """onnx2torch's NonMaxSuppression converter calls torchvision, which the twin defers
    importing until a model has such a node: the twin still runs it as onnxruntime does."""
    from onnx import TensorProto, helper, numpy_helper

    from pipeline.runtime import make_session

    scores = numpy_helper.from_array(np.array([[[0.9, 0.75, 0.6, 0.95, 0.5, 0.3]]], np.float32), "scores")
    limits = [numpy_helper.from_array(np.array(v, dtype), n) for v, dtype, n in
              (([3], np.int64, "keep"), ([0.5], np.float32, "iou"), ([0.4], np.float32, "low"))]
    graph = helper.make_graph(
        [helper.make_node("NonMaxSuppression", ["boxes", "scores", "keep", "iou", "low"], ["picked"], name="nms")],
        "nms", [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 6, 4])],
        [helper.make_tensor_value_info("picked", TensorProto.INT64, [None, 3])], [scores, *limits])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    boxes = np.array([[[0, 0, 1, 1], [0, 0.1, 1, 1.1], [0, -0.1, 1, 0.9], [0, 10, 1, 11], [0, 10.1, 1, 11.1],
                       [0, 100, 1, 101]]], np.float32)
    twin = to_torch(proto)
    got = twin.outputs(torch.from_numpy(boxes))[0].numpy()
    expected = make_session(proto.SerializeToString()).run(None, {"boxes": boxes})[0]
    np.testing.assert_array_equal(got, expected)
