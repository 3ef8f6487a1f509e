"""The report for people: terminal tables, Markdown (CI job summaries) and self-contained HTML.

All three render the same sections, so what a terminal shows, a CI summary and an HTML page
show too. Only keys present in the report are shown: a `quantize` report has no channel groups.
"""
from __future__ import annotations

import html as _html
from dataclasses import dataclass, field


@dataclass
class Section:
    title: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


def sections(report: dict) -> list[Section]:
    """The report's tables in reading order; each builder returns None where its part is absent."""
    built = (f(report) for f in (_size_section, _quality_section, _chain_section, _groups_section,
                                 _latency_section, _target_section))
    return [s for s in built if s is not None]


def _size_section(report: dict) -> Section | None:
    totals = report.get("totals")
    if not totals:
        return None
    return Section("Size", ["", "before", "after", "ratio"], [
        ["FLOPs/sample", f"{totals['flops_before'] / 1e6:.2f}M", f"{totals['flops_after'] / 1e6:.2f}M",
         _ratio(totals["flops_before"], totals["flops_after"])],
        ["parameters", f"{totals['params_before'] / 1e3:.1f}k", f"{totals['params_after'] / 1e3:.1f}k",
         _ratio(totals["params_before"], totals["params_after"])],
        ["file size", f"{totals['bytes_before'] / 1e3:.0f} kB", f"{totals['bytes_after'] / 1e3:.0f} kB",
         _ratio(totals["bytes_before"], totals["bytes_after"])]])


def _quality_section(report: dict) -> Section | None:
    q = report.get("quality")
    if not q or "groups" not in report:
        return None
    rows = [["top-1 agreement with teacher", _pct(q["top1_agreement"])],
            ["relative output error", f"{q['relative_error']:.4f}"]]
    if q.get("teacher_accuracy") is not None:
        rows += [["accuracy teacher", _pct(q["teacher_accuracy"])],
                 ["accuracy slim", _pct(q["student_accuracy"])],
                 ["accuracy drop", f"{100 * q['accuracy_drop']:.2f} points"]]
    title = f"Quality on {q['samples']} {q['split']} samples"
    parity = report.get("parity") or {}
    drift = [f"onnxruntime's graph optimizations change the teacher's outputs by "
             f"{parity['onnxruntime_optimized_vs_as_written']:.2e} (relative) against its graph as written: "
             f"the slim model was verified as written, and is measured here as onnxruntime optimizes it, "
             f"as the teacher is"] if parity.get("optimizer_changes_outputs") else []
    return Section(title, [title.lower(), ""], rows, drift)


def _chain_section(report: dict) -> Section | None:
    chain = report.get("chain") or []
    if len(chain) <= 2 and "groups" in report:
        return None
    quant = report.get("quantization") or {}
    faster = [t for t in quant.get("speed_trials", []) if t["kept_float"]]
    for_error = [n for n in quant.get("kept_float") or [] if n not in {t["layer"] for t in faster}]
    notes = [f"int8 activations: {quant['activations']}"] if quant.get("activations") else []
    notes += ["kept in float for fidelity after the INT8 check: " + ", ".join(for_error)] if for_error else []
    notes += [f"kept in float for speed: {t['layer']} ({t['float_ms']:.3f} ms vs {t['int8_ms']:.3f} ms "
              f"all int8, {t['provider']} batch {t['batch']})" for t in faster]
    against = quant.get("timed_against_float")
    if against and not report.get("latency") and against["int8_ms"] > SLOWER * against["float_ms"]:
        notes.append(f"the int8 model ran slower than the float one in the quantize stage's timing "
                     f"({against['int8_ms']:.3f} vs {against['float_ms']:.3f} ms, {against['provider']} batch "
                     f"{against['batch']})")
    return Section("Chain", ["model", "accuracy", "agreement", "size"], [
        [c["model"], _pct(c["accuracy"]), _pct(c["top1_agreement"]), f"{c['bytes'] / 1e3:.0f} kB"]
        for c in chain], notes)


