"""End-to-end distillation after slimming: trained weights land in the ONNX file, and are checked."""
from __future__ import annotations

import json

import numpy as np
import onnx
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from pipeline import finetune
from pipeline.cli import main
from pipeline.convert import to_torch
from pipeline.load import signature
from pipeline.runtime import make_session
from tests.conftest import make_data


def _compress(vgg_path, npz_path, out, report, *extra):
    return CliRunner().invoke(main, ["compress", str(vgg_path), "--data", str(npz_path), "--shots", "3",
                                     "-o", str(out), "--report", str(report), "--no-bench", "--quiet", "--method", "cross",
                                     *extra])


def test_finetune_lowers_the_training_error_and_keeps_a_drop_in(vgg_path, npz_path, tmp_path):
    plain, tuned = tmp_path / "plain.onnx", tmp_path / "tuned.onnx"
    assert _compress(vgg_path, npz_path, plain, tmp_path / "p.json", "--ratio", "0.25").exit_code == 0
    res = _compress(vgg_path, npz_path, tuned, tmp_path / "t.json", "--finetune-steps", "30", "--finetune-lr", "3e-4",
                    "--ratio", "0.25")
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "t.json").read_text())
    assert [c["model"] for c in rep["chain"]] == ["teacher", "slim", "slim-finetuned"]
    ft = rep["finetune"]
    assert ft["steps"] == 30 and ft["tuned_nodes"] >= 5
    assert ft["relative_squared_error_after"] < ft["relative_squared_error_before"]
    a, b = onnx.load(str(plain)), onnx.load(str(tuned))
    assert signature(a) == signature(b)
    assert [i.dims for i in a.graph.initializer] == [i.dims for i in b.graph.initializer]  # same widths
    changed = [i.name for i, j in zip(a.graph.initializer, b.graph.initializer)
               if not np.array_equal(numpy_helper.to_array(i), numpy_helper.to_array(j))]
    assert changed  # the trained weights were written, not only the twin's


def test_finetune_write_back_is_verified(vgg_path, npz_path, tmp_path, monkeypatch):
    monkeypatch.setattr(finetune, "_write_back", lambda proto, twin, tuned: proto)  # trained weights lost
    res = _compress(vgg_path, npz_path, tmp_path / "x.onnx", tmp_path / "x.json", "--finetune-steps", "30",
                    "--finetune-lr", "1e-2")
    assert res.exit_code == 6 and "fine-tuned torch twin" in res.output
    assert not (tmp_path / "x.onnx").exists()


def _gemm_model() -> onnx.ModelProto:
    """Conv -> BN -> Flatten -> Gemm with alpha, beta and transB=0, the layout torch never exports."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n) for n, s in
             [("w", (4, 1, 3, 3)), ("b", (4,)), ("scale", (4,)), ("shift", (4,)), ("mean", (4,)),
              ("gw", (4 * 36, 3)), ("gb", (3,))]]
    inits.append(numpy_helper.from_array(np.ones(4, np.float32), "var"))
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["n"], name="bn"),
             helper.make_node("Flatten", ["n"], ["f"], name="flat"),
             helper.make_node("Gemm", ["f", "gw", "gb"], ["y"], name="gemm", alpha=2.0, beta=0.5, transB=0)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_write_back_reproduces_the_trained_twin_for_conv_bn_and_gemm():
    proto = _gemm_model()
    twin = to_torch(proto)
    params, tuned = finetune._trainable(proto, twin)
    assert tuned == ["conv", "bn", "gemm"]
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.3)
    out = finetune._write_back(proto, twin, tuned)
    x = make_data(1, 2, (1, 8, 8))[0]
    got = make_session(out).run(None, {"x": x})[0]
    want = twin.outputs(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    before = make_session(proto).run(None, {"x": x})[0]
    assert not np.allclose(before, want, atol=1e-2)


def test_an_initializer_shared_by_two_nodes_is_not_trained():
    proto = _gemm_model()
    proto.graph.node.append(helper.make_node("Add", ["gb", "gb"], ["extra"], name="reuse"))
    proto.graph.output.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [3]))
    _, tuned = finetune._trainable(proto, to_torch(proto))
    assert "gemm" not in tuned and "conv" in tuned


def test_a_model_without_trainable_layers_is_left_as_it_is():
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], [w])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = np.random.default_rng(1).standard_normal((6, 8)).astype(np.float32)
    result = finetune.finetune(proto, to_torch(proto), x, finetune.FinetuneConfig(steps=5), 0, None)
    assert result.tuned == [] and result.loss_after == result.loss_before == 0.0
    assert result.model.SerializeToString() == proto.SerializeToString()
