"""The closed-form solver against brute force on synthetic least-squares problems."""
from __future__ import annotations

import itertools

import pytest
import torch

from pipeline.solve import Problem, Stats, _FreeRows, kept_rows, objective, solve_closed, solve_l1, solve_pgd

F64 = torch.float64


def problem(channels=6, per=2, out=3, rows=400, seed=0, noise=0.3) -> Problem:
    """A layer whose student input is the teacher's plus noise, with a ones column for the bias."""
    g = torch.Generator().manual_seed(seed)
    xt = torch.randn(rows, channels * per, generator=g, dtype=F64) @ torch.randn(channels * per, channels * per,
                                                                  generator=g, dtype=F64)
    xs = xt + noise * torch.randn(rows, channels * per, generator=g, dtype=F64)
    ones = torch.ones(rows, 1, dtype=F64)
    at, as_ = torch.cat([xt, ones], 1), torch.cat([xs, ones], 1)
    stats = Stats(at.T @ at / rows, as_.T @ as_ / rows, as_.T @ at / rows, rows)
    w = torch.randn(channels * per + 1, out, generator=g, dtype=F64)
    return Problem(w, torch.arange(channels * per).reshape(channels, per), stats)


def quad_loss(p: Problem, w: torch.Tensor, method: str, mu: float) -> float:
    h, ws = objective(p.stats, p.weight, method, mu, 1e-9)
    return float(torch.sum((w - ws) * (h @ (w - ws))))


def brute_refit(p: Problem, kept: torch.Tensor, method: str, mu: float) -> torch.Tensor:
    """The constrained minimum written out: free rows solve H_ff W_f = H_f: W*, the rest are zero."""
    h, ws = objective(p.stats, p.weight, method, mu, 1e-9)
    free = kept_rows(p, kept, len(p.weight))
    w = torch.zeros_like(ws)
    w[free] = torch.linalg.solve(h[free][:, free], (h @ ws)[free])
    return w


@pytest.mark.parametrize("method", ["cross", "layerwise", "soft"])
def test_refit_is_the_exact_constrained_minimum(method):
    p = problem()
    sol = solve_closed([p], 3, method, 0.6, 1e-9)
    dropped = [c for c in range(6) if c not in sol.kept.tolist()]
    assert torch.all(sol.weights[0][p.columns[dropped].reshape(-1)] == 0)
    best = quad_loss(p, sol.weights[0], method, 0.6)
    for _ in range(20):  # no perturbation of the kept rows does better
        w = sol.weights[0].clone()
        rows = p.columns[sol.kept].reshape(-1)
        w[rows] += 1e-3 * torch.randn(len(rows), w.shape[1], dtype=F64)
        assert quad_loss(p, w, method, 0.6) >= best - 1e-9


def test_greedy_selection_matches_exhaustive_search_on_easy_case():
    p = problem(channels=5, noise=0.0)
    p.weight[p.columns[1]] *= 0.01  # channels 1 and 3 barely matter
    p.weight[p.columns[3]] *= 0.01
    sol = solve_closed([p], 3, "cross", 0.6, 1e-9)
    losses = {}
    for kept in itertools.combinations(range(5), 3):
        losses[kept] = quad_loss(p, brute_refit(p, torch.tensor(kept), "cross", 0.6), "cross", 0.6)
    assert tuple(sol.kept.tolist()) == min(losses, key=losses.get) == (0, 2, 4)


def test_layerwise_target_corrects_for_student_drift():
    """With no pruning at all, layerwise refits so that S(h_s) reproduces T(h_t) as well as it can."""
    p = problem(noise=0.5)
    h, w_star = objective(p.stats, p.weight, "layerwise", 0.6, 1e-9)
    resid_teacher_w = quad_loss(p, p.weight, "layerwise", 0.6)
    assert resid_teacher_w > 1e-3 and quad_loss(p, w_star, "layerwise", 0.6) < 1e-9


