"""Sequence models as text readers ship them: a conv backbone whose channels become the features
of a sequence (Squeeze, Transpose) read by an LSTM or GRU, exported with torch 1.x-style settings
(TorchScript, opset 12, the batch fixed at 1, the width free); and declared output shapes that
the graph does not produce."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from exporters.slim import slim
from pipeline import prune
from pipeline.analyze import find_groups
from pipeline.cli import main
from pipeline.convert import check_parity, to_torch
from pipeline.flops import layer_costs
from pipeline.graph import GraphView
from pipeline.load import load_model, signature, sized
from pipeline.prune import PruneConfig
from pipeline.verify import check_slim
from tests.conftest import randomise_bn

HEIGHT, CLASSES = 32, 12


class TinyCRNN(nn.Module):
    """Conv blocks down to a height of 1, the width as time steps, a bidirectional recurrent
    layer and a per-step classifier: the shape of a CRNN text reader."""

    def __init__(self, rnn: type[nn.Module] = nn.LSTM):
        super().__init__()

        def block(cin: int, cout: int, pool) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(pool)]

        self.cnn = nn.Sequential(*block(1, 16, 2), *block(16, 24, 2), *block(24, 32, (2, 1)), *block(32, 32, (4, 1)))
        self.rnn = rnn(32, 24, bidirectional=True)
        self.fc = nn.Linear(48, CLASSES)

    def forward(self, x):
        steps = self.cnn(x).squeeze(2).permute(2, 0, 1)  # (width / 4, batch, channels)
        return self.fc(self.rnn(steps)[0]).log_softmax(-1)


def export_crnn(path: Path, rnn: type[nn.Module] = nn.LSTM, declared: list | None = None) -> Path:
    """TorchScript at opset 12, batch 1 fixed and the width free; `declared` overwrites the
    output's declared shape, as some exporters write it."""
    torch.manual_seed(0)
    model = randomise_bn(TinyCRNN(rnn)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 1, HEIGHT, 64),), str(path), dynamo=False, opset_version=12,
                          input_names=["image"], output_names=["steps"], dynamic_axes={"image": {3: "width"}})
    if declared is not None:
        proto = onnx.load(str(path))
        dims = proto.graph.output[0].type.tensor_type.shape.dim
        del dims[:]
        for d in declared:
            dims.add().CopyFrom(onnx.TensorShapeProto.Dimension(**({"dim_param": d} if isinstance(d, str)
                                                                   else {"dim_value": d})))
        onnx.save(proto, str(path))
    return path


def images(count: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 1, HEIGHT, width)).astype(np.float32)


@pytest.mark.parametrize("rnn", [nn.LSTM, nn.GRU], ids=["lstm", "gru"])
def test_channels_read_by_a_recurrent_layer_are_pruned_and_equal_the_student_at_any_width(tmp_path, rnn):
    model = load_model(export_crnn(tmp_path / "crnn.onnx", rnn))
    x = images(12, 64)
    twin = to_torch(model.proto)
    check_parity(model, twin, x)
    view = GraphView(sized(model.proto, x.shape[1:]))
    groups = find_groups(view)
    recurrent = next(n.name for n in model.proto.graph.node if n.op_type in ("LSTM", "GRU"))
    read = next(g for g in groups if any(c.node == recurrent for c in g.consumers))
    assert read.prunable and [c.kind for c in read.consumers] == ["rnn"]
    assert all(g.prunable for g in groups if g.producers[0].startswith("/cnn"))  # every conv group

    result = prune.prune(view, twin, groups, x, PruneConfig(ratio=0.5, scope="all"))
    assert dict(result.kept)[read.id].size == 16
    out = slim(model.proto, groups, result.kept, result.layers)
    w = GraphView(out).const(next(n for n in out.graph.node if n.name == recurrent).input[1])
    assert w.shape[-1] == 16  # the input columns of every direction and gate
    for width in (64, 40):  # the data's width and another: the recurrence runs over as many steps
        assert check_slim(out, result.student, images(4, width, seed=1), ["steps"]) < 1e-4
    assert signature(out)[0] == signature(model.proto)[0]


