"""Channel groups on real exported graphs, physical slimming, and the verification guard."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as nn_f

from exporters.slim import slim
from pipeline.analyze import find_groups
from pipeline.convert import relative_squared_error, run_torch, to_torch
from pipeline.errors import VerificationError
from pipeline.flops import layer_costs
from pipeline.graph import GraphView
from pipeline.load import load_model, signature
from pipeline.prune import PruneConfig, TeacherGrams, prune
from pipeline.prune.stats import add_gram, mirror, rows as consumer_rows
from pipeline.verify import check_slim
from tests.conftest import (ChunkBlock, TinyChannelsLast, TinyGrouped, TinyGroupNorm, TinyMobile, TinyResidual, TinyVGG, export,
                            export_dynamo, make_data, randomise_bn)


def groups_of(path):
    model = load_model(path)
    return model, GraphView(model.proto), find_groups(GraphView(model.proto))


def test_vgg_chain_groups(vgg_path):
    _, view, groups = groups_of(vgg_path)
    prunable = [g for g in groups if g.prunable]
    # four convs and fc1 produce prunable channels; fc2 writes the graph output
    assert [g.size for g in prunable] == [8, 8, 16, 16, 24]
    assert [view.nodes[g.consumers[0].node].op_type for g in prunable] == ["Conv", "Conv", "Conv", "Gemm", "Gemm"]
    bn_slices = [s for g in prunable for s in g.slices if view.nodes[s.node].op_type == "BatchNormalization"]
    assert len(bn_slices) == 4 * 4  # scale, bias, mean, var of each BN
    assert "graph output" in next(g for g in groups if not g.prunable).reason


@pytest.mark.parametrize("head,block", [("pool2", 4), ("view", 4)])
def test_flatten_and_reshape_heads_span_blocks(tmp_path, head, block):
    path = export(randomise_bn(TinyVGG(head="pool2" if head == "pool2" else "view")), tmp_path / "m.onnx")
    _, _, groups = groups_of(path)
    last_conv = [g for g in groups if g.prunable][3]
    assert last_conv.consumers[0].block == block


def test_residual_add_couples_producers_pruned_only_with_scope_all(tmp_path):
    path = export(randomise_bn(TinyResidual()), tmp_path / "res.onnx")
    model, view, groups = groups_of(path)
    by_size = {g.size: g for g in groups}
    inner, stream = by_size[12], by_size[8]
    assert inner.prunable and not inner.coupling  # the channel inside the block
    assert stream.prunable and len(stream.producers) == 2 and "residual" in stream.coupling
    x, _ = make_data(4)
    internal = prune(view, to_torch(model.proto), groups, x, PruneConfig(ratio=0.5))
    assert [o.group for o in internal.outcomes] == [inner.id]
    assert "--scope all" in internal.skipped[stream.id]
    full = prune(view, to_torch(model.proto), groups, x, PruneConfig(ratio=0.5, scope="all"))
    out = slim(model.proto, groups, full.kept, full.layers)
    conv_w = [tuple(i.dims[:2]) for i in out.graph.initializer if len(i.dims) == 4]
    assert sorted(conv_w) == sorted([(4, 1), (6, 4), (4, 6)])  # stem, inner, the conv closing the block
    assert check_slim(out, full.student, x, ["logits"]) < 1e-5


def test_exclude_leaves_matching_groups_whole(vgg_path):
    model, view, groups = groups_of(vgg_path)
    x, _ = make_data(3)
    result = prune(view, to_torch(model.proto), groups, x, PruneConfig(ratio=0.5, exclude=("*Gemm*",)))
    skipped = {g.size for g in groups if "--exclude" in result.skipped.get(g.id, "")}
    assert skipped == {16, 24}  # the last conv's group (read by fc1) and fc1's own
    assert [len(o.kept) for o in result.outcomes] == [4, 4, 8]


def test_channels_last_matmul_mlp(tmp_path):
    """Linear layers on NHWC data: the hidden channels sit on the last axis, MatMul refit without bias."""
    path = export(TinyChannelsLast(), tmp_path / "mlp.onnx")
    model, view, groups = groups_of(path)
    hidden = next(g for g in groups if g.size == 32)
    assert hidden.prunable and [view.nodes[c.node].op_type for c in hidden.consumers] == ["MatMul"]
    stream = next(g for g in groups if g.size == 8)  # the residual stream, across both Transposes
    assert stream.prunable and len(stream.producers) == 2 and stream.coupling
    x, _ = make_data(4)
    result = prune(view, to_torch(model.proto), groups, x, PruneConfig(ratio=0.5))
    assert [(o.group, len(o.kept)) for o in result.outcomes] == [(hidden.id, 16)]
    out = slim(model.proto, groups, result.kept, result.layers)
    shapes = {tuple(i.dims) for i in out.graph.initializer}
    assert {(8, 16), (16,), (16, 8)} <= shapes and not {(8, 32), (32, 8)} & shapes
    assert check_slim(out, result.student, x, ["logits"]) < 1e-5
    result = prune(view, to_torch(model.proto), groups, x, PruneConfig(ratio=0.5, scope="all"))
    assert {o.group for o in result.outcomes} == {hidden.id, stream.id}
    assert check_slim(slim(model.proto, groups, result.kept, result.layers), result.student, x, ["logits"]) < 1e-5


def test_depthwise_and_squeeze_excitation(tmp_path):
    """Depthwise convs carry channels through; an SE gate makes its last conv a second producer."""
    path = export(randomise_bn(TinyMobile()), tmp_path / "mobile.onnx")
    model, view, groups = groups_of(path)
    expand = next(g for g in groups if g.size == 24)
    assert expand.prunable and len(expand.producers) == 2 and len(expand.group_attrs) == 1
    assert [view.nodes[c.node].op_type for c in expand.consumers] == ["Conv", "Conv"]  # SE squeeze, project
    x, _ = make_data(4)
    result = prune(view, to_torch(model.proto), groups, x, PruneConfig(ratio=0.5, scope="all"))
    assert len(result.outcomes) == sum(g.prunable for g in groups) == 4
    out = slim(model.proto, groups, result.kept, result.layers)
    dw = next(n for n in out.graph.node if any(a.name == "group" and a.i > 1 for a in n.attribute))
    assert next(a.i for a in dw.attribute if a.name == "group") == 12
    assert check_slim(out, result.student, x, ["logits"]) < 1e-5


def test_a_grouped_conv_is_cut_in_whole_groups(tmp_path):
    """ResNeXt/RegNet: the channels into a grouped 3x3 and out of it go a group at a time, the
    conv keeps its group width and loses groups, and the 1x1 after it is refit on whole groups."""
    torch.manual_seed(0)
    path = export(randomise_bn(TinyGrouped()), tmp_path / "grouped.onnx")
    model, view, groups = groups_of(path)
    inner = next(g for g in groups if g.unit > 1)
    assert inner.prunable and (inner.size, inner.unit, inner.channels) == (4, 4, 16)
    assert [view.nodes[c.node].op_type for c in inner.consumers] == ["Conv"] and inner.consumers[0].block == 4
    x, _ = make_data(4)
    result = prune(view, to_torch(model.proto), groups, x, PruneConfig(ratio=0.5))
    kept = dict((o.group, o.kept) for o in result.outcomes)[inner.id]
    assert len(kept) == 2  # two of the four groups of 4
    out = slim(model.proto, groups, result.kept, result.layers)
    grouped = next(n for n in out.graph.node if any(a.name == "group" and a.i > 1 for a in n.attribute))
    assert next(a.i for a in grouped.attribute if a.name == "group") == 2
    assert tuple(next(i for i in out.graph.initializer if i.name == grouped.input[1]).dims) == (8, 4, 3, 3)
    assert check_slim(out, result.student, x, ["logits"]) < 1e-5
    before, after = (sum(c.flops for c in layer_costs(v)) for v in (view, GraphView(out)))
    assert after < 0.75 * before


def test_a_grouped_conv_whose_groups_straddle_two_producers_is_left_whole(tmp_path):
    torch.manual_seed(0)
    _, _, groups = groups_of(export(randomise_bn(TinyGrouped(split=True)), tmp_path / "straddle.onnx"))
    six = next(g for g in groups if g.channels == 6)
    assert not six.prunable and "groups of 4 channels" in six.reason and "do not line up" in six.reason


@pytest.mark.parametrize("exporter", ["torchscript", "torchscript-dynamic-size", "dynamo"])
def test_group_norm_is_cut_in_whole_groups(tmp_path, exporter):
    """GroupNorm (Reshape to groups, InstanceNormalization, Reshape back): channels go a whole
    normalisation group at a time, so the groups kept see the statistics they had; the group
    count, the norm's per-group parameters and a written-out shape back are edited."""
    path = tmp_path / "gn.onnx"
    if exporter == "dynamo":
        export_dynamo(TinyGroupNorm(), path)
    else:
        export(TinyGroupNorm(), path, dynamic_size=exporter == "torchscript-dynamic-size")
    model, view, groups = groups_of(path)
    assert all(g.prunable for g in groups[:-1]), [g.reason for g in groups]
    assert sorted((g.channels, g.unit) for g in groups[:-1]) == [(8, 4), (8, 4), (16, 4), (24, 8)]
    x, _ = make_data(4)
    result = prune(view, to_torch(model.proto), groups, x, PruneConfig(ratio=0.5, scope="all"))
    assert len(result.kept) == 4
    out = slim(model.proto, groups, result.kept, result.layers)
    out_view = GraphView(out)
    norms = [(int(out_view.const(n.input[1])[1]), out_view.const(out_view.consumers[n.output[0]][0].input[1]).shape)
             for n in out.graph.node if n.op_type == "Reshape" and out_view.consumers[n.output[0]][0].op_type
             == "InstanceNormalization"]  # (group count, length of the norm's scale) per GroupNorm
    kept: dict[int, list[int]] = {}  # channels before -> groups kept, per channel group of that width
    for g in groups[:-1]:
        kept.setdefault(g.channels, []).append(len(result.kept[g.id]))
    residual, concat, head = kept[16][0], sum(kept[8]), kept[24][0]  # n0 and na share the residual's
    assert sorted(norms) == sorted((k, (k,)) for k in (residual, residual, concat, head))
    assert check_slim(out, result.student, x, ["logits"]) < 1e-5


