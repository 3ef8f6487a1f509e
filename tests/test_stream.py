"""The one-walk pruning against the straightforward per-group capture (tests/oracle_prune.py):
the same kept channels and the same weights, on chains and on coupled groups."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import augment, prune
from pipeline.analyze import find_groups
from pipeline.convert import run_torch, to_torch
from pipeline.graph import GraphView
from pipeline.load import load_model, sized
from pipeline.prune import Job, PruneConfig, stats
from pipeline.prune.stream import Eval, Free, Plan, Visit
from tests.conftest import (ChunkBlock, TinyGroupNorm, TinyMobile, TinyResidual, TinyVGG, export, export_dynamo,
                            make_data, randomise_bn)
from tests.oracle_prune import prune_by_capture

DEMO = Path(__file__).resolve().parent.parent / "pipeline" / "assets" / "demo_vgg.onnx"


class CoupledBlock(torch.nn.Module):
    """Every coupling at once: a residual stream read at two depths, a channel Split of a conv into
    two groups, a Concat of those parts with another conv, and a Concat that takes one part twice."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(1, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(12, 16, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(12, 6, 3, padding=1)
        self.merge = nn.Conv2d(8 + 8 + 8 + 6, 12, 1)
        self.d = nn.Sequential(nn.Conv2d(12, 10, 3, padding=1), nn.ReLU(), nn.Conv2d(10, 12, 1))
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        s = self.stem(x)
        p, q = torch.split(self.a(s), [8, 8], 1)
        q = q + torch.relu(self.b(q))
        s = torch.relu(s + self.merge(torch.cat([p, q, q, torch.relu(self.c(s))], 1)))
        s = torch.relu(s + self.d(s))
        return self.fc(s.mean((2, 3)))


def _setup(path: Path, shape=(1, 16, 16)):
    model = load_model(path)
    view = GraphView(sized(model.proto, shape))
    return view, to_torch(model.proto), find_groups(view)


def _same(a, b, rtol: float = 1e-6) -> None:
    assert [o.group for o in a.outcomes] == [o.group for o in b.outcomes]
    for x, y in zip(a.outcomes, b.outcomes):
        assert x.kept.tolist() == y.kept.tolist(), x.group
    assert a.layers.keys() == b.layers.keys()
    for node, layer in a.layers.items():
        ref = b.layers[node].weight
        assert np.abs(layer.weight - ref).max() <= rtol * np.abs(ref).max(), node


MODELS = {"chain": (TinyVGG, "internal"), "residual": (TinyResidual, "all"), "squeeze-excite": (TinyMobile, "all"),
          "groupnorm-concat": (TinyGroupNorm, "all"), "split-concat": (ChunkBlock, "all"),
          "coupled": (CoupledBlock, "all")}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("method,rows", [("cross", 0), ("soft", 0), ("layerwise", 300)])
def test_the_walk_prunes_as_the_per_group_capture_does(tmp_path, name, method, rows):
    cls, scope = MODELS[name]
    torch.manual_seed(0)
    view, teacher, groups = _setup(export(randomise_bn(cls()), tmp_path / f"{name}.onnx"))
    x, _ = make_data(3)
    config = PruneConfig(ratio=0.5, method=method, scope=scope, rows=rows, chunk=8)
    aug = augment.Augmenter([augment.Transform("flip", 1.0), augment.Transform("shift", 2.0)], 2, seed=0)
    walked = prune.prune(view, teacher, groups, x, config, augmenter=aug)
    assert len(walked.outcomes) >= 2
    _same(walked, prune_by_capture(view, teacher, groups, x, config, aug))
    twin = run_torch(walked.student, x)[0]
    assert np.isfinite(twin).all()


def test_student_convs_read_only_the_channels_their_weights_use(tmp_path):
    """The walk's students skip the input channels a refit zeroed (in every layer that has
    some, the Concat read by three groups included), and their outputs are the masked layers'
    within float32 rounding."""
    torch.manual_seed(0)
    view, teacher, groups = _setup(export(randomise_bn(CoupledBlock()), tmp_path / "coupled.onnx"))
    x, _ = make_data(3)
    result = prune.prune(view, teacher, groups, x, PruneConfig(ratio=0.5, scope="all"))
    convs = [m for m in result.student.modules_by_node.values() if isinstance(m, torch.nn.Conv2d)]
    zeroed = [m for m in convs if m.groups == 1 and bool((m.weight.abs().sum((0, 2, 3)) == 0).any())]
    assert any(m.in_channels == 30 for m in zeroed)  # merge: p, q, q and c
    assert [m for m in convs if "forward" in vars(m)] == zeroed
    sliced = run_torch(result.student, x)[0]
    for m in zeroed:
        del vars(m)["forward"]
    masked = run_torch(result.student, x)[0]
    assert np.abs(sliced - masked).max() <= 1e-5 * np.abs(masked).max()
    assert not np.array_equal(sliced, run_torch(teacher, x)[0])


