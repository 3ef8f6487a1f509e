"""Refits of channels chosen elsewhere, from statistics of the kept columns only.

Every objective is a least-squares problem sum_i w_i ||A_i W - T_i||^2 plus the ridge toward the
teacher: cross distillation is mu ||X_t W - X_t W_t||^2 + (1 - mu) ||X_s W - X_s W_t||^2,
layer-wise regression ||X_s W - X_t W_t||^2, soft ||M W - X_t W_t||^2 with M = a X_t + (1 - a) X_s.
With the dropped rows of W fixed at zero, the refit needs only A_K'A_K and A_K'T over the kept
columns K, about a quarter of the full Gram matrices at half width, and no selection at all:
what --method auto's candidates need once they share one choice of channels.
"""
from __future__ import annotations

import torch

from pipeline.prune.stats import RowBlocks, add_gram, mirror
from pipeline.solve import Problem, Solution, kept_rows

TERMS = {  # method -> (weight as a function of mu, rows of A, rows whose W_t output is the target)
    "cross": ((lambda mu: mu, "t", "t"), (lambda mu: 1 - mu, "s", "s")),
    "layerwise": ((lambda mu: 1.0, "s", "t"),),
    "soft": ((lambda mu: 1.0, "m", "t"),),
}


class KeptSums:
    """A_K'A_K, A_K'T and the diagonal of A'A (the ridge is relative to the mean diagonal of the
    whole H) for one pair of row sources, summed over units in blocks; T is the teacher layer's
    output on the target rows, X W_t."""

    def __init__(self, rows: torch.Tensor, weight: torch.Tensor):
        self.k = rows
        dim, out = len(rows), weight.shape[1]
        dev = weight.device
        self.gram = torch.zeros(dim, dim, dtype=torch.float64, device=dev)
        self.cross = torch.zeros(dim, out, dtype=torch.float64, device=dev)
        self.diag = torch.zeros(len(weight), dtype=torch.float64, device=dev)
        self._blocks = RowBlocks()

    def add(self, a: torch.Tensor, target: torch.Tensor) -> None:
        if self._blocks.add(a, target):
            self._flush()

    def _flush(self) -> None:
        joined = self._blocks.take()
        if joined is None:
            return
        a, target = joined
        a_k = a.index_select(1, self.k)
        add_gram(self.gram, a_k, a_k)
        self.cross += (a_k.T @ target).double()
        self.diag += (a * a).sum(0).double()

    def done(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self._flush()
        return mirror(self.gram).div_(rows), self.cross.div_(rows), self.diag.div_(rows)


def sources(method: str) -> set[tuple[str, str]]:
    """The (rows of A, rows of the target) pairs a method's objective sums."""
    return {(a, t) for _, a, t in TERMS[method]}


def solve(problem: Problem, kept: torch.Tensor, method: str, mu: float, damp: float,
          sums: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
          ranking: bool = False) -> torch.Tensor:
    """The refit weights (full rows, dropped ones zero) from the summed terms of `method`; in
    float32 where they only rank candidates."""
    rows = kept_rows(problem, kept, len(problem.weight))
    h = b = diag = 0
    for weight_of, a, t in TERMS[method]:
        gram, cross, d = sums[(a, t)]
        w = weight_of(mu)
        h, b, diag = h + w * gram, b + w * cross, diag + w * d
    ridge = damp * float(diag.mean().clamp_min(1e-12))
    dtype = torch.float32 if ranking else torch.float64
    h = h.to(dtype, copy=True)
    h.diagonal().add_(ridge)
    b = (b + ridge * problem.weight[rows]).to(dtype)
    chol, info = torch.linalg.cholesky_ex(h)
    out = torch.zeros_like(problem.weight)
    out[rows] = (torch.cholesky_solve(b, chol) if int(info) == 0 else torch.linalg.solve(h, b)).to(out.dtype)
    return out


def solution(kept: torch.Tensor, weights: list[torch.Tensor]) -> Solution:
    """A refit from kept columns reports no loss: the full objective is not at hand."""
    return Solution(kept, weights, float("nan"))