def test_group_norm_groups_straddling_two_producers_are_left_whole(tmp_path):
    _, _, groups = groups_of(export(TinyGroupNorm(straddle=True), tmp_path / "straddle.onnx"))
    six = next(g for g in groups if g.channels == 6)
    assert not six.prunable and "GroupNorm" in six.reason and "groups of 4 channels" in six.reason
    assert next(g for g in groups if g.channels == 24).prunable  # the GroupNorm after it is whole


def test_a_group_norm_of_one_group_leaves_its_channels_whole(tmp_path):
    """GroupNorm(1, C) (PoolFormer's norm) computes its statistics over every channel: none can go
    without changing the rest, so the group is frozen, not listed as prunable and then skipped."""
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.GroupNorm(1, 16), nn.ReLU(), nn.Conv2d(16, 8, 3),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    _, _, groups = groups_of(export(model, tmp_path / "gn1.onnx"))
    one = next(g for g in groups if g.producers == ["/0/Conv"])
    assert not one.prunable and "takes all 16 of these channels as one group" in one.reason
    assert next(g for g in groups if g.producers == ["/3/Conv"]).prunable


class TinyAudio(torch.nn.Module):
    """A 1-D CNN over a waveform or series: strided and dilated Conv1d, BatchNorm1d, a depthwise
    Conv1d, pooling, mean over time, classifier."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.f = nn.Sequential(nn.Conv1d(1, 16, 9, padding=4), nn.BatchNorm1d(16), nn.ReLU(), nn.MaxPool1d(2),
                               nn.Conv1d(16, 24, 5, padding=4, dilation=2), nn.BatchNorm1d(24), nn.ReLU(),
                               nn.Conv1d(24, 24, 3, padding=1, groups=24), nn.ReLU(),
                               nn.Conv1d(24, 32, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        return self.fc(self.f(x).mean(-1))


def test_one_dimensional_convs_are_pruned_and_refit(tmp_path):
    """Conv1d consumers are refit as 2-D convs of height 1 (their patches unfolded the same way)."""
    torch.manual_seed(0)
    path = export(randomise_bn(TinyAudio()), tmp_path / "audio.onnx", shape=(1, 1, 64))
    model, view, groups = groups_of(path)
    assert sorted(g.size for g in groups if g.prunable) == [16, 24, 32]  # all but the classifier
    twin = to_torch(model.proto)
    for c in (c for g in groups for c in g.consumers if c.kind == "conv"):  # patches, as the conv sees them
        conv = twin.layer(c.node)
        inp = torch.randn(2, conv.in_channels, 32)
        rows = consumer_rows(view, c, inp)[:, :-1]
        mat = conv.weight.detach().reshape(conv.out_channels, -1).T
        expected = conv(inp).detach().transpose(1, 2).reshape(-1, conv.out_channels) - conv.bias.detach()
        assert torch.allclose(rows @ mat, expected, atol=1e-5), c.node
    x = np.random.default_rng(0).standard_normal((24, 1, 64)).astype(np.float32)
    result = prune(view, twin, groups, x, PruneConfig(ratio=0.5))
    assert len(result.outcomes) == 3
    out = slim(model.proto, groups, result.kept, result.layers)
    assert check_slim(out, result.student, x, ["logits"]) < 1e-5
    before, after = (sum(c.flops for c in layer_costs(v)) for v in (view, GraphView(out)))
    assert after < 0.4 * before
    # the refit is a real fit: the consumer sees the teacher's outputs better than the plain cut
    plain = prune(view, to_torch(model.proto), groups, x, PruneConfig(ratio=0.5, method="l1"))
    teacher = run_torch(to_torch(model.proto), x)[0]
    assert relative_squared_error(teacher, run_torch(result.student, x)[0]) < \
        relative_squared_error(teacher, run_torch(plain.student, x)[0])


class TinyUpsampler(torch.nn.Module):
    """A U-Net decoder step: a ConvTranspose upsampling a conv's channels, then a head conv;
    `overlap` makes the upsampler's patches overlap (kernel 4, stride 2, padding 1)."""

    def __init__(self, overlap: bool = False):
        super().__init__()
        nn = torch.nn
        self.down = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2))
        self.up = nn.ConvTranspose2d(16, 8, 4, 2, 1) if overlap else nn.ConvTranspose2d(16, 8, 2, 2)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        return self.head(torch.relu(self.up(self.down(x))))