def test_the_walk_takes_a_fixed_batch_model_in_pieces(tmp_path):
    """A dynamo export without dynamic shapes fixes its batch: the walk runs each unit in pieces
    of that batch and joins them where statistics are taken."""
    torch.manual_seed(0)
    path = export_dynamo(randomise_bn(TinyResidual()), tmp_path / "fixed.onnx", shape=(4, 1, 16, 16),
                         dynamic_batch=False)
    view, teacher, groups = _setup(path)
    teacher.batch = 4
    x, _ = make_data(2)
    config = PruneConfig(ratio=0.5, scope="all", chunk=8)
    _same(prune.prune(view, teacher, groups, x, config), prune_by_capture(view, teacher, groups, x, config))


def test_the_demo_teacher_prunes_as_the_per_group_capture_does():
    view, teacher, groups = _setup(DEMO, (1, 28, 28))
    x = np.load(DEMO.parent / "demo_eval.npz")["x"][:20]
    config = PruneConfig(ratio=0.5)
    _same(prune.prune(view, teacher, groups, x, config), prune_by_capture(view, teacher, groups, x, config))


def test_jobs_pruned_together_equal_each_pruned_alone(tmp_path):
    """The candidates of --method auto share one walk and the teacher's values: each comes out
    as it would alone, including widths that leave some group whole."""
    torch.manual_seed(0)
    view, teacher, groups = _setup(export(randomise_bn(TinyMobile()), tmp_path / "m.onnx"))
    x, _ = make_data(2)
    sizes = {g.id: g.size for g in groups if g.prunable}
    narrow = {gid: max(1, size // 3) for gid, size in list(sizes.items())[:-1]}  # the last group left whole
    jobs = [Job(PruneConfig(method=m, mu=mu, scope="all")) for m, mu in (("cross", 0.3), ("cross", 0.9), ("soft", 0.3),
                                                                           ("layerwise", 0.6))]
    jobs.append(Job(PruneConfig(scope="all"), keep=narrow))
    together = prune.prune_jobs(view, teacher, groups, x, jobs)
    for job, result in zip(jobs, together):
        _same(result, prune.prune(view, teacher, groups, x, job.config, keep=job.keep))


def test_a_chain_is_walked_once_and_values_are_freed_after_their_last_use(tmp_path):
    """In a plain chain every node is evaluated once for the teacher and once per version of the
    student, and nothing outlives its last reader."""
    torch.manual_seed(0)
    view, teacher, groups = _setup(export(randomise_bn(TinyVGG()), tmp_path / "vgg.onnx"))
    graph = teacher.module.graph
    calls = {id(teacher.module.get_submodule(n.target)): n for n in graph.nodes if n.op == "call_module"}
    todo = [g for g in groups if g.prunable]
    plan = Plan(graph, [{calls[id(teacher.entry(c.node))] for c in g.consumers} for g in todo])
    inputs = [[calls[id(teacher.entry(c.node))].args[0] for c in g.consumers] for g in todo]
    ops = plan.build([[(n, 0) for n in nodes] + [(n, plan.version(n, t)) for n in nodes]
                      for t, nodes in enumerate(inputs)])
    evals = [op.value for op in ops if isinstance(op, Eval)]
    assert len(evals) == len(set(evals))
    versions = {}
    for node, version in evals:
        versions.setdefault(node, set()).add(version)
    assert max(len(v) for v in versions.values()) <= len(todo) + 1
    live, peak = set(), 0
    for op in ops:
        if isinstance(op, Eval):
            live.add(op.value)
        elif isinstance(op, Free):
            live.remove(op.value)
        peak = max(peak, len(live))
    assert not live and peak < len(list(graph.nodes))
    assert [op.t for op in ops if isinstance(op, Visit)] == list(range(len(todo)))


def test_rows_are_sampled_to_the_budget_the_same_way_every_time():
    counts = [1000, 1000, 400]
    picks = stats.picks("conv", counts, 600, torch.device("cpu"))
    assert [len(p) for p in picks] == [250, 250, 100]
    assert all(torch.equal(p, q) for p, q in zip(picks, stats.picks("conv", counts, 600, torch.device("cpu"))))
    assert all(bool((p[1:] > p[:-1]).all()) and int(p.max()) < n for p, n in zip(picks, counts))
    assert not torch.equal(picks[0], stats.picks("other", counts, 600, torch.device("cpu"))[0])
    assert stats.picks("conv", counts, 0, torch.device("cpu")) == [None] * 3
    assert stats.picks("conv", counts, 5000, torch.device("cpu")) == [None] * 3


@pytest.mark.parametrize("stride,dilation,pad", [(1, 1, 1), (2, 1, 0), (1, 2, 2)])
def test_sampled_patches_are_the_rows_of_the_unfolded_input(tmp_path, stride, dilation, pad):
    """Gathering only the picked patches gives exactly those rows of the full unfold."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 6, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(6, 4, 3, stride=stride, dilation=dilation, padding=pad))
    view, _, groups = _setup(export(net, tmp_path / "c.onnx"))
    consumer = groups[0].consumers[0]
    inp = torch.randn(3, 6, 16, 16)
    full = stats.rows(view, consumer, inp)
    pick = torch.cat([torch.arange(0, len(full), 7), torch.tensor([len(full) - 1])])  # borders and inside
    torch.testing.assert_close(stats.rows(view, consumer, inp, pick), full[pick], rtol=0, atol=0)


@pytest.mark.parametrize("method", ["cross", "soft", "layerwise"])
def test_a_refit_of_given_channels_from_kept_columns_equals_the_full_refit(tmp_path, method):
    """--method auto's candidates refit the channels one pruning chose, from the statistics of
    the kept columns only: the same least squares as the full pruning's own refit."""
    torch.manual_seed(0)
    view, teacher, groups = _setup(export(randomise_bn(TinyResidual()), tmp_path / "r.onnx"))
    x, _ = make_data(3)
    config = PruneConfig(ratio=0.5, method=method, scope="all")
    full = prune.prune(view, teacher, groups, x, config)
    refit, ranked = prune.prune_jobs(view, teacher, groups, x, [Job(config, kept=full.kept),
                                                                Job(config, kept=full.kept, ranking=True)])
    for result in (refit, ranked):
        assert [o.kept.tolist() for o in result.outcomes] == [o.kept.tolist() for o in full.outcomes]
        assert all(np.isnan(o.loss) for o in result.outcomes)
    for node, layer in full.layers.items():
        scale = np.abs(layer.weight).max()
        assert np.abs(refit.layers[node].weight - layer.weight).max() <= 1e-3 * scale, node
        assert np.abs(ranked.layers[node].weight - layer.weight).max() <= 1e-2 * scale, node


def test_a_job_that_follows_refits_what_its_leader_chooses_as_the_walk_goes(tmp_path):
    """--method auto's walk: the selector chooses each group and the other candidates refit those
    channels at once, as a refit given the finished selection does, and nothing can follow a job
    that does not choose."""
    torch.manual_seed(0)
    view, teacher, groups = _setup(export(randomise_bn(TinyResidual()), tmp_path / "r.onnx"))
    x, _ = make_data(3)
    lead, other = PruneConfig(ratio=0.5, scope="all"), PruneConfig(ratio=0.5, scope="all", method="soft", mu=0.3)
    leader, follower = prune.prune_jobs(view, teacher, groups, x, [Job(lead), Job(other, follows=0)])
    assert leader.kept and [o.kept.tolist() for o in leader.outcomes] == \
        [o.kept.tolist() for o in prune.prune(view, teacher, groups, x, lead).outcomes]
    given = prune.prune_jobs(view, teacher, groups, x, [Job(other, kept=leader.kept)])[0]
    assert [o.kept.tolist() for o in follower.outcomes] == [o.kept.tolist() for o in leader.outcomes]
    for node, layer in given.layers.items():
        np.testing.assert_allclose(follower.layers[node].weight, layer.weight, rtol=1e-6, atol=1e-9, err_msg=node)
    for jobs in ([Job(other, follows=0)], [Job(lead, kept=leader.kept), Job(other, follows=0)]):
        with pytest.raises(ValueError, match="must name an earlier job"):
            prune.prune_jobs(view, teacher, groups, x, jobs)
    with pytest.raises(ValueError, match="the other leaves whole"):  # keep={}: every group whole
        prune.prune_jobs(view, teacher, groups, x, [Job(lead, keep={}), Job(other, follows=0)])
