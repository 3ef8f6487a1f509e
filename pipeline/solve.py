"""Per-group solvers: which input channels to keep and the consumers' refit weights.

Each consumer's objective is quadratic in its weights W (rows: input features, then a bias
row; columns: outputs), so it is fully described by Gram matrices of its unfolded inputs:
G_tt = X_t'X_t, G_ss = X_s'X_s, G_st = X_s'X_t (teacher t, student s). Every method below
reduces to "(W - W*)' H (W - W*)" for some H and target W*:

  cross      mu*||S(h_t) - T(h_t)||^2 + (1-mu)*||T(h_s) - S(h_s)||^2:  H = mu G_tt + (1-mu) G_ss, W* = W_t
  layerwise  ||S(h_s) - T(h_t)||^2:          H = G_ss,  W* = G_ss^-1 G_st W_t
  soft       ||S(m) - T(h_t)||^2 with m = mu h_t + (1-mu) h_s: H = G_mm, W* = G_mm^-1 G_mt W_t

so selection (greedy group Optimal Brain Surgeon) and refit (a least-squares solve) are exact
linear algebra shared by all methods. A group may feed several consumers: a channel's cost
is the sum of its costs in every consumer.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

METHODS = ("cross", "layerwise", "soft", "l1")
MAX_ROUNDS = 32
SOLVERS = ("closed", "pgd")


@dataclass
class Stats:
    """Sufficient statistics of one consumer, averaged over rows (float64); None where the
    method does not need one."""

    g_tt: torch.Tensor | None
    g_ss: torch.Tensor | None
    g_st: torch.Tensor | None
    rows: int = 0


@dataclass
class Problem:
    """One consumer: teacher weights (D, out) in solver layout and its channel columns."""

    weight: torch.Tensor
    columns: torch.Tensor  # (channels, k): the rows of `weight` that belong to each channel
    stats: Stats | None = None
    fixed: torch.Tensor | None = None  # rows already dropped with another group (after a Concat): held at zero


@dataclass
class Solution:
    kept: torch.Tensor  # sorted channel indices
    weights: list[torch.Tensor]  # refit weights per problem, dropped rows zero
    loss: float  # relative objective after refit: sum (W-W*)'H(W-W*) / sum W*'HW*


def objective(stats: Stats, weight: torch.Tensor, method: str, mu: float,
              damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(damped H, W*) of one consumer for `method`.

    The damping is a ridge toward the teacher's weights, damp * ||W - W_t||^2, for every
    method: directions of the input that the few samples never excite keep the teacher's
    weights. A ridge toward zero, as in plain regularised regression, would erase them wherever
    a layer has more inputs than the shots give rows (a classifier over 128 features, fed one
    shot per class, say), and would move W* off W_t even where nothing is pruned."""
    if method == "cross":
        h = stats.g_tt.mul(mu).add_(stats.g_ss, alpha=1 - mu)
        h.diagonal().add_(damp * _scale(h))
        return h, weight
    if method == "layerwise":
        h, cross = stats.g_ss.clone(), stats.g_st @ weight
    elif method == "soft":
        a = mu
        h = stats.g_st.T.add(stats.g_st).mul_(a * (1 - a)).add_(stats.g_tt, alpha=a * a).add_(stats.g_ss,
                                                                                             alpha=(1 - a) ** 2)
        cross = stats.g_tt.mul(a).add_(stats.g_st, alpha=1 - a) @ weight
    else:
        raise ValueError(f"no quadratic objective for method '{method}'")
    ridge = damp * _scale(h)
    h.diagonal().add_(ridge)
    return h, _spd_solve(h, cross.add_(weight, alpha=float(ridge)))


