"""Few-shot pruning, group by group in network order, in one walk over the network.

The teacher is the converted original; each student starts as its copy and is pruned in place
(masked: dropped input channels of each consumer are zero, producers untouched), so that every
later group sees the real student input h_s that its predecessors left behind. Only Gram
matrices are kept. Several configurations that prune the same groups (the candidates of
--method auto) walk together: the teacher's values and its Gram matrices are shared.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import fx

from pipeline.analyze import ChannelGroup, Consumer
from pipeline.augment import Augmenter
from pipeline.convert import TorchModel
from pipeline.graph import GraphView
from pipeline.prune import refit, stats
from pipeline.prune.cache import GroupOutcome, Prefixes, Solved, TeacherGrams
from pipeline.prune.config import PruneConfig
from pipeline.prune.layers import KINDS, LayerWeights, unsupported
from pipeline.prune.stream import Plan, Value, Walk
from pipeline.solve import Problem, Solution, dropped_rows, kept_rows, solve_closed, solve_l1, solve_pgd

Progress = Callable[[str], None]


@dataclass
class PruneResult:
    student: TorchModel
    outcomes: list[GroupOutcome]
    layers: dict[str, LayerWeights]
    skipped: dict[int, str] = field(default_factory=dict)  # group id -> why it was left whole

    @property
    def kept(self) -> dict[int, np.ndarray]:
        return {o.group: o.kept for o in self.outcomes}


def skip_reason(teacher: TorchModel, group: ChannelGroup, config: PruneConfig) -> str:
    """Why a prunable group is left whole under this configuration, or ''."""
    if config.excludes(group):
        return f"excluded by --exclude ({config.excludes(group)})"
    if group.coupling and config.scope == "internal":
        return f"coupled: {group.coupling}; --scope all prunes it"
    return unsupported(teacher, group)


@dataclass
class Job:
    """One pruning of a walk: a configuration, and the widths to keep where not its ratio (groups
    an allocation leaves out stay whole)."""

    config: PruneConfig
    keep: dict[int, int] | None = None
    kept: dict[int, np.ndarray] | None = None  # channels chosen elsewhere (per group id): refit only, no loss
    ranking: bool = False  # only compared with other jobs (--method auto's candidates): refits in float32
    follows: int | None = None  # refit only the channels that this earlier job of the walk chooses, as it goes

    @property
    def refits(self) -> bool:
        """Whether the channels come from elsewhere (no selection, no loss of its own)."""
        return self.kept is not None or self.follows is not None


def prune(view: GraphView, teacher: TorchModel, groups: list[ChannelGroup], x: np.ndarray,
          config: PruneConfig, progress: Progress = lambda _: None,
          augmenter: Augmenter | None = None, keep: dict[int, int] | None = None,
          cache: TeacherGrams | None = None, reuse: Prefixes | None = None,
          kept: dict[int, np.ndarray] | None = None) -> PruneResult:
    """Prune every eligible group to `config.ratio`, or to `keep[group id]` channels when an
    allocation is given (groups it leaves out stay whole); `kept`: only refit these channels. Pass
    one `cache`, and one `reuse`, to every call on the same samples."""
    return prune_jobs(view, teacher, groups, x, [Job(config, keep, kept)], progress, augmenter, cache, reuse)[0]


def prune_jobs(view: GraphView, teacher: TorchModel, groups: list[ChannelGroup], x: np.ndarray,
               jobs: Sequence[Job], progress: Progress = lambda _: None, augmenter: Augmenter | None = None,
               cache: TeacherGrams | None = None, reuse: Prefixes | None = None) -> list[PruneResult]:
    """Several prunings of the same samples in one walk: the teacher's values and Gram matrices
    are computed once for all of them. Progress is told group by group, of the first job."""
    todo, runs = _schedule(teacher, groups, jobs, reuse, progress)
    walking = [r for r in runs if r.walks]
    if walking:
        _walk(view, teacher, todo, x, walking, augmenter, cache if cache is not None else TeacherGrams(), progress)
    for r in runs:
        if not r.walks:  # magnitude pruning, or every group found in `reuse`
            for t in range(len(todo)):
                r.solve(view, t, None, _told(r, runs, progress))
    return [r.result for r in runs]


def _told(run: _Run, runs: list[_Run], progress: Progress) -> Progress:
    """`progress` for the first run, nothing for the others: one line per group."""
    return progress if run is runs[0] else lambda _: None


def teacher_problems(view: GraphView, teacher: TorchModel, groups: list[ChannelGroup], x: np.ndarray,
                     config: PruneConfig, augmenter: Augmenter | None, cache: TeacherGrams,
                     visit: Callable[[ChannelGroup, list[Problem]], None]) -> None:
    """Each group's problems on the teacher alone (nothing pruned before it), handed to `visit`
    in order as one walk over the teacher reaches them."""
    run = _Run(Job(config), PruneResult(teacher, [], {}), groups, [g.size - 1 for g in groups], None)
    _walk(view, teacher, groups, x, [run], augmenter, cache, lambda _: None, writes=False,
          solved=lambda t, problems: visit(groups[t], problems))


def new_student(teacher: TorchModel) -> TorchModel:
    """A copy of the teacher whose layers can be refit, found by the same ONNX node names."""
    student = TorchModel(copy.deepcopy(teacher.module), {}, batch=teacher.batch, device=teacher.device)
    named = dict(student.module.named_modules())
    teacher_names = {m: n for n, m in teacher.module.named_modules()}
    student.modules_by_node = {k: named[teacher_names[m]] for k, m in teacher.modules_by_node.items()}
    student.entries = {k: named[teacher_names[m]] for k, m in teacher.entries.items()}
    return student


def _schedule(teacher: TorchModel, groups: list[ChannelGroup], jobs: Sequence[Job], reuse: Prefixes | None,
              progress: Progress) -> tuple[list[ChannelGroup], list[_Run]]:
    """The groups some job prunes, in order, and each job's kept count of each (None: left whole,
    the reason recorded in its result)."""
    results = [PruneResult(new_student(teacher), [], {}) for _ in jobs]
    todo, counts = [], [[] for _ in jobs]
    for group in filter(lambda g: g.prunable, groups):
        wanted = []
        for job, result in zip(jobs, results):
            config = job.config
            count = config.kept_count(group.size, group.unit) if job.keep is None else job.keep.get(group.id,
                                                                                                      group.size)
            why = skip_reason(teacher, group, config) or ("" if count < group.size else "nothing to remove")
            if why:
                result.skipped[group.id] = why
                if result is results[0]:
                    progress(f"group {group.id}: skipped ({why})")
            wanted.append(None if why else count)
        if any(n is not None for n in wanted):
            todo.append(group)
            for k, n in enumerate(wanted):
                counts[k].append(n)
    runs = [_Run(job, result, todo, n, reuse) for job, result, n in zip(jobs, results, counts)]
    for k, run in enumerate(runs):
        if run.job.follows is not None:
            if not 0 <= run.job.follows < k or jobs[run.job.follows].refits:
                raise ValueError("Job.follows must name an earlier job of the same walk that selects its channels")
            run.leader = runs[run.job.follows]
            if any(n is not None and lead is None for n, lead in zip(run.counts, run.leader.counts)):
                raise ValueError("a job that follows another prunes a group that the other leaves whole")
    return todo, runs


class _Run:
    """One job's student along the walk."""

    def __init__(self, job: Job, result: PruneResult, groups: list[ChannelGroup], counts: list[int | None],
                 reuse: Prefixes | None):
        self.job, self.config, self.result, self.reuse = job, job.config, result, reuse
        self.groups, self.counts = groups, counts
        self.leader: _Run | None = None  # the run whose channels this one refits (Job.follows)
        self.fixed: dict[str, torch.Tensor] = {}  # consumer -> input rows dropped with earlier groups (Concat)
        widths: list[tuple[int, int]] = []
        self.keys, self.found = [], []
        for group, count in zip(groups, counts):
            if count is not None:
                widths.append((group.id, count))
            self.keys.append((self.config, tuple(widths)))
            usable = reuse is not None and count is not None and not job.refits
            self.found.append(reuse.get(self.keys[-1]) if usable else None)
        self.walks = self.config.method != "l1" and any(
            n is not None and f is None for n, f in zip(counts, self.found))

    def pending(self, t: int) -> bool:
        """Whether time t needs statistics for this job."""
        return self.counts[t] is not None and self.found[t] is None

    def given(self, t: int) -> torch.Tensor | None:
        """The channels of time t's group chosen elsewhere (by the leader: once it solved time t), if any."""
        kept = self.job.kept if self.leader is None else self.leader.result.kept
        if kept is None:
            return None
        return torch.as_tensor(kept[self.groups[t].id], device=self.result.student.device)

    def problems(self, view: GraphView, t: int) -> list[Problem]:
        """Time t's consumers with this job's held rows, without statistics."""
        group = self.groups[t]
        return [problem(view, c, group.size, self.fixed.get(c.node), self.result.student.device)
                for c in group.consumers]

    def solve(self, view: GraphView, t: int, problems: list[Problem] | None, progress: Progress,
              seconds: float = 0.0, solution: Solution | None = None) -> None:
        """Solve time t (from `problems` with statistics, or a `solution` found already; magnitude,
        or the solve `reuse` holds, need neither) and refit the student."""
        group, count, solved = self.groups[t], self.counts[t], self.found[t]
        if count is None:
            return
        if solved is None:
            start = time.perf_counter()
            problems = problems or self.problems(view, t)
            solution = solution or _solve(problems, count, self.config)
            layers = [KINDS[c.kind].to_onnx(view, c, w.cpu().numpy())
                      for c, w in zip(group.consumers, solution.weights)]
            rows = [dropped_rows(p, solution.kept) for p in problems]
            kept = solution.kept.cpu().numpy().astype(np.int64)
            seconds += time.perf_counter() - start
            solved = Solved(GroupOutcome(group.id, group.size, kept, solution.loss, seconds), layers, rows)
            if self.reuse is not None and not self.job.refits:
                self.reuse.put(self.keys[t], solved)
        for consumer, layer, rows in zip(group.consumers, solved.layers, solved.fixed):
            self.fixed[consumer.node] = rows
            self.result.layers[consumer.node] = layer
            KINDS[consumer.kind].write(self.result.student, view, consumer, layer)
        self.result.outcomes.append(solved.outcome)
        progress(f"group {group.id}: {group.channels} -> {len(solved.outcome.kept) * group.unit} channels")