def test_a_convtranspose_with_separate_patches_is_refit(tmp_path):
    torch.manual_seed(0)
    path = export(randomise_bn(TinyUpsampler()), tmp_path / "up.onnx")
    model, view, groups = groups_of(path)
    down = next(g for g in groups if g.channels == 16)
    assert down.prunable and [c.kind for c in down.consumers] == ["deconv"]
    twin = to_torch(model.proto)
    up = twin.layer(down.consumers[0].node)
    inp = torch.randn(2, 16, 5, 7)
    rows = consumer_rows(view, down.consumers[0], inp)[:, :-1]  # each input pixel's patch, as the layer writes it
    patches = (rows @ up.weight.detach().reshape(16, -1)).reshape(2, 5, 7, 8, 2, 2)
    expected = (up(inp).detach() - up.bias.detach()[:, None, None]).reshape(2, 8, 5, 2, 7, 2)
    assert torch.allclose(patches.permute(0, 3, 1, 4, 2, 5), expected, atol=1e-5)
    x, _ = make_data(4)
    result = prune(view, twin, groups, x, PruneConfig(ratio=0.5, scope="all"))
    assert {g.channels: len(result.kept[g.id]) for g in groups if g.id in result.kept} == {16: 8, 8: 4}
    out = slim(model.proto, groups, result.kept, result.layers)
    assert check_slim(out, result.student, x, ["logits"]) < 1e-5
    _, _, overlapping = groups_of(export(randomise_bn(TinyUpsampler(overlap=True)), tmp_path / "overlap.onnx"))
    frozen = next(g for g in overlapping if g.channels == 16)
    assert not frozen.prunable and "overlapping" in frozen.reason


