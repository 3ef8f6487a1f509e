"""A consumer's sufficient statistics: Gram matrices of its input rows, over a budget of rows.

Every objective is quadratic in the consumer's weights, so it needs only G_tt = X_t'X_t,
G_ss = X_s'X_s and G_st = X_s'X_t of the unfolded teacher and student inputs. A large feature
map gives hundreds of thousands of nearly redundant patch rows, and each costs D^2 in every
Gram matrix: the rows are sampled down to a fixed budget per consumer, the same rows in the
teacher and the student, spread over the inputs in proportion to their rows and drawn from a
seed tied to the consumer, so that every pruning of the same samples reads the same rows.
"""
from __future__ import annotations

import zlib

import numpy as np
import torch

from pipeline.analyze import Consumer
from pipeline.errors import ModelError
from pipeline.graph import GraphView
from pipeline.prune.layers import KINDS
from pipeline.solve import Stats

GRAMS = {"cross": ("tt", "ss"), "layerwise": ("ss", "st"), "soft": ("tt", "ss", "st")}


def picks(consumer: str, counts: list[int], budget: int, device: torch.device) -> list[torch.Tensor | None]:
    """Per input unit, the rows to keep (sorted flat indices), or None for all of them: all
    where the units hold no more than `budget` rows together, else a share of the budget in
    proportion to each unit's rows, drawn without replacement."""
    total = sum(counts)
    if picked(total, budget) == total:
        return [None] * len(counts)
    quota = np.floor(np.asarray(counts) * budget / total).astype(int)
    quota[np.argsort(-(np.asarray(counts) * budget / total - quota), kind="stable")[:budget - quota.sum()]] += 1
    seed = zlib.crc32(consumer.encode())
    out = []
    for unit, (n, q) in enumerate(zip(counts, quota)):
        chosen = np.sort(np.random.default_rng([seed, unit]).choice(n, int(q), replace=False))
        out.append(torch.from_numpy(chosen).to(device))
    return out


def picked(total: int, budget: int) -> int:
    """How many of `total` rows `picks` keeps under `budget` (0: no budget)."""
    return min(total, budget) if budget else total


def rows(view: GraphView, consumer: Consumer, inp: torch.Tensor, pick: torch.Tensor | None = None) -> torch.Tensor:
    """The consumer's input as rows of its linear map, with a ones column for the bias."""
    flat = KINDS[consumer.kind].rows(view, consumer, inp, pick)
    return torch.cat([flat, flat.new_ones(len(flat), 1)], dim=1)


def positions(view: GraphView, consumer: Consumer, inp: torch.Tensor) -> int:
    return len(inp) * KINDS[consumer.kind].positions(view, consumer, inp)


class RowBlocks:
    """Rows gathered across units into blocks of about FLUSH_BYTES (counted on the first part
    given) before each product: a few sampled rows per unit would otherwise pay a D x D
    conversion and sum per unit for little work."""

    FLUSH_BYTES = 64 << 20

    def __init__(self):
        self._pending: list[tuple[torch.Tensor | None, ...]] = []
        self._bytes = 0

    def add(self, *parts: torch.Tensor | None) -> bool:
        """Keep one unit's rows (parts None where nothing reads them); True once a block is full."""
        first = next(p for p in parts if p is not None)
        self._pending.append(parts)
        self._bytes += first.numel() * first.element_size()
        return self._bytes >= self.FLUSH_BYTES

    def take(self) -> list[torch.Tensor | None] | None:
        """Each part's rows joined over the units kept (None if none were), and start afresh."""
        if not self._pending:
            return None
        joined = [None if first is None else torch.cat([p[i] for p in self._pending])
                  for i, first in enumerate(self._pending[0])]
        self._pending, self._bytes = [], 0
        return joined


class Accumulator:
    """Sums the Gram matrices one consumer's objective needs over units of inputs (float32
    products over RowBlocks, float64 sums)."""

    def __init__(self, dim: int, grams: tuple[str, ...], device: torch.device):
        self.grams = grams
        self.sums = {g: torch.zeros(dim, dim, dtype=torch.float64, device=device) for g in grams}
        self.rows = 0
        self._blocks = RowBlocks()

    def add(self, student: torch.Tensor | None, teacher: torch.Tensor | None) -> None:
        """Rows of one unit; either side None where no Gram matrix asked for reads it."""
        self.rows += len(student if student is not None else teacher)
        if self.grams and self._blocks.add(student, teacher):
            self._flush()

    def _flush(self) -> None:
        joined = self._blocks.take()
        if joined is None:
            return
        a = {"s": joined[0], "t": joined[1]}
        for g, total in self.sums.items():
            add_gram(total, a[g[0]], a[g[1]])

    def means(self, node: str) -> dict[str, torch.Tensor]:
        self._flush()
        if not all(torch.isfinite(g.sum()) for g in self.sums.values()):  # an Inf or NaN anywhere makes the sum one
            raise ModelError(f"layer '{node}' receives NaN or Inf on the samples (teacher or student); "
                             f"check the model and the data's preprocessing")
        return {g: (mirror(total) if g[0] == g[1] else total).div_(self.rows) for g, total in self.sums.items()}


def grams_needed(method: str, aliased: bool, teacher_cached: bool) -> tuple[str, ...]:
    """The Gram matrices to sum: G_tt alone where the student's input is the teacher's, none of
    the teacher's that a cache holds."""
    needed = ("tt",) if aliased else GRAMS[method]
    return tuple(g for g in needed if not (teacher_cached and g == "tt"))


def stats(means: dict[str, torch.Tensor], aliased: bool, rows: int) -> Stats:
    if aliased:
        return Stats(means["tt"], means["tt"], means["tt"], rows)
    return Stats(*(means.get(g) for g in ("tt", "ss", "st")), rows)


def add_gram(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor, blocks: int = 4) -> None:
    """total += a'b (float32 product, float64 sum). For a Gram a'a only the blocks on and above
    the diagonal are computed, 5/8 of the work with four blocks; `mirror` completes it once."""
    if a is not b:
        total += (a.T @ b).double()
        return
    cuts = [len(total) * i // blocks for i in range(blocks + 1)]
    for start, end in zip(cuts, cuts[1:]):
        total[start:end, start:] += (a[:, start:end].T @ a[:, start:]).double()


def mirror(upper: torch.Tensor, block: int = 256) -> torch.Tensor:
    """The symmetric matrix whose upper triangle `add_gram` accumulated, made in place: each
    block below the diagonal is copied from its transpose above, block by block, which keeps
    both reads in cache (a whole-matrix transpose of a 4,609-wide Gram matrix took 4x longer)."""
    cuts = [*range(0, len(upper), block), len(upper)]
    for i, (start, end) in enumerate(zip(cuts, cuts[1:])):
        diagonal = upper[start:end, start:end]
        diagonal.copy_(diagonal.triu() + diagonal.triu(1).T)
        for below, below_end in zip(cuts[i + 1:], cuts[i + 2:]):
            upper[below:below_end, start:end] = upper[start:end, below:below_end].T
    return upper