def test_refitting_methods_beat_magnitude():
    p = problem(noise=0.2)
    l1 = solve_l1([p], 3)
    cross = solve_closed([p], 3, "cross", 0.6, 1e-6)
    assert quad_loss(p, cross.weights[0], "cross", 0.6) < quad_loss(p, l1.weights[0], "cross", 0.6)


def test_joint_selection_sums_consumer_costs():
    """A channel unimportant to one consumer but vital to another must stay."""
    a, b = problem(seed=1), problem(seed=2)
    a.weight[a.columns[0]] = 0  # consumer a does not use channel 0
    b.weight[b.columns[0]] *= 50  # consumer b depends on it heavily
    joint = solve_closed([a, b], 3, "cross", 0.6, 1e-6)
    alone = solve_closed([a], 3, "cross", 0.6, 1e-6)
    assert 0 in joint.kept.tolist() and 0 not in alone.kept.tolist()


def test_pgd_reaches_the_target_count_and_a_good_loss():
    p = problem()
    pgd = solve_pgd([p], 3, "cross", 0.6, 1e-6, iters=600, lr=1e-2)
    closed = solve_closed([p], 3, "cross", 0.6, 1e-6)
    assert len(pgd.kept) == 3
    dropped = [c for c in range(6) if c not in pgd.kept.tolist()]
    assert torch.all(pgd.weights[0][p.columns[dropped].reshape(-1)] == 0)
    assert closed.loss <= pgd.loss * 1.001


def test_pgd_gradient_on_the_free_rows_is_the_full_one_masked():
    """As rows are dropped a few at a time, the free block's gradient with its running offset
    equals 2 H (W - W*) computed whole, on every row (zero on the dropped ones)."""
    p = problem(channels=8, per=3, out=4)
    h, ws = objective(p.stats, p.weight, "soft", 0.5, 1e-6)
    free = _FreeRows(h, ws)
    w = p.weight.clone()
    alive = torch.ones(len(w), dtype=torch.bool)
    for gone in ([], [0, 1, 2], [9, 10, 11, 21, 22, 23], [24]):  # channels 0, 3 and 7, then the bias row
        alive[gone] = False
        w[~alive] = 0
        free.keep(alive)
        full = h @ (w - ws)
        full[~alive] = 0
        assert torch.allclose(free.grad(w), full, rtol=1e-9, atol=1e-12)
        w[alive] += 0.1 * torch.randn(int(alive.sum()), w.shape[1], dtype=F64)


@pytest.mark.parametrize("method", ["layerwise", "soft"])
def test_regression_targets_keep_the_teacher_where_the_samples_say_nothing(method):
    """The ridge pulls toward the teacher's weights: with the student's input equal to the
    teacher's, W* is W_t at any damping, and with fewer rows than inputs the directions no
    sample excites keep W_t (a ridge toward zero set them to zero)."""
    g = torch.Generator().manual_seed(3)
    rows, features, out = 5, 12, 4
    x = torch.cat([torch.randn(rows, features, generator=g, dtype=F64), torch.ones(rows, 1, dtype=F64)], 1)
    gram = x.T @ x / rows
    w = torch.randn(features + 1, out, generator=g, dtype=F64)
    _, w_star = objective(Stats(gram, gram, gram, rows), w, method, 0.5, 0.1)
    assert torch.allclose(w_star, w, atol=1e-10)
    drift = x + 0.3 * torch.randn(rows, features + 1, generator=g, dtype=F64)
    drift[:, -1] = 1
    stats = Stats(gram, drift.T @ drift / rows, drift.T @ x / rows, rows)
    _, w_star = objective(stats, w, method, 0.5, 0.1)
    unseen = torch.linalg.svd(torch.cat([x, drift])).Vh[2 * rows:].T  # directions neither input reaches
    assert unseen.shape[1] > 0
    assert torch.allclose(unseen.T @ w_star, unseen.T @ w, atol=1e-8)
