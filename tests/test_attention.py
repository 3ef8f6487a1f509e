"""Attention heads as channel groups: a ViT-B/16-shaped torchvision model and a BERT-style encoder
(transformers config, random weights, nothing downloaded) through the TorchScript exporter at
opsets 14 and 17 and through dynamo, a Hugging Face ViT at 17; hand-written blocks for what must
freeze with a reason."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from pipeline import load
from pipeline.analyze import find_groups
from pipeline.cli import main
from pipeline.flops import SOFTMAX_OPS, layer_costs
from pipeline.graph import GraphView
from tests.zoo import TOKENS, HFClassifier, export_sequence, export_transformer

EXPORTERS = [14, 17, None]  # None: dynamo


class Block(nn.Module):
    """A hand-written encoder block with a fused q/k/v Linear, and the variants the analysis
    must leave whole: rotary embeddings, a bias per head (ALiBi), the weights returned."""

    def __init__(self, variant: str = "", width: int = 64, heads: int = 4, features: int = 12):
        super().__init__()
        torch.manual_seed(0)
        self.variant, self.heads = variant, heads
        self.embed = nn.Linear(features, width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc1, self.fc2, self.head = nn.Linear(width, 2 * width), nn.Linear(2 * width, width), nn.Linear(width, 5)
        self.bias = nn.Parameter(torch.randn(1, heads, TOKENS, TOKENS))

    def forward(self, x):
        b, t, _ = x.shape
        h = self.embed(x)
        q, k, v = (p.reshape(b, t, self.heads, -1).transpose(1, 2) for p in self.qkv(h).chunk(3, -1))
        if self.variant == "rotary":
            q, k = (torch.cat([p[..., ::2] - p[..., 1::2], p[..., 1::2] + p[..., ::2]], -1) for p in (q, k))
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        if self.variant == "alibi":
            scores = scores + self.bias
        weights = scores.softmax(-1)
        h = h + self.out((weights @ v).transpose(1, 2).reshape(b, t, -1))
        y = self.head((h + self.fc2(torch.relu(self.fc1(h)))).mean(1))
        return (y, weights) if self.variant == "weights" else y


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def export(model: nn.Module, x: torch.Tensor, path, opset: int | None, name: str, free_tokens: bool = False):
    outputs = ("logits", "weights") if getattr(model, "variant", "") == "weights" else ("logits",)
    return export_sequence(model, x, path, opset, name, free_tokens, outputs)


def heads_of(path) -> list:
    return [g for g in find_groups(GraphView(load.load_model(path).proto)) if g.attention is not None]


def bert(tmp_path) -> Path:
    """The BERT-style encoder at opset 17, its token axis free."""
    return export(HFClassifier("bert"), torch.randint(0, 1000, (2, TOKENS)), tmp_path / "b.onnx", 17, "input_ids",
                  free_tokens=True)


def half(path, data: np.ndarray, tmp_path, *extra) -> dict:
    """`compress --scope all --ratio 0.5` on 12 of `data`, unbenchmarked: the report."""
    np.savez(tmp_path / "x.npz", x=data)
    res = run("compress", path, "--data", tmp_path / "x.npz", "--samples", 12, "--scope", "all", "--ratio", 0.5,
              *extra, "--no-bench", "--min-fidelity", 0, "--quiet", "-o", tmp_path / "slim.onnx",
              "--report", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    return json.loads((tmp_path / "r.json").read_text())


CASES = [("vit_b16_shaped", opset) for opset in EXPORTERS] + [("bert", opset) for opset in EXPORTERS] + [("hf_vit", 17)]
SHAPES = {"vit_b16_shaped": (12, 64, 5), "bert": (4, 64, TOKENS), "hf_vit": (3, 64, 17)}  # heads, head_dim, tokens


@pytest.mark.parametrize("arch,opset", CASES, ids=[f"{a}-{o or 'dynamo'}" for a, o in CASES])
def test_heads_are_groups_and_half_of_them_go(arch, opset, tmp_path):
    rng = np.random.default_rng(0)
    heads, width, tokens = SHAPES[arch]
    data = rng.integers(0, 1000, (16, TOKENS)) if arch == "bert" else rng.standard_normal((16, 3, 32, 32))
    path, blocks = export_transformer(arch, tmp_path / "m.onnx", opset), 2
    found = heads_of(path)
    assert len(found) == blocks and all(g.size == heads and g.prunable for g in found)
    rep = half(path, data if arch == "bert" else data.astype(np.float32), tmp_path, "--method", "cross",
               "--augment", "none")
    cut = [g for g in rep["groups"] if g["heads"]]
    assert ([(g["channels_before"], g["channels_after"]) for g in cut]
            == [(heads * width, -(-heads // 2) * width)] * blocks)
    assert rep["parity"]["slim_vs_masked_student"] < 1e-4
    assert rep["totals"]["flops_after"] < 0.7 * rep["totals"]["flops_before"]  # hf_vit keeps 2 of its 3 heads
    layers = {row["node"]: row for row in rep["layers"]}
    for g in found:  # the output projection reads every token, also where the heads were merged into rows
        assert layers[g.consumers[0].node]["flops_before"] == 2 * tokens * (heads * width) ** 2
    slim = onnx.load(str(tmp_path / "slim.onnx"))
    assert load.signature(slim) == load.signature(onnx.load(str(path)))


def test_attention_flops_follow_the_formula(tmp_path):
    """QK^T and AV: 2 x heads x T x T x head_dim each; Softmax SOFTMAX_OPS per weight."""
    path = bert(tmp_path)
    view = GraphView(load.sized(load.load_model(path).proto, (TOKENS,)))
    costs = {c.node: c for c in layer_costs(view)}
    group = heads_of(path)[0]
    scores, softmax, values = (costs[n] for n in group.follows)
    h, d = group.size, group.unit
    assert scores.flops == values.flops == 2 * h * TOKENS * TOKENS * d
    assert softmax.flops == SOFTMAX_OPS * h * TOKENS * TOKENS
    assert costs[group.consumers[0].node].flops == 2 * TOKENS * (h * d) * 256


@pytest.mark.parametrize("opset", [17, None], ids=["17", "dynamo"])
def test_a_hand_written_block_with_fused_qkv_loses_heads_exactly(opset, tmp_path):
    path = export(Block(), torch.randn(2, TOKENS, 12), tmp_path / "m.onnx", opset, "x")
    (group,) = heads_of(path)
    assert group.attention.fused and group.size == 4
    rep = half(path, np.random.default_rng(0).standard_normal((16, TOKENS, 12)).astype(np.float32), tmp_path)
    assert rep["parity"]["slim_vs_masked_student"] < 1e-4
    assert [g["channels_after"] for g in rep["groups"] if g["heads"]] == [32]


@pytest.mark.parametrize("variant,reason", [("rotary", "between a projection and the attention is not understood"),
                                            ("alibi", "the mask differs from head to head"),
                                            ("weights", "graph output")])
def test_variants_not_understood_keep_their_heads_with_a_reason(variant, reason, tmp_path):
    path = export(Block(variant), torch.randn(2, TOKENS, 12), tmp_path / "m.onnx", 17, "x")
    assert not heads_of(path)
    groups = find_groups(GraphView(load.load_model(path).proto))
    qkv = next(g for g in groups if any("qkv" in p for p in g.producers))
    assert not qkv.prunable and reason in qkv.reason and "attention at Softmax" in qkv.reason
    rep = half(path, np.random.default_rng(0).standard_normal((16, TOKENS, 12)).astype(np.float32), tmp_path)
    assert rep["parity"]["slim_vs_masked_student"] < 1e-4


def test_a_custom_domain_attention_node_keeps_its_projections(tmp_path):
    """onnxruntime's com.microsoft.MultiHeadAttention in place of each BERT block's core: the
    channel analysis does not know the op, so the projections stay whole; onnxruntime runs it in
    the twin."""
    path = bert(tmp_path)
    proto = onnx.load(str(path))
    view = GraphView(proto)
    for k, group in enumerate(heads_of(path)):
        att = group.attention
        reader = view.nodes[att.out]
        reader.input[0] = f"mha_{k}"
        proto.graph.node.insert(list(proto.graph.node).index(reader), onnx.helper.make_node(
            "MultiHeadAttention", [att.q, att.k, att.v], [f"mha_{k}"], name=f"mha_{k}", domain="com.microsoft",
            num_heads=group.size))
    proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    from exporters.heads import drop_dead

    drop_dead(proto.graph)
    del proto.graph.value_info[:]
    onnx.save(proto, str(tmp_path / "custom.onnx"))
    assert not heads_of(tmp_path / "custom.onnx")
    groups = find_groups(GraphView(load.load_model(tmp_path / "custom.onnx").proto))
    query = next(g for g in groups if any("query" in p for p in g.producers))
    assert not query.prunable and "com.microsoft.MultiHeadAttention node 'mha_0'" in query.reason
    rep = half(tmp_path / "custom.onnx", np.random.default_rng(0).integers(0, 1000, (16, TOKENS)), tmp_path)
    assert rep["parity"]["slim_vs_masked_student"] < 1e-4 and rep["parity"]["run_by_onnxruntime"]
