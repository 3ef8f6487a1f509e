"""The report: one JSON-ready dict built by the stages, and its short human rendering."""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import resource
import sys


def versions() -> dict:
    names = ("onnx", "onnxruntime-gpu", "onnxruntime", "onnx2torch", "onnxslim", "torch", "numpy", "click")
    out = {"python": sys.version.split()[0]}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def peak_rss_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def dumps(report: dict) -> str:
    return json.dumps(report, indent=2, sort_keys=False, default=_jsonable)


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if hasattr(value, "to_json"):
        return value.to_json()
    return str(value)


def table(header: list[str], rows: list[list[str]]) -> str:
    """Plain-text table: numbers right-aligned, text (node names, reasons) left-aligned."""
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) if i and _numeric(str(c)) else str(c).ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _numeric(cell: str) -> bool:
    return cell[:1].isdigit() or (cell[:1] in "-+" and cell[1:2].isdigit()) or set(cell) <= {"-"}


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def summary(report: dict) -> str:
    """A few short tables for a person at a terminal."""
    parts = []
    totals = report["totals"]
    parts.append(table(["", "before", "after", "ratio"], [
        ["FLOPs/sample", f"{totals['flops_before'] / 1e6:.2f}M", f"{totals['flops_after'] / 1e6:.2f}M",
         f"{totals['flops_before'] / max(totals['flops_after'], 1):.2f}x"],
        ["parameters", f"{totals['params_before'] / 1e3:.1f}k", f"{totals['params_after'] / 1e3:.1f}k",
         f"{totals['params_before'] / max(totals['params_after'], 1):.2f}x"],
        ["file size", f"{totals['bytes_before'] / 1e3:.0f} kB", f"{totals['bytes_after'] / 1e3:.0f} kB",
         f"{totals['bytes_before'] / max(totals['bytes_after'], 1):.2f}x"],
    ]))
    q = report.get("quality")
    if q:
        rows = [["top-1 agreement with teacher", _pct(q["top1_agreement"])],
                ["relative output error", f"{q['relative_error']:.4f}"]]
        if q.get("teacher_accuracy") is not None:
            rows += [["accuracy teacher", _pct(q["teacher_accuracy"])],
                     ["accuracy slim", _pct(q["student_accuracy"])],
                     ["accuracy drop", f"{100 * q['accuracy_drop']:.2f} points"]]
        parts.append(table([f"quality on {q['samples']} {q['split']} samples", ""], rows))
    if len(report.get("chain") or []) > 2:
        parts.append(_chain(report))
    groups = [g for g in report["groups"] if g["channels_after"] != g["channels_before"]]
    if groups:
        parts.append(table(["pruned group (producer)", "channels", "loss", "s"], [
            [_producers(g), f"{g['channels_before']} -> {g['channels_after']}",
             "-" if g["loss"] is None else f"{g['loss']:.4f}", f"{g['seconds']:.2f}"] for g in groups]))
    frozen = [g for g in report["groups"] if g["reason"]]
    if frozen:
        parts.append("left whole: " + "; ".join(f"{_producers(g)} ({g['reason']})" for g in frozen))
    lat = report.get("latency")
    if lat:
        parts.append(latency_table(lat))
    return "\n\n".join(parts)


def _producers(group: dict) -> str:
    names = group["producers"]
    return names[0] if len(names) == 1 else f"{names[0]} +{len(names) - 1}"


def latency_table(lat: dict) -> str:
    rows = [[t["model"], t["provider"], str(t["batch"]), f"{t['p50_ms']:.3f}", f"{t['p90_ms']:.3f}",
             f"{t['p99_ms']:.3f}", f"{t['throughput']:.0f}", f"{t['speedup']:.2f}x"] for t in lat["timings"]]
    text = table(["model", "provider", "batch", "p50 ms", "p90 ms", "p99 ms", "samples/s", "speedup"], rows)
    for provider, why in lat.get("unavailable", {}).items():
        text += f"\n{provider}: unavailable: {why}"
    return text


def _chain(report: dict) -> str:
    chain = report["chain"]
    text = table(["model", "accuracy", "agreement", "size"], [
        [c["model"], _pct(c["accuracy"]), _pct(c["top1_agreement"]), f"{c['bytes'] / 1e3:.0f} kB"] for c in chain])
    kept = (report.get("quantization") or {}).get("kept_float")
    if kept:
        text += "\nkept in float after the INT8 check: " + ", ".join(kept)
    return text


def summary_chain(report: dict) -> str:
    """The `quantize` command's tables: the float -> int8 chain and the latency."""
    parts = [_chain(report)]
    if report.get("latency"):
        parts.append(latency_table(report["latency"]))
    return "\n\n".join(parts)