def _groups_section(report: dict) -> Section | None:
    groups = report.get("groups") or []
    pruned = [g for g in groups if g["channels_after"] != g["channels_before"]]
    frozen = [g for g in groups if g["reason"]]
    if not (pruned or frozen):
        return None
    cost = (report.get("allocation") or {}).get("cost", "")
    notes = [f"{cost} (--widths): nothing timed, the same model every run"] if cost.startswith("widths") else []
    notes += _spread_note(report["allocation"]) if cost.endswith("spread") else \
        _flops_note(report["allocation"]) if cost.startswith("flops") else []
    notes += _auto(report.get("auto")) + _rounding(pruned)
    notes += ["left whole: " + "; ".join(f"{producers(g)} ({g['reason']})" for g in frozen)] if frozen else []
    return Section("Pruned channel groups", ["group (producer)", "channels", "loss", "s"], [
        [producers(g), f"{g['channels_before']} -> {g['channels_after']}",
         "-" if g["loss"] is None else f"{g['loss']:.4f}", f"{g['seconds']:.2f}"] for g in pruned],
        notes + _engine(report.get("engine")))


def _latency_section(report: dict) -> Section | None:
    lat = report.get("latency")
    if not lat:
        return None
    return Section("Latency", ["model", "provider", "batch", "p50 ms", "p90 ms", "p99 ms", "samples/s", "speedup",
                               "cold start ms"],
                   [[t["model"], t["provider"], str(t["batch"]), f"{t['p50_ms']:.3f}", f"{t['p90_ms']:.3f}",
                     f"{t['p99_ms']:.3f}", f"{t['throughput']:.0f}", _speedup(t), f"{t['cold_start_ms']:.1f}"]
                    for t in lat["timings"]],
                   [f"{p}: unavailable: {why}" for p, why in lat.get("unavailable", {}).items()]
                   + _slower_links(lat["timings"])
                   + ["steady state: medians of interleaved rounds, in brackets the lowest and highest "
                      "speedup of one round; cold start: session creation and the first run, apart"])


def _target_section(report: dict) -> Section | None:
    alloc = report.get("allocation")
    if not (alloc and alloc.get("attempts")):
        return None
    target = alloc["target"]
    goal = f"{target['speedup']}x" if target["speedup"] else f"{target['latency_ms']} ms"
    runs = alloc.get("candidates") or {"allocated": alloc}
    scores = {n: c["holdout_relative_squared_error"] for n, c in runs.items()
              if c.get("holdout_relative_squared_error") is not None}
    notes = [f"{alloc['chosen']} widths kept" + (" (relative squared error on held-out shots: " + ", ".join(
        f"{n} {v:.4f}" for n, v in scores.items()) + ")" if scores else "")] if "chosen" in alloc else []
    return Section(f"Latency target ({goal} on {target['provider']} at batch {target['batch']})",
                   ["widths", "attempt", "predicted ms", "measured ms", "goal ms", "teacher ms"],
                   [[name, f"{i + 1}{' (kept)' if i + 1 == run.get('kept_attempt') else ''}",
                     f"{a['predicted_ms']:.3f}", f"{a['measured_ms']:.3f}", f"{a['goal_ms']:.3f}",
                     f"{a['teacher_ms']:.3f}"]
                    for name, run in runs.items() for i, a in enumerate(run["attempts"])],
                   notes + _allocation_note(alloc.get("allocation_confirmation"))
                   + _refine_note(alloc.get("refinement")) + [_met_note(alloc)] + _thread_note(alloc.get("one_thread")))


def _auto(auto: dict | None) -> list[str]:
    """Which objective --method auto refit with, and who chose the channels."""
    if not auto:
        return []
    splits = auto["holdout_splits"]
    return [f"objective {auto['method']} mu={auto['mu']}, closest to the teacher on held-out shots"
            f"{f' ({splits} splits)' if splits > 1 else ''} among {len(auto['holdout_relative_squared_error'])} "
            f"refitting the channels {auto['channels_chosen_by']} chose"]