class ImagePooling(torch.nn.Module):
    """DeepLab's ASPP image pooling: pooled to 1x1, a conv, then interpolated back to the input's
    size (the TorchScript exporter builds the Resize's sizes from the pooled tensor's own shape)."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU())
        self.b = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 8, 1), nn.ReLU())
        self.project = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.stem(x)
        pooled = nn_f.interpolate(self.b(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.fc(torch.relu(self.project(torch.cat([self.a(x), pooled], 1))).mean((2, 3)))


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo", "dynamo-batch-1"])
def test_a_resize_to_the_size_of_another_tensor_follows_the_pruned_width(tmp_path, exporter):
    """F.interpolate(x, size=...): the TorchScript exporter reads the channel count from the
    pooled tensor's shape (Slice of Shape), the dynamo exporter too (Shape with start and end),
    or, with the batch fixed, writes the sizes as a constant whose channel entry is edited."""
    torch.manual_seed(0)
    path = tmp_path / "aspp.onnx"
    if exporter == "torchscript":
        export(ImagePooling(), path)
    else:
        export_dynamo(ImagePooling(), path, dynamic_batch=exporter == "dynamo")
    model, view, groups = groups_of(path)
    resize = next(n for n in model.proto.graph.node if n.op_type == "Resize")
    assert view.is_const(resize.input[3]) == (exporter == "dynamo-batch-1")
    pooled = next(g for g in groups if resize.name in {e.node for e in g.shape_edits} or
                  resize.input[0] in g.tensors)
    assert pooled.prunable, pooled.reason
    x, _ = make_data(4)
    twin = to_torch(model.proto, batch=1 if exporter == "dynamo-batch-1" else None)
    result = prune(view, twin, groups, x, PruneConfig(ratio=0.5, scope="all"))
    assert pooled.id in result.kept
    out = slim(model.proto, groups, result.kept, result.layers)
    assert check_slim(out, result.student, x, [o.name for o in model.proto.graph.output]) < 1e-5


class ScaledChannels(torch.nn.Module):
    """Per-channel constants multiplied into NCHW activations, shaped (1, C, 1, 1) and (C, 1, 1):
    a batch norm written as Mul by Keras through tf2onnx, or a hand-written scale."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.Conv2d(8, 4, 3, padding=1)
        self.scale4 = torch.nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5)
        self.shift3 = torch.nn.Parameter(torch.randn(8, 1, 1))

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x)) * self.scale4 + self.shift3).mean((2, 3))


def test_per_channel_constants_on_nchw_are_sliced(tmp_path):
    torch.manual_seed(0)
    model, view, groups = groups_of(export(ScaledChannels(), tmp_path / "scaled.onnx"))
    first = next(g for g in groups if g.prunable)
    constants = {(view.nodes[s.node].op_type, s.axis) for s in first.slices if view.nodes[s.node].op_type != "Conv"}
    assert constants == {("Mul", 1), ("Add", 0)}
    x, _ = make_data(2)
    result = prune(view, to_torch(model.proto), groups, x, PruneConfig(ratio=0.5))
    assert check_slim(slim(model.proto, groups, result.kept, result.layers), result.student, x, ["logits"]) < 1e-5


class SqueezedSE(torch.nn.Module):
    """A squeeze-excitation block and a head as Keras models come out of tf2onnx: a global pool,
    Squeeze of the spatial axes, then Unsqueeze or Reshape back to (N, C, 1, 1)."""

    def __init__(self):
        super().__init__()
        conv = torch.nn.Conv2d
        self.stem, self.expand, self.project = conv(1, 8, 3, padding=1), conv(8, 16, 1), conv(16, 8, 1)
        self.se_reduce, self.se_expand, self.fc = conv(16, 4, 1), conv(4, 16, 1), torch.nn.Linear(8, 10)

    def forward(self, x):
        h = torch.relu(self.expand(torch.relu(self.stem(x))))
        s = h.mean((2, 3), keepdim=True).squeeze(3).squeeze(2)  # (N, 16)
        s = torch.relu(self.se_reduce(s.unsqueeze(-1).unsqueeze(-1)))
        s = torch.sigmoid(self.se_expand(s.flatten(1).reshape(-1, 4, 1, 1)))
        y = self.project(h * s)
        return self.fc(y.mean((2, 3), keepdim=True).squeeze(-1).squeeze(-1))