def _walk(view: GraphView, teacher: TorchModel, todo: list[ChannelGroup], x: np.ndarray, runs: list[_Run],
          augmenter: Augmenter | None, cache: TeacherGrams, progress: Progress, writes: bool = True,
          solved: Callable[[int, list[Problem]], None] | None = None) -> None:
    """Statistics of every group on the students its predecessors left, in one plan; without
    `writes`, on the teacher alone, each time's problems handed to `solved` instead."""
    calls = _call_nodes(teacher)
    inputs = {c.node: _input_node(calls, teacher, c) for group in todo for c in group.consumers}
    plan = Plan(teacher.module.graph, [{calls[id(teacher.entry(c.node))] for c in group.consumers}
                                       if writes and any(r.counts[t] is not None for r in runs) else set()
                                       for t, group in enumerate(todo)])
    config = runs[0].config
    plan.build(_needs(todo, runs, inputs, plan, cache))
    walk = Walk(teacher.module, [r.result.student.module for r in runs], _units(x, config.chunk, augmenter, teacher))

    leading, following = [r for r in runs if r.leader is None], [r for r in runs if r.leader is not None]

    def visit(t: int) -> None:
        """Solve time t; a run that follows another one once that one has chosen."""
        solve_runs(t, leading)
        if following:
            solve_runs(t, following)

    def solve_runs(t: int, batch: list[_Run]) -> None:
        start = time.perf_counter()
        group = todo[t]
        selecting = [r for r in batch if r.pending(t) and not r.job.refits]
        fitting = [r for r in batch if r.pending(t) and r.job.refits]
        problems: dict[int, list[Problem]] = {id(r): [] for r in selecting}
        fits: dict[int, list[torch.Tensor]] = {id(r): [] for r in fitting}
        held = {id(r): r.problems(view, t) for r in fitting}  # problems without statistics
        for k, c in enumerate(group.consumers):
            node = inputs[c.node]
            version = plan.version(node, t)
            if selecting:
                made = _consumer_stats(view, c, group.size, node, version, walk,
                                       [runs.index(r) for r in selecting], runs, cache, config)
                for r, p in zip(selecting, made):
                    problems[id(r)].append(p)
            if fitting:
                weights = _consumer_refits(view, c, [held[id(r)][k] for r in fitting], t, node, version, walk,
                                           fitting, runs, config)
                for r, w in zip(fitting, weights):
                    fits[id(r)].append(w)
        if solved is not None:
            solved(t, problems[id(runs[0])])
            return
        seconds = (time.perf_counter() - start) / max(1, len(selecting) + len(fitting))
        for r in batch:
            fitted = id(r) in fits
            r.solve(view, t, held[id(r)] if fitted else problems.get(id(r)), _told(r, runs, progress), seconds,
                    refit.solution(r.given(t), fits[id(r)]) if fitted else None)

    walk.run(plan.ops, visit)


