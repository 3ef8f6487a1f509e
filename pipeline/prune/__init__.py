"""Few-shot pruning: statistics, channel selection and closed-form refit, in one walk.

    config.py  what a pruning is asked for (PruneConfig)
    layers.py  each kind of consumer layer between ONNX, the solver and torch
    stats.py   Gram matrices of consumer inputs, over a budget of rows
    stream.py  the plan and walk that evaluate the network once for every group
    cache.py   what prunings of the same samples share (teacher Gram matrices, solved groups)
    core.py    prune(): the groups in order, solved and refit as the walk reaches them
"""
from pipeline.prune.config import ALIGN, ROW_BUDGET, SCOPES, PruneConfig
from pipeline.prune.cache import GroupOutcome, Prefixes, TeacherGrams
from pipeline.prune.core import Job, PruneResult, new_student, problem, prune, prune_jobs, skip_reason, teacher_problems
from pipeline.prune.layers import CONVS, KINDS, LayerWeights

__all__ = ["ALIGN", "CONVS", "KINDS", "ROW_BUDGET", "SCOPES", "GroupOutcome", "Job", "LayerWeights", "Prefixes",
           "PruneConfig", "PruneResult", "TeacherGrams", "new_student", "problem", "prune", "prune_jobs",
           "skip_reason", "teacher_problems"]