def test_squeezed_pools_and_reshapes_back_carry_channels(tmp_path):
    torch.manual_seed(0)
    model, view, groups = groups_of(export(SqueezedSE(), tmp_path / "se.onnx"))
    ops = {n.op_type for n in model.proto.graph.node}
    assert {"Squeeze", "Unsqueeze", "Reshape"} <= ops
    assert sorted(g.size for g in groups if g.prunable) == [4, 8, 8, 16]  # all but the classifier
    x, _ = make_data(2)
    result = prune(view, to_torch(model.proto), groups, x, PruneConfig(ratio=0.5, scope="all"))
    out = slim(model.proto, groups, result.kept, result.layers)
    reshape = next(n for n in out.graph.node if n.op_type == "Reshape")
    assert list(GraphView(out).const(reshape.input[1])) == [-1, 2, 1, 1]
    assert check_slim(out, result.student, x, ["logits"]) < 1e-5


class SplitBlock(torch.nn.Module):
    """A CSP / YOLO C2f block without its shortcut: one conv's channels split in two parts, one
    part through a bottleneck, both concatenated for the next conv."""

    def __init__(self):
        super().__init__()
        conv = torch.nn.Conv2d
        self.stem, self.cv1, self.inner = conv(1, 8, 3, padding=1), conv(8, 16, 1), conv(6, 6, 3, padding=1)
        self.cv2, self.fc = conv(16, 8, 1), torch.nn.Linear(8, 10)

    def forward(self, x):
        a, b = torch.relu(self.cv1(torch.relu(self.stem(x)))).split((10, 6), 1)
        y = torch.relu(self.cv2(torch.cat([a, torch.relu(self.inner(b))], 1)))
        return self.fc(y.mean((2, 3)))


def test_a_channel_split_divides_its_producer_into_one_group_per_part(tmp_path):
    torch.manual_seed(0)
    model, view, groups = groups_of(export(SplitBlock(), tmp_path / "split.onnx"))
    parts = [g for g in groups if g.producers == ["/cv1/Conv"]]
    assert [(g.size, g.prunable) for g in parts] == [(10, True), (6, True)]
    assert {s.offset for g in parts for s in g.slices if s.node == "/cv1/Conv"} == {0, 10}
    x, _ = make_data(2)
    result = prune(view, to_torch(model.proto), groups, x, PruneConfig(ratio=0.5, scope="all"))
    out = slim(model.proto, groups, result.kept, result.layers)
    split = next(n for n in out.graph.node if n.op_type == "Split")
    assert list(GraphView(out).const(split.input[1])) == [len(result.kept[g.id]) for g in parts] == [5, 3]
    assert check_slim(out, result.student, x, ["logits"]) < 1e-5


class RepeatedConcat(torch.nn.Module):
    """YOLOv8's C2f with its shortcut and an SPPF-style pool: one part of a split reaches the
    final Concat three times (itself, plus the bottleneck's residual sum, plus that sum pooled)."""

    def __init__(self):
        super().__init__()
        conv = torch.nn.Conv2d
        self.stem, self.cv1, self.cv2 = conv(1, 8, 3, padding=1), conv(8, 16, 1), conv(32, 8, 1)
        self.inner = torch.nn.Sequential(conv(8, 8, 3, padding=1), torch.nn.ReLU(), conv(8, 8, 3, padding=1))
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x):
        a, b = torch.relu(self.cv1(torch.relu(self.stem(x)))).split((8, 8), 1)
        b2 = b + self.inner(b)
        y = torch.cat([a, b, b2, torch.nn.functional.max_pool2d(b2, 3, 1, 1)], 1)
        return self.fc(torch.relu(self.cv2(y)).mean((2, 3)))


def test_channels_a_concat_takes_several_times_are_cut_at_every_place(tmp_path):
    torch.manual_seed(0)
    model, view, groups = groups_of(export(RepeatedConcat(), tmp_path / "c2f.onnx"))
    repeated = next(g for g in groups if g.producers[0] == "/cv1/Conv" and g.slices[0].offset == 8)
    assert repeated.prunable and len(repeated.producers) == 2  # cv1's second part and the bottleneck's last conv
    assert next(c for c in repeated.consumers if c.node == "/cv2/Conv").offsets == (8, 16, 24)
    x, _ = make_data(2)
    result = prune(view, to_torch(model.proto), groups, x, PruneConfig(ratio=0.5, scope="all"))
    out = slim(model.proto, groups, result.kept, result.layers)
    cv2 = next(n for n in out.graph.node if n.name == "/cv2/Conv")
    assert GraphView(out).const(cv2.input[1]).shape[1] == 4 + 3 * 4
    assert check_slim(out, result.student, x, ["logits"]) < 1e-5


def test_channel_slices_that_part_a_tensor_are_cut_like_a_split(tmp_path):
    torch.manual_seed(0)
    model, view, groups = groups_of(export(ChunkBlock(), tmp_path / "chunk.onnx"))  # chunk -> two Slices
    assert sum(n.op_type == "Slice" for n in model.proto.graph.node) == 2
    parts = [g for g in groups if g.producers[0] == "/cv1/Conv"]
    assert [(g.size, g.prunable) for g in parts] == [(8, True), (8, True)]
    x, _ = make_data(2)
    result = prune(view, to_torch(model.proto), groups, x, PruneConfig(ratio=0.5, scope="all"))
    out = slim(model.proto, groups, result.kept, result.layers)
    bounds = [[int(GraphView(out).const(n.input[i])[0]) for i in (1, 2)] for n in out.graph.node if n.op_type == "Slice"]
    assert bounds == [[0, 4], [4, 8]]
    assert check_slim(out, result.student, x, ["logits"]) < 1e-5