def _needs(todo: list[ChannelGroup], runs: list[_Run], inputs: dict[str, fx.Node], plan: Plan,
           cache: TeacherGrams) -> list[list[Value]]:
    """The values each time reads: the teacher's and each pending run's inputs of its consumers."""
    needs = []
    for t, group in enumerate(todo):
        wanted: list[Value] = []
        for c in group.consumers:
            node, version = inputs[c.node], plan.version(inputs[c.node], t)
            cached = cache.get(c.node, runs[0].config) is not None
            for r in filter(lambda r: r.pending(t), runs):
                grams = ("tt", "st") if r.job.refits else stats.grams_needed(r.config.method, version == 0, cached)
                if any("t" in g for g in grams):
                    wanted.append((node, 0))
                if version and any("s" in g for g in grams):
                    wanted.append((node, version))
        needs.append(wanted)
    return needs


def _consumer_refits(view: GraphView, c: Consumer, made: list[Problem], t: int, node: fx.Node, version: int,
                     walk: Walk, fitting: list[_Run], every: list[_Run], config: PruneConfig) -> list[torch.Tensor]:
    """Each fitting run's refit of consumer `c` (`made`: its problem in each run, at time t) from
    sums over the kept columns; the teacher's own term is summed once for all runs that keep the
    same rows."""
    aliased = version == 0
    held = [kept_rows(p, r.given(t), len(p.weight)) for p, r in zip(made, fitting)]
    xt = walk.unit_values((node, 0))
    xs = [xt if aliased else walk.unit_values((node, version), every.index(r)) for r in fitting]
    shared: dict[bytes, refit.KeptSums] = {}
    own: list[dict[tuple[str, str], refit.KeptSums]] = []
    for r, p, rows in zip(fitting, made, held):
        terms = {}
        for pair in refit.sources(r.config.method):
            if aliased or pair == ("t", "t"):
                terms[pair] = shared.setdefault(rows.cpu().numpy().tobytes(), refit.KeptSums(rows, p.weight))
            else:
                terms[pair] = refit.KeptSums(rows, p.weight)
        own.append(terms)
    counts = [stats.positions(view, c, u) for u in xt]
    seen: set[int] = set()
    weight = made[0].weight.float()  # the teacher's, whose outputs are every target
    for u, pick in enumerate(stats.picks(c.node, counts, config.rows, xt[0].device)):
        rt = stats.rows(view, c, xt[u], pick)
        outputs = {"t": rt @ weight}
        for r, terms, student in zip(fitting, own, xs):
            rs = rt if aliased else stats.rows(view, c, student[u], pick)
            mixed = {"t": rt, "s": rs, "m": rt if aliased else rt * r.config.mu + rs * (1 - r.config.mu)}
            for (a, target), sums in terms.items():
                if id(sums) in seen:
                    continue
                sums.add(mixed[a], outputs["t"] if target == "t" or aliased else rs @ weight)
                seen.add(id(sums))
        seen.clear()
    total = stats.picked(sum(counts), config.rows)
    done: dict[int, tuple] = {}
    for terms in own:
        for s in terms.values():
            if id(s) not in done:
                done[id(s)] = s.done(total)
    return [refit.solve(p, r.given(t), r.config.method, r.config.mu, r.config.damp,
                        {pair: done[id(s)] for pair, s in terms.items()}, r.job.ranking)
            for r, p, terms in zip(fitting, made, own)]


