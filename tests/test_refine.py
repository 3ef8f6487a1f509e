"""Local search of widths for a latency or FLOPs target, on known cost and error functions and on real models."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline.search.allocate import Curves
from pipeline.search.refine import GAIN, refine
from tests.conftest import TinyVGG, export, randomise_bn

SIZES = {0: 32, 1: 32, 2: 32}
PRICE = {0: 3.0, 1: 1.0, 2: 1.0}  # cost per channel: group 0 sits at a high resolution
HARM = {0: 0.1, 1: 1.0, 2: 0.01}  # error per removed channel squared: group 1 matters most
START = {0: 16, 1: 16, 2: 16}


def curves() -> Curves:
    groups = [SimpleNamespace(id=g, size=s) for g, s in SIZES.items()]
    return Curves(groups, {g: 8 for g in SIZES}, {g: np.zeros(1) for g in SIZES}, {g: 8 for g in SIZES})


def cost(keep: dict[int, int]) -> float:
    return sum(PRICE[g] * keep[g] for g in keep)


def error(keep: dict[int, int]) -> float:
    return sum(HARM[g] * (SIZES[g] - keep[g]) ** 2 for g in keep)


def both(fn):
    """A confirmation that scores start and result with `fn`."""
    return lambda start, result: (fn(start), fn(result))


class Counted:
    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, keep):
        self.calls.append(dict(keep))
        return self.fn(keep)


def test_width_moves_to_where_narrowing_hurts_most_within_the_budget():
    score, budget = Counted(error), cost(START)
    result = refine(curves(), START, budget, cost, score, 24, lambda keep: cost(keep) / budget, both(error))
    assert result.start == START and result.start_score == error(START)
    assert result.score == error(result.keep) < (1 - GAIN) * error(START)
    assert result.keep[1] > START[1] and result.keep[2] < START[2]  # from the least to the most sensitive
    assert cost(result.keep) <= budget and result.confirmation["kept"]
    assert result.evaluations == len(score.calls) <= 24
    scores = [m["holdout_relative_squared_error"] for m in result.moves]
    assert scores == sorted(scores, reverse=True) and scores[-1] == result.score


def test_a_trade_measured_over_the_time_allowed_is_never_kept():
    budget = cost(START)
    slow = lambda keep: 1.2 if keep[1] > START[1] else cost(keep) / budget  # group 1 wider: slower than predicted
    result = refine(curves(), START, budget, cost, error, 24, slow, both(error))
    assert result.misses and all(m["measured_over_allowed"] > 1 for m in result.misses)
    assert result.keep[1] <= START[1] and slow(result.keep) <= 1.0


def test_the_start_is_kept_when_no_move_helps_and_the_evaluations_are_capped():
    score = Counted(lambda keep: sum(abs(keep[g] - START[g]) for g in keep) + 1.0)
    result = refine(curves(), START, cost(START), cost, score, 24, lambda keep: 0.5, both(score))
    assert result.keep == START and result.score == result.start_score and not result.moves
    capped = Counted(error)
    assert refine(curves(), START, cost(START), cost, capped, 3, lambda keep: 0.5, both(error)).evaluations == 3
    assert len(capped.calls) == 3


def test_only_the_groups_whose_step_saves_most_are_probed():
    sizes = {g: 32 for g in range(8)}
    groups = [SimpleNamespace(id=g, size=32) for g in sizes]
    many = Curves(groups, {g: 8 for g in sizes}, {g: np.zeros(1) for g in sizes}, {g: 8 for g in sizes})
    price = lambda keep: sum((g + 1) * keep[g] for g in keep)  # group 7 saves most per step
    score = Counted(lambda keep: 1.0 + sum(32 - keep[g] for g in keep))
    start = {g: 16 for g in sizes}
    refine(many, start, price(start), price, score, 12, lambda keep: 0.5, both(score))
    narrowed = [next(g for g in sizes if call[g] < 16) for call in score.calls[1:5]]
    assert narrowed == [7, 6, 5, 4]  # max(4, 12 // 3) probes, biggest saving first


def test_a_result_the_unseen_shots_do_not_confirm_is_dropped():
    budget = cost(START)
    fooled = lambda keep: error(START) + 1.0 if keep != START else error(START)  # the shots the search never saw disagree
    result = refine(curves(), START, budget, cost, error, 24, lambda keep: cost(keep) / budget, both(fooled))
    assert result.moves and result.confirmation == {"start": error(START), "refined": error(START) + 1.0,
                                                    "kept": False}
    assert result.keep == START and result.score == result.start_score


def test_trials_that_share_their_first_groups_reuse_them_to_the_last_bit(vgg_path, npz_path):
    """The refinement's held-out prunings differ in one or two groups: every group before the
    first that differs is taken from an earlier trial, and the scores are those of pruning anew."""
    from pipeline import choose, prune
    from pipeline.analyze import find_groups
    from pipeline.convert import to_torch
    from pipeline.graph import GraphView
    from pipeline.load import load_model

    proto = load_model(vgg_path).proto
    view, teacher = GraphView(proto), to_torch(proto)
    groups = find_groups(view)
    config = prune.PruneConfig(method="cross")
    sizes = {g.id: g.size for g in groups if g.prunable and not prune.skip_reason(teacher, g, config)}
    ids = list(sizes)
    half = {g: s // 2 for g, s in sizes.items()}
    trials = [half, {**half, ids[-1]: sizes[ids[-1]] // 4}, {**half, ids[1]: sizes[ids[1]] // 4}, half]
    x = np.load(npz_path)["x"][:24]
    reusing, fresh = (choose.HoldOut(view, teacher, groups, x, 0, None) for _ in range(2))
    fresh.prefixes = prune.Prefixes(budget=0)  # stores nothing: every trial pruned from scratch
    assert [reusing.score(config, keep) for keep in trials] == [fresh.score(config, keep) for keep in trials]
    assert fresh.prefixes.hits == 0
    assert reusing.prefixes.hits == (len(ids) - 1) + 1 + len(ids)  # all but the last; the first; all


def test_widths_are_confirmed_on_every_shot_but_those_the_search_scored_on(vgg_path, npz_path):
    """The search scores on the first fold of one order of the shots; the confirmation averages the
    other folds of that order, which hold out every other shot once."""
    from pipeline import choose, prune
    from pipeline.analyze import find_groups
    from pipeline.convert import to_torch
    from pipeline.graph import GraphView
    from pipeline.load import load_model

    proto = load_model(vgg_path).proto
    view, teacher = GraphView(proto), to_torch(proto)
    groups = find_groups(view)
    x = np.load(npz_path)["x"][:12]
    folds = [choose.HoldOut(view, teacher, groups, x, 3, None, fold) for fold in range(choose.disjoint_folds(len(x)))]
    held = [{row.tobytes() for row in fold.check} for fold in folds]
    assert len(folds) == 4 and sum(map(len, held)) == len(set().union(*held)) == len(x)  # disjoint, all shots
    config = prune.PruneConfig(method="cross")
    sizes = {g.id: g.size for g in groups if g.prunable and not prune.skip_reason(teacher, g, config)}
    widths = {"half": {g: s // 2 for g, s in sizes.items()}, "quarter": {g: s // 4 for g, s in sizes.items()}}
    unseen = choose.unseen_scores(view, teacher, groups, x, config, widths, 3, None)
    assert unseen == {name: np.mean([fold.score(config, keep) for fold in folds[1:]]) for name, keep in widths.items()}
    assert unseen["half"] < unseen["quarter"]  # a quarter of the channels loses more than half


@pytest.fixture(scope="module")
def wide_stem_path(tmp_path_factory):
    """A grey-image VGG whose first conv writes 32 channels from 9 numbers (1 channel x 3x3)."""
    torch.manual_seed(0)
    return export(randomise_bn(TinyVGG(widths=(32, 16, 16))), tmp_path_factory.mktemp("models") / "stem32.onnx")


def test_a_layer_is_not_refined_below_the_numbers_it_reads_per_output(wide_stem_path, npz_path):
    from pipeline import prune
    from pipeline.analyze import find_groups
    from pipeline.convert import to_torch
    from pipeline.graph import GraphView
    from pipeline.load import load_model
    from pipeline.search import allocate

    proto = load_model(wide_stem_path).proto
    view, teacher = GraphView(proto), to_torch(proto)
    groups = find_groups(view)
    c = allocate.curves(view, teacher, groups, np.load(npz_path)["x"][:4], prune.PruneConfig(), losses=False)
    floor = allocate.read_widths_floor(view, c)
    by_writer = {g.producers[0]: g.id for g in c.groups}
    reads = {name: int(np.prod(view.initializers[view.nodes[name].input[1]].dims[1:])) for name in by_writer}
    for name, gid in by_writer.items():
        g = next(g for g in c.groups if g.id == gid)
        if reads[name] < g.channels:  # the stem (9 numbers per output, 32 outputs) and fc1 (16 -> 24)
            assert floor[gid] % c.step[gid] == 0 and reads[name] <= floor[gid] < reads[name] + c.step[gid]
        else:  # a 3x3 conv over 32 channels reads 288 per output: only the usual floor
            assert floor[gid] == c.floor[gid]
    stem = by_writer[next(n for n in by_writer if reads[n] == 9)]
    assert c.floor[stem] < 9 <= floor[stem]  # the floor moved only because of what the stem reads


def test_a_flops_target_refines_one_ratio_for_all_within_the_exact_flops(wide_stem_path, npz_path):
    from pipeline import CompressOptions, FlopsShare, compress, render
    from pipeline.load import load_model

    options = CompressOptions(data=npz_path, shots=3, providers=[], mode=FlopsShare(0.3, refine_evals=12))
    report = compress(wide_stem_path, options).report
    alloc = report["allocation"]
    assert alloc["cost"] == f"flops, {alloc['chosen']}" and alloc["chosen"] in ("uniform", "refined")
    refinement = alloc["refinement"]
    assert refinement["evaluations"] <= 12 and (alloc["chosen"] == "refined") == (refinement["keep"] != refinement["start"])
    assert refinement["predicted_budget"] == pytest.approx(0.3 * report["totals"]["flops_before"])
    assert alloc["share"] <= 0.3 and 1 / report["totals"]["flops_reduction"] == pytest.approx(alloc["share"])
    first = next(n.name for n in load_model(wide_stem_path).proto.graph.node if n.op_type == "Conv")
    stem = next(g for g in report["groups"] if g["producers"] == [first])
    start = refinement["start"][str(stem["id"])]
    assert stem["channels_after"] >= min(start, 16)  # never below the 9 numbers it reads, rounded to a step
    assert "--target-flops 0.3" in render.markdown(report)
    single = compress(wide_stem_path, CompressOptions(data=npz_path, samples=1, providers=[], mode=FlopsShare(0.3)))
    assert single.report["allocation"]["chosen"] == "allocated"  # nothing to hold out: the loss curves decide
    assert single.report["allocation"]["share"] <= 0.3