def _allocation_note(confirmation: dict | None) -> list[str]:
    """Widths from the loss curves that were best on the held-out shots stand only if the other shots agree."""
    if not confirmation:
        return []
    rival, unseen = confirmation["rival"], confirmation["unseen_relative_squared_error"]
    verdict = "kept" if confirmation["kept"] else f"not confirmed: {rival} kept"
    return [f"allocated widths best on the held-out shots; on the shots no score had seen {unseen['allocated']:.4f} "
            f"against {rival} {unseen[rival]:.4f} ({verdict})"]


def _thread_note(timed: dict | None) -> list[str]:
    """A pruned model faster on one thread than on every core should be served so, and searched so."""
    if not timed or not timed["faster_on_one_thread"]:
        return []
    one, every = timed["one_thread_ms"], timed["all_cores_ms"]
    return [f"faster on one thread: {one['slim']:.3f} ms against {every['slim']:.3f} ms on all cores "
            f"({one['teacher'] / one['slim']:.2f}x the teacher on one thread); serve it on one thread and search "
            f"with --threads 1"]


def _refine_note(refinement: dict | None) -> list[str]:
    if not refinement:
        return []
    moves = "; ".join(m["move"] for m in refinement["moves"]) or "no move beat one ratio for all"
    if refinement.get("confirmation") and not refinement["confirmation"]["kept"]:
        moves += " (not confirmed on the shots the search never scored on: one ratio for all kept)"
    misses = f", {len(refinement['misses'])} trades over the time allowed" if refinement["misses"] else ""
    return [f"refined by local search ({refinement['evaluations']} held-out prunings{misses}): {moves}"]


def _flops_note(alloc: dict) -> list[str]:
    head = f"--target-flops {alloc['target_share']:.3g}: {alloc['share']:.3g} of the FLOPs kept"
    if alloc.get("chosen", "allocated") == "allocated":  # a report without "chosen" allocated its widths
        return [f"{head}, widths allocated from the solver's loss curves"]
    return [f"{head}, from one ratio for all ({alloc['ratio']:.2f})"] + _refine_note(alloc["refinement"])


def _spread_note(alloc: dict) -> list[str]:
    """Whether the ratio's FLOPs were spread by the loss curves, and what the held-out shots said."""
    scores = alloc["holdout_relative_squared_error"] or {}
    said = ", ".join(f"{'one ratio for all' if n == 'uniform' else n} {v:.4f}" for n, v in scores.items())
    said = f" (held-out error: {said})" if said else ""
    kept = "spread over the groups by their loss curves" if alloc["chosen"] == "allocated" else \
        "kept one ratio for all: close to the teacher already" if "allocated" not in scores else \
        "kept one ratio for all: spreading them was not closer to the teacher"
    return [f"--scope all: the ratio's {alloc['ratio_share']:.3g} of the FLOPs {kept}{said}; --uniform turns "
            f"this off"]


def _engine(engine: dict | None) -> list[str]:
    return [f"statistics and solves: torch on {engine['device']} ({engine['name']})"] if engine else []


def _met_note(alloc: dict) -> str:
    together = alloc.get("timed_together")
    if together:
        ms = together["ms"].get(alloc["chosen"])
        return (f"{'met' if alloc['target_met_timed_together'] else 'NOT met'} when timed with the teacher in one "
                f"run: {ms:.3f} ms for {together['goal_ms']:.3f} ms asked")
    return "met" if alloc["target_met"] else "NOT met: the fastest attempt was kept"


def summary(report: dict) -> str:
    """Plain-text tables for a terminal."""
    return "\n\n".join("\n".join([table(s.header, s.rows)] * bool(s.rows) + s.notes) for s in sections(report))