class DualPath(torch.nn.Module):
    """DPN's dual-path block: a projection and the block's last conv are each sliced in two; the
    first parts are added (the residual path), the second parts concatenated (the dense path).
    The projection comes first, so the residual group reaches the last conv's Slice backward."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.stem, self.proj = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 20, 1)
        self.b, self.c = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 20, 1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        s = torch.relu(self.stem(x))
        p, out = self.proj(s), self.c(torch.relu(self.b(s)))
        residual, dense = p[:, :16] + out[:, :16], torch.cat([p[:, 16:], out[:, 16:]], 1)
        return self.fc(torch.relu(torch.cat([residual, dense], 1)).mean((2, 3)))


def test_a_slice_reached_from_its_output_claims_only_its_part_of_the_producer(tmp_path):
    torch.manual_seed(0)
    model, view, groups = groups_of(export(DualPath(), tmp_path / "dpn.onnx"))
    assert all(g.prunable for g in groups[:-1]), [g.reason for g in groups]
    residual = next(g for g in groups if len(g.producers) == 2)
    assert sorted(residual.producers) == ["/c/Conv", "/proj/Conv"] and residual.channels == 16
    parts = sorted((g.producers[0], g.channels, g.slices[0].offset) for g in groups if len(g.producers) == 1
                   and g.producers[0] in ("/c/Conv", "/proj/Conv"))
    assert parts == [("/c/Conv", 4, 16), ("/proj/Conv", 4, 16)]  # the rest of each, a group of its own
    x, _ = make_data(2)
    result = prune(view, to_torch(model.proto), groups, x, PruneConfig(ratio=0.5, scope="all"))
    assert residual.id in result.kept
    out = slim(model.proto, groups, result.kept, result.layers)
    c = next(n for n in out.graph.node if n.name == "/c/Conv")
    assert GraphView(out).const(c.input[1]).shape[0] == 8 + 2
    assert check_slim(out, result.student, x, ["logits"]) < 1e-5


class ConcatBranch(torch.nn.Module):
    """A residual Add whose branch ends in a Concat of two convs (MixNet's split pointwise convs);
    the stream's own conv comes first, so its group reaches the Concat from its output."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.stem, self.a, self.b = nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 8, 1), nn.Conv2d(16, 8, 1)
        self.head, self.fc = nn.Conv2d(16, 8, 3, padding=1), nn.Linear(8, 10)

    def forward(self, x):
        s = self.stem(x)
        h = torch.relu(s)
        y = torch.relu(s + torch.cat([self.a(h), self.b(h)], 1))
        return self.fc(torch.relu(self.head(y)).mean((2, 3)))


def test_a_concat_reached_from_its_output_divides_the_stream_along_its_inputs(tmp_path):
    torch.manual_seed(0)
    model, view, groups = groups_of(export(ConcatBranch(), tmp_path / "concat_branch.onnx"))
    assert all(g.prunable for g in groups[:-1]), [g.reason for g in groups]
    halves = sorted((g.producers, g.slices[0].offset) for g in groups if "/stem/Conv" in g.producers)
    assert halves == [(["/stem/Conv", "/a/Conv"], 0), (["/stem/Conv", "/b/Conv"], 8)]
    x, _ = make_data(2)
    result = prune(view, to_torch(model.proto), groups, x, PruneConfig(ratio=0.5, scope="all"))
    out = slim(model.proto, groups, result.kept, result.layers)
    stem = next(n for n in out.graph.node if n.name == "/stem/Conv")
    assert GraphView(out).const(stem.input[1]).shape[0] == 4 + 4
    assert check_slim(out, result.student, x, ["logits"]) < 1e-5


class GhostModule(torch.nn.Module):
    """GhostNet's module: a conv, a depthwise conv of its output, both concatenated and sliced to
    `out` channels. The Concat holds the conv's channels twice (directly and through the
    depthwise conv); with `out` the full width the Slice keeps both places, else it cuts one."""

    def __init__(self, out: int = 16):
        super().__init__()
        nn = torch.nn
        self.out = out
        self.primary = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.cheap = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU())
        self.head, self.fc = nn.Conv2d(out, 8, 3, padding=1), nn.Linear(8, 10)

    def forward(self, x):
        p = self.primary(x)
        g = torch.cat([p, self.cheap(p)], 1)[:, :self.out]
        return self.fc(torch.relu(self.head(g)).mean((2, 3)))