def test_a_crnn_compresses_with_its_recurrent_input_and_counts_its_flops(tmp_path):
    path = export_crnn(tmp_path / "crnn.onnx")
    data = tmp_path / "lines.npz"
    np.savez(data, x=images(32, 64))
    runner = CliRunner()
    res = runner.invoke(main, ["inspect", str(path), "--json", "--data", str(data)])
    assert res.exit_code == 0, res.output
    layers = {c["op"]: c for c in json.loads(res.output)["layers"]}
    steps, hidden, inputs = 64 // 4, 24, 32
    assert layers["LSTM"]["flops"] == 2 * steps * 2 * 4 * hidden * (inputs + hidden)  # W and R, both directions
    assert layers["MatMul"]["flops"] == 2 * steps * 2 * hidden * CLASSES  # every step, not one per sample

    out, report = tmp_path / "slim.onnx", tmp_path / "report.json"
    res = runner.invoke(main, ["compress", str(path), "--data", str(data), "--samples", "32", "--scope", "all",
                               "--ratio", "0.5", "-o", str(out), "--report", str(report), "--no-bench", "--quiet"])
    assert res.exit_code == 0, res.output
    rep = json.loads(report.read_text())
    lstm = next(n.name for n in onnx.load(str(path)).graph.node if n.op_type == "LSTM")
    assert any(lstm in g["consumers"] and g["channels_after"] < g["channels_before"] for g in rep["groups"])
    assert 0 < rep["totals"]["flops_after"] < rep["totals"]["flops_before"]


def test_a_declared_output_shape_the_graph_does_not_produce_is_not_trusted(tmp_path):
    """Declared [1, seqlen]; onnxruntime returns (steps, 1, classes): the slim model declares what
    it computes and keeps the input as declared."""
    path = export_crnn(tmp_path / "lying.onnx", declared=[1, "seqlen"])
    data = tmp_path / "lines.npz"
    np.savez(data, x=images(16, 64))
    out = tmp_path / "slim.onnx"
    res = CliRunner().invoke(main, ["compress", str(path), "--data", str(data), "--samples", "16", "--scope", "all",
                                    "--method", "cross", "-o", str(out), "--no-bench", "--quiet"])
    assert res.exit_code == 0, res.output
    written = onnx.load(str(out))
    dims = written.graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_value or None for d in dims] == [None, 1, CLASSES]
    assert signature(written)[0] == signature(onnx.load(str(path)))[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"image": images(1, 48)})[0]
    assert got.shape == (12, 1, CLASSES)
    assert load_model(path).outputs[0].shape == (1, "seqlen")  # the report still names what the file declared


class ChannelsLastMlp(nn.Module):
    """A pointwise MLP run channels-last between two convs (ConvNeXt's block without its norm):
    Transpose to (N, H, W, C), Linear, GELU, Linear, Transpose back."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, padding=1)
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)
        self.head = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        y = self.stem(x).permute(0, 2, 3, 1)
        y = self.down(nn.functional.gelu(self.up(y))).permute(0, 3, 1, 2)
        return self.head(torch.relu(y)).mean((2, 3))


def test_a_transpose_moves_the_channels_both_ways(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "mlp.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(ChannelsLastMlp().eval(), (torch.randn(1, 1, 12, 12),), str(path), dynamo=False,
                          opset_version=17, input_names=["image"], output_names=["out"],
                          dynamic_axes={"image": {0: "batch"}})
    model = load_model(path)
    view = GraphView(model.proto)
    groups = {g.producers[0]: g for g in find_groups(view)}
    op = {n.name: n.op_type for n in model.proto.graph.node}
    stem = next(g for p, g in groups.items() if op[p] == "Conv")
    assert stem.prunable and [op[c.node] for c in stem.consumers] == ["MatMul"]  # forward through the Transpose
    down = next(g for g in groups.values() if any(op[c.node] == "Conv" for c in g.consumers))
    assert down.prunable and len(down.producers) == 1 and op[down.producers[0]] == "MatMul"  # and back
    x = np.random.default_rng(0).standard_normal((16, 1, 12, 12)).astype(np.float32)
    twin = to_torch(model.proto)
    result = prune.prune(view, twin, list(groups.values()), x, PruneConfig(ratio=0.5, scope="all"))
    assert len(result.kept) == 3
    assert check_slim(slim(model.proto, list(groups.values()), result.kept, result.layers), result.student, x,
                      ["out"]) < 1e-4


def test_a_flops_count_for_a_free_batch_takes_the_one_free_dimension_as_it():
    """Where the batch is free, a sequence-first tensor's steps are known and counted."""
    (cost,) = layer_costs(GraphView(onnx.shape_inference.infer_shapes(_matmul_model([8, "batch", 6]))))
    assert cost.flops == 2 * 8 * 6 * 5


def _matmul_model(shape: list) -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((6, 5), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
