"""What every pruning of one set of samples can share: the teacher's Gram matrices, and groups
already solved with the same configuration and earlier widths, within a memory budget."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline import engine
from pipeline.prune.config import PruneConfig
from pipeline.prune.layers import LayerWeights


@dataclass
class GroupOutcome:
    group: int
    size: int
    kept: np.ndarray
    loss: float
    seconds: float


@dataclass
class Solved:
    """One group's result on the student the groups before it left: its consumers' new weights
    and held rows, in the order of `group.consumers`."""

    outcome: GroupOutcome
    layers: list[LayerWeights]
    fixed: list[torch.Tensor]


class _Kept:
    """What fits in `budget` bytes of one device's memory (an eighth of it by default), first come
    first kept: the caches below serve every pruning of one set of samples."""

    def __init__(self, budget: int | None = None):
        self.budget = budget
        self._items: dict = {}
        self._bytes = 0
        self.hits = 0

    def _get(self, key):
        found = self._items.get(key)
        self.hits += found is not None
        return found

    def _put(self, key, value, size: int, device: torch.device) -> None:
        if self.budget is None:
            self.budget = engine.memory(device) // 8
        if key not in self._items and self._bytes + size <= self.budget:
            self._items[key] = value
            self._bytes += size


class TeacherGrams(_Kept):
    """G_tt of each consumer over one set of samples and their variants. The teacher never
    changes, so every student pruned from the same samples (the widths a target tries) can
    share them."""

    def get(self, consumer: str, config: PruneConfig) -> tuple[torch.Tensor, int] | None:
        return self._get((consumer, config.chunk, config.rows))

    def put(self, consumer: str, config: PruneConfig, gram: torch.Tensor, rows: int) -> None:
        self._put((consumer, config.chunk, config.rows), (gram, rows), gram.numel() * gram.element_size(),
                  gram.device)


class Prefixes(_Kept):
    """Groups already solved on one set of samples, by configuration and the widths of every group
    pruned up to and including them: that is all the student a group sees depends on. A trial
    that differs from an earlier one only from some group on (the refinement narrows or widens
    one or two groups at a time) then reuses the solves before it, equal to the last bit."""

    def get(self, key: tuple) -> Solved | None:
        return self._get(key)

    def put(self, key: tuple, solved: Solved) -> None:
        size = sum(a.nbytes for layer in solved.layers for a in (layer.weight, layer.bias) if a is not None)
        self._put(key, solved, size, torch.device("cpu"))  # the layers' new weights are numpy arrays