def test_a_slice_that_keeps_every_place_of_repeated_channels_passes_them_on(tmp_path):
    torch.manual_seed(0)
    model, view, groups = groups_of(export(GhostModule(), tmp_path / "ghost.onnx"))
    primary = next(g for g in groups if g.producers == ["/primary/primary.0/Conv"])
    assert primary.prunable and next(c for c in primary.consumers if c.node == "/head/Conv").offsets == (0, 8)
    x, _ = make_data(2)
    result = prune(view, to_torch(model.proto), groups, x, PruneConfig(ratio=0.5, scope="all"))
    out = slim(model.proto, groups, result.kept, result.layers)
    head = next(n for n in out.graph.node if n.name == "/head/Conv")
    assert GraphView(out).const(head.input[1]).shape[1] == 2 * 4
    assert check_slim(out, result.student, x, ["logits"]) < 1e-5
    _, _, groups = groups_of(export(GhostModule(out=15), tmp_path / "ghost15.onnx"))  # cuts the second place
    cut = next(g for g in groups if g.producers == ["/primary/primary.0/Conv"])
    assert not cut.prunable and "keeps only some of the places" in cut.reason


def test_unknown_operator_freezes_instead_of_failing(vgg_path, tmp_path):
    proto = onnx.load(str(vgg_path))
    relu = next(n for n in proto.graph.node if n.op_type == "Relu")
    relu.op_type, relu.domain = "Mystery", "com.example"
    proto.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    path = tmp_path / "custom.onnx"
    onnx.save(proto, str(path))
    model = load_model(path)
    groups = find_groups(GraphView(model.proto))
    frozen = [g for g in groups if "Mystery" in g.reason]
    assert len(frozen) == 1 and any(g.prunable for g in groups)


@pytest.fixture(scope="module")
def pruned(vgg_path):
    model, view, groups = groups_of(vgg_path)
    x, _ = make_data(4)
    result = prune(view, to_torch(model.proto), groups, x, PruneConfig(ratio=0.5))
    return model, groups, result, x


def test_slim_is_physically_smaller_and_equal_to_masked(pruned):
    model, groups, result, x = pruned
    out = slim(model.proto, groups, result.kept, result.layers)
    before = {i.name: tuple(i.dims) for i in model.proto.graph.initializer}
    after = {i.name: tuple(i.dims) for i in out.graph.initializer}
    assert sum(np.prod(d) for d in after.values()) < 0.5 * sum(np.prod(d) for d in before.values())
    conv_w = [i for i in out.graph.initializer if len(i.dims) == 4]
    assert [tuple(w.dims[:2]) for w in conv_w] == [(4, 1), (4, 4), (8, 4), (8, 8)]
    assert check_slim(out, result.student, x, ["logits"]) < 1e-5


def test_signature_and_dynamic_axes_preserved(pruned):
    model, groups, result, _ = pruned
    out = slim(model.proto, groups, result.kept, result.layers)
    assert signature(out) == signature(model.proto)
    assert out.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert out.opset_import == model.proto.opset_import
    onnx.checker.check_model(out, full_check=True)


def test_verification_fails_on_wrong_slicing(pruned):
    model, groups, result, x = pruned
    wrong = dict(result.kept)
    first = next(iter(wrong))
    size = groups[first].size
    wrong[first] = np.setdiff1d(np.arange(size), wrong[first])[: len(wrong[first])]  # other channels
    out = slim(model.proto, groups, wrong, result.layers)
    with pytest.raises(VerificationError, match="masked student"):
        check_slim(out, result.student, x, ["logits"])


def test_shared_initializer_is_not_sliced_for_its_other_user(vgg_path, tmp_path):
    """BN 0 (pruned) and BN 1 (left whole) share one variance tensor: only BN 0's copy shrinks."""
    proto = onnx.load(str(vgg_path))
    bn0, bn1 = [n for n in proto.graph.node if n.op_type == "BatchNormalization"][:2]
    bn1.input[4] = bn0.input[4]
    shared = tmp_path / "shared.onnx"
    onnx.save(proto, str(shared))
    model, view, groups = groups_of(shared)
    for g in groups[1:]:
        g.reason = "left whole by the test"
    x, _ = make_data(4)
    result = prune(view, to_torch(model.proto), groups, x, PruneConfig(ratio=0.5))
    out = slim(model.proto, groups, result.kept, result.layers)
    var_shapes = sorted(tuple(i.dims) for i in out.graph.initializer if i.name.startswith(bn0.input[4]))
    assert var_shapes == [(4,), (8,)]
    assert check_slim(out, result.student, x, ["logits"]) < 1e-5


@pytest.mark.parametrize("method,solver", [("cross", "closed"), ("layerwise", "closed"), ("soft", "closed"),
                                           ("l1", "closed"), ("cross", "pgd")])
def test_every_method_exports_equivalently(vgg_path, method, solver):
    model, view, groups = groups_of(vgg_path)
    x, _ = make_data(3)
    config = PruneConfig(ratio=0.5, method=method, solver=solver, pgd_iters=60)
    result = prune(view, to_torch(model.proto), groups, x, config)
    assert [len(o.kept) for o in result.outcomes] == [4, 4, 8, 8, 12]
    out = slim(model.proto, groups, result.kept, result.layers)
    assert check_slim(out, result.student, x, ["logits"]) < 1e-4