def _slower_links(timings: list[dict]) -> list[str]:
    """A model slower than the one timed before it (not the first: that is the speedup's 1.00x),
    e.g. an int8 model whose kernels cost more than they save on this provider and batch. Within
    5% it is timing noise, not worth a line."""
    notes, timed = [], {}
    for t in timings:
        before = timed.setdefault((t["provider"], t["batch"]), [])
        if len(before) > 1 and t["p50_ms"] > SLOWER * before[-1]["p50_ms"]:
            notes.append(f"{t['model']} is slower than {before[-1]['model']} on {t['provider']} at batch {t['batch']} "
                         f"({t['p50_ms']:.3f} vs {before[-1]['p50_ms']:.3f} ms)")
        before.append(t)
    return notes


def latency_table(lat: dict) -> str:
    return summary({"latency": lat})


def markdown(report: dict) -> str:
    """GitHub-flavoured Markdown, e.g. for $GITHUB_STEP_SUMMARY."""
    inp = report.get("input", {})
    parts = [f"## crossprune: {inp.get('path', 'report')}"]
    for s in sections(report):
        parts.append(f"### {s.title}")
        if s.rows:
            esc = lambda c: str(c).replace("|", "\\|")
            parts.append("\n".join([f"| {' | '.join(map(esc, s.header))} |", f"|{'---|' * len(s.header)}"]
                                   + [f"| {' | '.join(map(esc, r))} |" for r in s.rows]))
        parts += [f"> {n}" for n in s.notes]
    return "\n\n".join(parts) + "\n"


def html(report: dict) -> str:
    """One self-contained XHTML page: the same tables plus SVG charts, no scripts, no fetches."""
    e = _html.escape
    inp = report.get("input", {})
    body = [f"<h1>crossprune: {e(str(inp.get('path', 'report')))}</h1>"]
    for s in sections(report):
        body.append(f"<h2>{e(s.title)}</h2>")
        if s.title == "Latency":
            body.append(latency_svg(report["latency"]))
        if s.title == "Pruned channel groups":
            body.append(widths_svg(report["groups"]))
        if s.rows:
            head = "".join(f"<th>{e(h)}</th>" for h in s.header)
            rows = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in s.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        body += [f"<p class=\"note\">{e(n)}</p>" for n in s.notes]
    return ("<!DOCTYPE html>\n<html xmlns=\"http://www.w3.org/1999/xhtml\" lang=\"en\"><head><meta charset=\"utf-8\"/>"
            "<title>crossprune report</title><style>body{font-family:sans-serif;margin:2em;max-width:70em}"
            "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em;"
            "text-align:right}td:first-child,th:first-child{text-align:left}.note{color:#555}"
            "svg{display:block;margin:.5em 0}</style></head><body>" + "".join(body) + "</body></html>\n")


COLOURS = ("#9aa5b1", "#1f77b4", "#2ca02c", "#d62728")
SLOWER = 1.05  # a link of the chain this much slower than the one before is pointed out


def latency_svg(lat: dict) -> str:
    """Grouped bars: p50 latency per (provider, batch), one bar per model."""
    models = list(dict.fromkeys(t["model"] for t in lat["timings"]))
    cases = list(dict.fromkeys((t["provider"], t["batch"]) for t in lat["timings"]))
    value = {(t["model"], t["provider"], t["batch"]): t["p50_ms"] for t in lat["timings"]}
    bars = [[(m, value.get((m, p, b))) for m in models] for p, b in cases]
    labels = [f"{p} b{b}" for p, b in cases]
    return _bars("p50 latency (ms)", labels, bars, models, "ms")


def widths_svg(groups: list[dict]) -> str:
    """Per pruned group, channels before and after."""
    pruned = [g for g in groups if g["channels_after"] != g["channels_before"]]
    bars = [[("before", g["channels_before"]), ("after", g["channels_after"])] for g in pruned]
    return _bars("channels per group", [f"g{g['id']}" for g in pruned], bars, ["before", "after"], "")


