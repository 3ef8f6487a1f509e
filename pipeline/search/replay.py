"""--widths: the widths of an earlier report, replayed.

A latency target is steered by timings and so differs from run to run, while its widths,
replayed with the same shots, seed and options, give the same model every time, with nothing
timed. Groups are matched by the layers that write them: their ids depend on the analysis, the
producers' names on the model alone.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from pipeline import prune, report
from pipeline.analyze import ChannelGroup
from pipeline.convert import TorchModel
from pipeline.errors import UsageError
from pipeline.search.modes import Mode, WidthsFrom
from pipeline.search.records import Keep


@dataclass
class Replay:
    """Channels kept per pruned group of an earlier report, keyed by the group's producers."""

    source: Path  # as given: named in every message
    widths: dict[tuple[str, ...], int]

    @classmethod
    def of(cls, mode: Mode) -> Replay | None:
        """A WidthsFrom mode's report, read and checked (before the model is loaded, so that an
        unreadable one fails first); None for the other modes."""
        if not isinstance(mode, WidthsFrom):
            return None
        return cls(mode.report, read_widths(Path(mode.report)))

    def fit(self, groups: list[ChannelGroup], teacher: TorchModel, config: prune.PruneConfig) -> Keep:
        """The widths as units kept per group of this model. A group that does not exist here, or
        that the current options leave whole (a report made with --scope all, replayed with
        internal), or a width off its unit, is a UsageError."""
        by_producers = {tuple(g.producers): g for g in groups}
        keep = {}
        for producers, channels in self.widths.items():
            g = by_producers.get(producers)
            why = "no such group in this model" if g is None else g.reason if not g.prunable else \
                prune.skip_reason(teacher, g, config)
            if why:
                raise UsageError(f"--widths {self.source}: the group written by {', '.join(producers)} cannot be "
                                 f"pruned here ({why}); was the report made from another model or with other options?")
            if channels % g.unit or not 0 < channels < g.channels:
                raise UsageError(f"--widths {self.source}: {channels} channels for the group written by "
                                 f"{', '.join(producers)} ({g.channels} channels in groups of {g.unit})")
            keep[g.id] = channels // g.unit
        return keep


def read_widths(path: Path) -> dict[tuple[str, ...], int]:
    """Channels kept per pruned group of an earlier report, keyed by the layers that write the
    group (its ids depend on the analysis, the producers' names on the model alone). Reads only
    the subset of the report that pipeline/report.py documents, and checks it."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"--widths {path}: cannot read it ({exc.strerror or exc})") from None
    try:
        rep = json.loads(text)
        schema = rep.get("schema", 0)
        if not isinstance(schema, int) or schema > report.SCHEMA:
            raise UsageError(f"--widths {path}: report schema {schema} is newer than this crossprune reads (up "
                             f"to {report.SCHEMA}); upgrade crossprune or run the search again with this version")
        widths = {}
        for g in rep["groups"]:
            producers, before, after = g["producers"], g["channels_before"], g["channels_after"]
            if not (isinstance(producers, list) and all(isinstance(p, str) for p in producers)
                    and isinstance(before, int) and isinstance(after, int) and 0 < after <= before):
                raise TypeError(f"group {g.get('id', '?')} has no valid producers and channel counts")
            if after < before:
                widths[tuple(producers)] = after
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UsageError(f"--widths {path}: not a crossprune compress report ({type(exc).__name__}: {exc}); "
                         f"give the JSON written by --report") from None
    if not widths:
        raise UsageError(f"--widths {path}: the report prunes no channel group")
    return widths