def test_teacher_grams_shared_between_candidates_change_nothing(vgg_path, monkeypatch):
    """What one candidate's walk leaves in the cache serves the next: the same channels and
    weights as computed afresh, and no Gram matrix of the teacher's inputs is summed again."""
    from pipeline.prune import stats

    model, view, groups = groups_of(vgg_path)
    x, _ = make_data(3)
    teacher = to_torch(model.proto)
    summed = []
    made = stats.Accumulator.__init__
    monkeypatch.setattr(stats.Accumulator, "__init__",
                        lambda self, dim, grams, device: (summed.extend(grams), made(self, dim, grams, device))[1])
    cache = TeacherGrams()
    prune(view, teacher, groups, x, PruneConfig(method="cross", mu=0.3), cache=cache)
    assert "tt" in summed
    for method in ("cross", "soft", "layerwise"):
        fresh = prune(view, teacher, groups, x, PruneConfig(method=method))
        summed.clear()
        shared = prune(view, teacher, groups, x, PruneConfig(method=method), cache=cache)
        assert "tt" not in summed
        for a, b in zip(fresh.outcomes, shared.outcomes):
            assert a.kept.tolist() == b.kept.tolist()
        for node, layer in fresh.layers.items():
            np.testing.assert_allclose(shared.layers[node].weight, layer.weight, rtol=1e-5, atol=1e-6)
    empty = TeacherGrams(budget=0)
    prune(view, teacher, groups, x, PruneConfig(), cache=empty)
    assert empty.get(next(iter(fresh.layers)), PruneConfig()) is None


@pytest.mark.parametrize("dims", [1, 7, 33, 600])  # 600: three of mirror's blocks, the last one short
def test_symmetric_gram_from_its_upper_blocks(dims):
    a = torch.randn(50, dims)
    total = torch.zeros(dims, dims, dtype=torch.float64)
    add_gram(total, a, a)
    add_gram(total, a, a)
    full = mirror(total)
    assert torch.equal(full, full.T)
    torch.testing.assert_close(full, 2 * (a.T @ a).double(), rtol=1e-5, atol=1e-4)


def test_contrib_operator_freezes_its_groups_and_the_run_goes_on(vgg_path, tmp_path, npz_path):
    """com.microsoft.Gelu: no onnx2torch converter, unknown to the analysis; onnxruntime runs it."""
    from pipeline import CompressOptions, compress

    proto = onnx.load(str(vgg_path))
    act = [n for n in proto.graph.node if n.op_type in ("Relu", "Clip")][1]
    act.op_type, act.domain, act.name = "Gelu", "com.microsoft", "contrib_gelu"
    del act.input[1:]
    proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    path = tmp_path / "contrib.onnx"
    onnx.save(proto, str(path))
    report = compress(path, CompressOptions(data=npz_path, shots=2, providers=[], augment="none"),
                      tmp_path / "slim.onnx").report
    assert report["parity"]["run_by_onnxruntime"] == ["contrib_gelu"]
    frozen = [g for g in report["groups"] if g["reason"] and "com.microsoft.Gelu" in g["reason"]]
    assert len(frozen) == 1 and frozen[0]["channels_after"] == frozen[0]["channels_before"]
    assert any(g["channels_after"] < g["channels_before"] for g in report["groups"])
    assert report["parity"]["slim_vs_masked_student"] < 1e-4


def test_flops_target_allocates_non_uniform_widths_and_meets_it(vgg_path):
    from pipeline.search.allocate import FlopsModel, allocate, curves

    model, view, groups = groups_of(vgg_path)
    x, _ = make_data(3)
    teacher = to_torch(model.proto)
    config = PruneConfig()
    flops = FlopsModel(view, groups)
    alloc = allocate(curves(view, teacher, groups, x, config), flops, target_share=0.3)
    full = {g.id: g.size for g in groups}
    assert 0.25 < alloc.share <= 0.3  # one channel past the target at most, on a tiny model
    assert flops.cost({**full, **alloc.keep}) == pytest.approx(alloc.share * flops.cost(full))
    assert len({alloc.keep[g] / full[g] for g in alloc.keep}) > 1  # not one ratio for all
    result = prune(view, teacher, groups, x, config, keep=alloc.keep)
    out = slim(model.proto, groups, result.kept, result.layers)
    after = sum(c.flops for c in layer_costs(GraphView(out)))
    assert after == pytest.approx(alloc.share * flops.cost(full), rel=1e-6)  # the cost model is exact
    assert check_slim(out, result.student, x, ["logits"]) < 1e-4


def test_removal_curves_are_scaled_to_what_each_group_does_to_the_output(vgg_path):
    """At the uniform width, a group's curve reads the output loss of pruning that group alone."""
    from pipeline.convert import run_torch
    from pipeline.search.allocate import curves

    model, view, groups = groups_of(vgg_path)
    x, _ = make_data(3)
    teacher = to_torch(model.proto)
    config = PruneConfig()
    c = curves(view, teacher, groups, x, config)
    reference = run_torch(teacher, x)[0].astype(np.float64)
    weights = []
    for g in c.groups:
        count = config.kept_count(g.size)
        alone = run_torch(prune(view, teacher, groups, x, config, keep={g.id: count}).student, x)[0]
        output_loss = np.mean((alone - reference) ** 2) / np.mean(reference ** 2)
        assert c.loss[g.id][g.size - count] == pytest.approx(output_loss, rel=1e-6)
        weights.append(output_loss)
    assert len(set(np.round(weights, 12))) == len(weights)  # groups differ in what they do to the output