def _consumer_stats(view: GraphView, c: Consumer, channels: int, node: fx.Node, version: int, walk: Walk,
                    students: list[int], every: list[_Run], cache: TeacherGrams,
                    config: PruneConfig) -> list[Problem]:
    """The problem for consumer `c` of each run pending now (`students`: their places in the
    walk), its statistics summed over every unit."""
    runs = [every[k] for k in students]
    aliased = version == 0
    hit = cache.get(c.node, config)
    device = runs[0].result.student.device
    made = [problem(view, c, channels, r.fixed.get(c.node), device) for r in runs]
    dim = len(made[0].weight)
    grams = [stats.grams_needed(r.config.method, aliased, hit is not None) for r in runs]
    shared = ("tt",) if any("tt" in g for g in grams) else ()
    teacher_sums = stats.Accumulator(dim, shared, device)
    own = [stats.Accumulator(dim, tuple(g for g in gs if g != "tt"), device) for gs in grams]
    xt = walk.unit_values((node, 0)) if shared or any("st" in g for g in grams) else None
    xs = [walk.unit_values((node, version), k) if not aliased and acc.grams else None
          for k, acc in zip(students, own)]
    sample = xt if xt is not None else next((v for v in xs if v is not None), None)
    if sample is not None:
        counts = [stats.positions(view, c, u) for u in sample]
        for u, pick in enumerate(stats.picks(c.node, counts, config.rows, device)):
            rt = stats.rows(view, c, xt[u], pick) if xt is not None else None
            if shared:
                teacher_sums.add(None, rt)
            for k, acc in enumerate(own):
                if acc.grams:
                    acc.add(stats.rows(view, c, xs[k][u], pick), rt)
    tt = teacher_sums.means(c.node).get("tt") if shared else None
    rows = teacher_sums.rows if shared else None
    if shared:
        cache.put(c.node, config, tt, rows)
    elif hit is not None:
        tt, rows = hit
    for p, acc in zip(made, own):
        means = acc.means(c.node) if acc.grams else {}
        means["tt"] = tt
        p.stats = stats.stats(means, aliased, acc.rows if acc.grams else rows)
    return made


