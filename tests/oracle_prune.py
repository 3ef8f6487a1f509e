"""The straightforward reference the streaming walk is held to: for every group, run the teacher
and the student from the network's input with hooks on the group's consumers, then take the same
statistics, solve and refit. Slow (about G/2 full forward passes of both models for G groups),
obviously right, and kept only for tests."""
from __future__ import annotations

import numpy as np
import torch

from pipeline.prune import PruneResult, new_student, problem, skip_reason, stats
from pipeline.prune.core import GroupOutcome, _solve, _units
from pipeline.prune.layers import KINDS
from pipeline.solve import dropped_rows


class _Stop(Exception):
    pass


@torch.no_grad()
def _capture(model, consumers, pieces: list[torch.Tensor]) -> list[torch.Tensor]:
    """Inputs of the consumers for one unit (its pieces run one at a time and joined)."""
    per_piece = []
    for batch in pieces:
        seen = {}

        def hook_for(name):
            def hook(_module, args):
                seen[name] = args[0].detach()
                if len(seen) == len(consumers):
                    raise _Stop
            return hook

        handles = [model.entry(c.node).register_forward_pre_hook(hook_for(c.node)) for c in consumers]
        try:
            model.module(batch)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        per_piece.append([seen[c.node] for c in consumers])
    return [torch.cat(parts) for parts in zip(*per_piece)]


def prune_by_capture(view, teacher, groups, x, config, augmenter=None) -> PruneResult:
    student = new_student(teacher)
    result = PruneResult(student, [], {})
    fixed: dict[str, torch.Tensor] = {}
    units = _units(x, config.chunk, augmenter, teacher)
    for group in groups:
        if not group.prunable:
            continue
        count = config.kept_count(group.size, group.unit)
        why = skip_reason(teacher, group, config) or ("" if count < group.size else "nothing to remove")
        if why:
            result.skipped[group.id] = why
            continue
        captured = [(_capture(teacher, group.consumers, u), _capture(student, group.consumers, u)) for u in units]
        problems = []
        for k, c in enumerate(group.consumers):
            p = problem(view, c, group.size, fixed.get(c.node), teacher.device)
            aliased = all(torch.equal(xt[k], xs[k]) for xt, xs in captured)
            grams = stats.grams_needed(config.method, aliased, False)
            acc = stats.Accumulator(len(p.weight), grams, teacher.device)
            counts = [stats.positions(view, c, xt[k]) for xt, _ in captured]
            for (xt, xs), pick in zip(captured, stats.picks(c.node, counts, config.rows, teacher.device)):
                rt = stats.rows(view, c, xt[k], pick)
                acc.add(rt if aliased else stats.rows(view, c, xs[k], pick), rt)
            p.stats = stats.stats(acc.means(c.node), aliased, acc.rows)
            problems.append(p)
        sol = _solve(problems, count, config)
        for c, p, w in zip(group.consumers, problems, sol.weights):
            layer = KINDS[c.kind].to_onnx(view, c, w.cpu().numpy())
            fixed[c.node] = dropped_rows(p, sol.kept)
            result.layers[c.node] = layer
            KINDS[c.kind].write(student, view, c, layer)
        result.outcomes.append(GroupOutcome(group.id, group.size, sol.kept.cpu().numpy().astype(np.int64),
                                            sol.loss, 0.0))
    return result