def _bars(title: str, labels: list[str], bars: list[list[tuple[str, float | None]]], series: list[str],
          unit: str) -> str:
    e = _html.escape
    top = max([v for group in bars for _, v in group if v is not None] + [1e-9])
    n = max(len(series), 1)
    slot, bar_w, height, left = max(24, 10 * n + 14), 10, 160, 50
    width = left + slot * len(labels) + 10
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 60}" role="img" '
             f'aria-label="{e(title)}"><title>{e(title)}</title>',
             f'<text x="{left}" y="12" font-size="12">{e(title)}</text>',
             f'<line x1="{left}" y1="{height + 20}" x2="{width - 10}" y2="{height + 20}" stroke="#333"/>',
             f'<text x="{left - 4}" y="24" font-size="10" text-anchor="end">{top:.3g}</text>']
    for i, (label, group) in enumerate(zip(labels, bars)):
        x0 = left + i * slot + 4
        for j, (name, v) in enumerate(group):
            if v is None:
                continue
            h = height * v / top
            parts.append(f'<rect class="bar" x="{x0 + j * bar_w}" y="{height + 20 - h:.1f}" width="{bar_w - 1}" '
                         f'height="{h:.1f}" fill="{COLOURS[series.index(name) % len(COLOURS)]}">'
                         f'<title>{e(name)} {e(label)}: {v:.4g}{unit}</title></rect>')
        parts.append(f'<text x="{x0}" y="{height + 34}" font-size="9">{e(label)}</text>')
    for j, name in enumerate(series):
        parts.append(f'<rect x="{left + 90 * j}" y="{height + 44}" width="10" height="10" '
                     f'fill="{COLOURS[j % len(COLOURS)]}"/><text x="{left + 90 * j + 14}" y="{height + 53}" '
                     f'font-size="10">{e(name)}</text>')
    return "".join(parts) + "</svg>"


def table(header: list[str], rows: list[list[str]]) -> str:
    """Plain-text table: numbers right-aligned, text (node names, reasons) left-aligned."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) if i and _numeric(str(c)) else str(c).ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def producers(group: dict) -> str:
    names = group["producers"]
    return names[0] if len(names) == 1 else f"{names[0]} +{len(names) - 1}"


def _numeric(cell: str) -> bool:
    return cell[:1].isdigit() or (cell[:1] in "-+" and cell[1:2].isdigit()) or set(cell) <= {"-"}


def _ratio(before: float, after: float) -> str:
    return f"{before / max(after, 1):.2f}x"


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _rounding(pruned: list[dict]) -> list[str]:
    """One line naming the multiples the pruned groups' widths were rounded to, and how many of
    each; one naming the groups cut a whole group of a grouped Conv or a GroupNorm at a time."""
    counts: dict[int, int] = {}
    for g in pruned:
        if g.get("multiple") not in (None, 1, g.get("unit", 1)):
            counts[g["multiple"]] = counts.get(g["multiple"], 0) + 1
    parts = [f"of {step} in {n} group{'s' if n > 1 else ''}" for step, n in sorted(counts.items(), reverse=True)]
    lines = [f"kept widths rounded to multiples {', '.join(parts)} (--round-to; onnxruntime runs a width "
             f"between two multiples as slowly as the next)"] if parts else []
    for heads in (False, True):
        grouped = [g for g in pruned if g.get("unit", 1) > 1 and bool(g.get("heads")) == heads]
        if grouped:
            what = "attention heads" if heads else "whole groups of a grouped Conv or GroupNorm"
            lines.append(f"{len(grouped)} group{'s' if len(grouped) > 1 else ''} cut in {what} "
                         f"({', '.join(map(str, sorted({g['unit'] for g in grouped})))} channels each)")
    return lines


def _speedup(timing: dict) -> str:
    """'2.43x (2.21-2.90)': the spread between rounds says how far to trust the second digit."""
    low, high = timing.get("speedup_low"), timing.get("speedup_high")
    if low is None or high is None or high - low < 0.005:
        return f"{timing['speedup']:.2f}x"
    return f"{timing['speedup']:.2f}x ({low:.2f}-{high:.2f})"