def _spd_solve(h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """H^-1 b for a damped Gram matrix H (Cholesky; LU where rounding left it indefinite)."""
    chol, info = torch.linalg.cholesky_ex(h)
    return torch.cholesky_solve(b, chol) if int(info) == 0 else torch.linalg.solve(h, b)


def _scale(h: torch.Tensor) -> torch.Tensor:
    return torch.diagonal(h).mean().clamp_min(1e-12)


def _damped(h: torch.Tensor, ridge: torch.Tensor) -> torch.Tensor:
    out = h.clone()
    out.diagonal().add_(ridge)
    return out


def solve_closed(problems: list[Problem], keep: int, method: str, mu: float,
                 damp: float) -> Solution:
    """Greedy group-OBS removal by exact loss increase, then an exact refit of the kept rows.

    Up to MAX_ROUNDS channels to remove go one at a time; beyond that, each of at most MAX_ROUNDS
    rounds removes the cheapest few at once: the cost order changes little between neighbouring
    steps. The selection runs in float32 (its costs only rank channels), the refit in float64.
    """
    quads = [_Quadratic(*objective(p.stats, p.weight, method, mu, damp)) for p in problems]
    alive = torch.ones(len(problems[0].columns), dtype=torch.bool, device=problems[0].weight.device)
    for drop, _ in _greedy_removal(problems, quads, keep):
        alive[drop] = False
    kept = torch.nonzero(alive).squeeze(1)
    weights = [q.refit(kept_rows(p, kept, len(q.h))) for p, q in zip(problems, quads)]
    num = sum(q.loss(w) for q, w in zip(quads, weights))
    return Solution(kept, weights, num / max(sum(q.energy for q in quads), 1e-30))


def removal_curve(problems: list[Problem], min_keep: int, method: str, mu: float, damp: float) -> np.ndarray:
    """Relative loss after greedily removing 0, 1, 2, ... channels (index = channels removed),
    down to `min_keep`: what each further channel of this group would cost."""
    quads = [_Quadratic(*objective(p.stats, p.weight, method, mu, damp)) for p in problems]
    den = max(sum(q.energy for q in quads), 1e-30)
    curve = [0.0]
    for drop, cost in _greedy_removal(problems, quads, min_keep):
        curve += [curve[-1] + cost / den * (i + 1) / len(drop) for i in range(len(drop))]
    return np.array(curve)


class _Quadratic:
    """(W - W*)' H (W - W*) of one consumer, with H W* and the energy W*' H W* computed once."""

    def __init__(self, h: torch.Tensor, w_star: torch.Tensor):
        self.h, self.w_star = h, w_star
        self.hw = h @ w_star
        self.energy = float(torch.sum(w_star * self.hw))

    def refit(self, rows: torch.Tensor) -> torch.Tensor:
        """argmin over W with only `rows` free (the others zero)."""
        out = torch.zeros_like(self.w_star)
        out[rows] = torch.linalg.solve(self.h[rows][:, rows], self.hw[rows])
        return out

    def at(self, w: torch.Tensor) -> float:
        """The objective at any W."""
        return float(torch.sum((w - self.w_star) * (self.h @ (w - self.w_star))))

    def loss(self, refit: torch.Tensor) -> float:
        """The objective at a refit W: W'HW - 2 W'HW* + W*'HW* with H W = H W* on the free rows."""
        return max(self.energy - float(torch.sum(refit * self.hw)), 0.0)


def _greedy_removal(problems: list[Problem], quads, keep: int):
    """Yield (channels removed this round, their summed OBS loss increase) until `keep` remain."""
    channels, device = len(problems[0].columns), problems[0].weight.device
    alive = torch.ones(channels, dtype=torch.bool, device=device)
    removals = [_Removal(q.h, q.w_star, p, channels - keep) for p, q in zip(problems, quads)]
    step = -(-(channels - keep) // MAX_ROUNDS)
    while int(alive.sum()) > keep:
        idx = torch.nonzero(alive).squeeze(1)
        cost = sum(r.costs(idx) for r in removals)
        order = torch.argsort(cost, stable=True)[:min(step, len(idx) - keep)]
        drop = idx[order]
        alive[drop] = False
        for r in removals:
            r.remove(drop)
        yield drop, float(cost[order].sum())


class _Removal:
    """Group OBS on one consumer. Removing rows S of the weights compensates the others by
    -H^-1[:, S] H^-1[S, S]^-1 W[S] and turns H^-1 into H^-1 - G G' (G = H^-1[:, S] H^-1[S, S]^-1/2).
    Rather than rewriting all of H^-1 at every round (D^2 per row removed), the inverse is kept as
    it was at the start minus the stacked G: a round reads only the columns it removes and
    updates only the channels' k x k diagonal blocks, which is all the costs need."""

    def __init__(self, h: torch.Tensor, w_star: torch.Tensor, problem: Problem, channels: int):
        fixed = problem.fixed if problem.fixed is not None else problem.columns[:0].reshape(-1)
        self.columns = problem.columns
        self.hinv = _inverse(h.float())
        self.w = w_star.float()
        self.low = self.hinv.new_empty(len(fixed) + channels * problem.columns.shape[1], len(h))  # G', stacked
        self.used = 0
        cols = problem.columns
        self.blocks = self.hinv[cols[:, :, None], cols[:, None, :]]  # (channels, k, k)
        if len(fixed):
            self._remove_rows(fixed)

    def costs(self, idx: torch.Tensor) -> torch.Tensor:
        """Loss increase of removing each channel in `idx` alone: sum over outputs of
        w' block^-1 w, as <block^-1, w w'> (k x k inverses rather than solves with `out`
        right-hand sides)."""
        wb = self.w[self.columns[idx]]  # (A, k, out)
        return (torch.linalg.inv(self.blocks[idx]) * (wb @ wb.transpose(1, 2))).sum(dim=(1, 2))

    def remove(self, channels: torch.Tensor) -> None:
        self._remove_rows(self.columns[channels].reshape(-1))

    def _remove_rows(self, rows: torch.Tensor) -> None:
        low = self.low[:self.used]
        col = self.hinv[rows].T - low.T @ low[:, rows]  # the current H^-1[:, rows] (H^-1 is symmetric)
        half = _inverse_sqrt(col[rows])
        g = col @ half
        self.w.addmm_(g, half.T @ self.w[rows], alpha=-1)
        self.low[self.used:self.used + len(rows)] = g.T
        self.used += len(rows)
        gb = g[self.columns]  # (channels, k, s)
        self.blocks.baddbmm_(gb, gb.transpose(1, 2), alpha=-1)


def _inverse_sqrt(p: torch.Tensor) -> torch.Tensor:
    """A with A A' = P^-1 for a symmetric positive (semi-)definite P (on its range)."""
    chol, info = torch.linalg.cholesky_ex(p)
    if int(info) == 0:
        return torch.linalg.solve_triangular(chol, torch.eye(len(p), dtype=p.dtype, device=p.device), upper=False).T
    vals, vecs = torch.linalg.eigh(p)
    keep = vals > vals.max().clamp_min(0) * 1e-12
    return vecs[:, keep] / vals[keep].sqrt()


def _inverse(h: torch.Tensor) -> torch.Tensor:
    """Inverse of a damped Gram matrix; more damping if rounding left it indefinite."""
    for extra in (0.0, 1e-6, 1e-4, 1e-2):
        chol, info = torch.linalg.cholesky_ex(_damped(h, extra * _scale(h)) if extra else h)
        if int(info) == 0:
            return torch.cholesky_inverse(chol)
    return torch.linalg.pinv(h, hermitian=True)


def kept_rows(problem: Problem, kept: torch.Tensor, size: int) -> torch.Tensor:
    """Rows of kept channels plus every row of no channel of the group (bias, other groups)."""
    return torch.nonzero(~_dropped_mask(problem, kept, size)).squeeze(1)


def dropped_rows(problem: Problem, kept: torch.Tensor) -> torch.Tensor:
    """Rows held at zero after this solve: the group's dropped channels and earlier fixed rows."""
    return torch.nonzero(_dropped_mask(problem, kept, len(problem.weight))).squeeze(1)


class _FreeRows:
    """The gradient 2 H (W - W*) / scale on the rows still free, zero on the others. The
    dropped rows of W are zero, so on the free rows F it is H_FF (W_F - W*_F) - H_FD W*_D: the
    second term changes only when rows are dropped, and each step costs the free block's
    product, a quarter of H's once half the channels are gone."""

    def __init__(self, h2: torch.Tensor, w_star: torch.Tensor):
        self.h2, self.w_star = h2, w_star
        self.rows = torch.arange(len(h2), device=h2.device)
        self.block = h2
        self.offset = torch.zeros_like(w_star)

    def keep(self, free: torch.Tensor) -> None:
        """Only the rows where `free` (a mask over all rows) is True stay free."""
        stay = free[self.rows]
        if bool(stay.all()):
            return
        gone = self.rows[~stay]
        self.rows = self.rows[stay]
        self.offset = self.offset[stay] + self.h2[:, gone][self.rows] @ self.w_star[gone]
        self.block = self.block[stay][:, stay]

    def grad(self, w: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(w)
        out[self.rows] = self.block @ (w[self.rows] - self.w_star[self.rows]) - self.offset
        return out


def _dropped_mask(problem: Problem, kept: torch.Tensor, size: int) -> torch.Tensor:
    mask = torch.zeros(size, dtype=torch.bool, device=problem.weight.device)
    mask[problem.columns.reshape(-1)] = True
    mask[problem.columns[kept].reshape(-1)] = False
    if problem.fixed is not None:
        mask[problem.fixed] = True
    return mask


def solve_l1(problems: list[Problem], keep: int) -> Solution:
    """Magnitude baseline: keep the channels with the largest L1 norm of consumer weights, no refit."""
    norms = sum(p.weight[p.columns].abs().sum(dim=(1, 2)) for p in problems)
    kept = torch.sort(torch.topk(norms, keep).indices).values
    weights = []
    for p in problems:
        w = p.weight.clone()
        w[_dropped_mask(p, kept, len(w))] = 0
        weights.append(w)
    return Solution(kept, weights, float("nan"))


def solve_pgd(problems: list[Problem], keep: int, method: str, mu: float, damp: float,
              iters: int, lr: float) -> Solution:
    """The paper's solver: Adam from the teacher's weights with a shrinking group top-k proximal step.

    During the first third of the iterations the kept count falls linearly from all channels
    to `keep` (lowest-norm groups zeroed, their gradients and Adam moments masked); then the
    mask is fixed and the learning rate drops tenfold. The loss is the same quadratic form as
    the closed form's, so its gradient 2 H (W - W*) is written out (float32) instead of going
    through autograd, on the rows still free only (_FreeRows).
    """
    quads = [_Quadratic(*objective(p.stats, p.weight, method, mu, damp)) for p in problems]
    scale = sum(q.energy for q in quads)
    params = [p.weight.float().clone() for p in problems]
    opt = torch.optim.Adam(params, lr=lr)
    channels, device = len(problems[0].columns), problems[0].weight.device
    alive = torch.ones(channels, dtype=torch.bool, device=device)
    free = [_FreeRows(q.h.float() * (2 / scale), q.w_star.float()) for q in quads]
    for f, p in zip(free, problems):  # rows held at zero by earlier groups
        f.keep(~_dropped_mask(p, torch.nonzero(alive).squeeze(1), len(p.weight)))
    prox_end = max(1, iters // 3)
    for it in range(iters):
        for w, f in zip(params, free):
            w.grad = f.grad(w)
        opt.step()
        if it == prox_end:
            for group in opt.param_groups:
                group["lr"] = lr / 10
        if it < prox_end:
            target = channels - round((channels - keep) * (it + 1) / prox_end)
            norms = sum((w[p.columns] ** 2).sum(dim=(1, 2)) for w, p in zip(params, problems))
            norms[~alive] = -1
            alive = torch.zeros(channels, dtype=torch.bool, device=device)
            alive[torch.topk(norms, target).indices] = True
        for w, f, p in zip(params, free, problems):
            rows = _dropped_mask(p, torch.nonzero(alive).squeeze(1), len(w))
            f.keep(~rows)
            w[rows] = 0
            state = opt.state.get(w, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key][rows] = 0
    kept = torch.nonzero(alive).squeeze(1)
    weights = [w.double() for w in params]
    return Solution(kept, weights, sum(q.at(w) for q, w in zip(quads, weights)) / max(scale, 1e-30))