def problem(view: GraphView, consumer: Consumer, channels: int, fixed: torch.Tensor | None,
            device: torch.device) -> Problem:
    """Teacher weights in solver layout (inputs x outputs, bias row last) and channel rows, on `device`."""
    m = KINDS[consumer.kind].matrix(view, consumer)
    weight = torch.from_numpy(m.weight).to(device)
    if m.bias_fixed:
        bias_row = torch.tensor([len(m.weight) - 1], device=device)
        fixed = bias_row if fixed is None else torch.unique(torch.cat([fixed, bias_row]))
    arange = lambda n: torch.arange(n, device=device)  # noqa: E731
    columns = [((o + arange(channels)) * m.per)[:, None] + arange(m.per)[None, :] for o in consumer.offsets]
    return Problem(weight, torch.cat(columns, dim=1), fixed=fixed)


def _solve(problems: list[Problem], keep: int, config: PruneConfig):
    if config.method == "l1":
        return solve_l1(problems, keep)
    if config.solver == "pgd":
        return solve_pgd(problems, keep, config.method, config.mu, config.damp, config.pgd_iters, config.pgd_lr)
    return solve_closed(problems, keep, config.method, config.mu, config.damp)


def _call_nodes(model: TorchModel) -> dict[int, fx.Node]:
    """The graph node that calls each module, by the module's id."""
    gm = model.module
    return {id(gm.get_submodule(n.target)): n for n in gm.graph.nodes if n.op == "call_module"}


def _input_node(calls: dict[int, fx.Node], model: TorchModel, c: Consumer) -> fx.Node:
    node = calls[id(model.entry(c.node))]
    if not node.args or not isinstance(node.args[0], fx.Node):
        raise ValueError(f"consumer '{c.node}' reads no graph value as its input")
    return node.args[0]


def _units(x: np.ndarray, chunk: int, augmenter: Augmenter | None, model: TorchModel) -> list[list[torch.Tensor]]:
    """Every chunk of samples and its augmented variants, in the order statistics are summed,
    each in pieces of the model's fixed batch where it has one."""
    units = []
    for ci, i in enumerate(range(0, len(x), chunk)):
        for variant in (augmenter.variants(x[i:i + chunk], ci) if augmenter else [x[i:i + chunk]]):
            batch = torch.from_numpy(variant).to(model.device)
            units.append(list(batch.split(model.batch)) if model.batch else [batch])
    return units
