"""Reports people read: Markdown for CI summaries and a self-contained HTML page, from a real run."""
from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import asdict
import xml.etree.ElementTree as ET

import pytest
import torch
import torchvision

from pipeline.bench import _summarise
from pipeline.render import COLOURS, markdown

from tests.test_cli import compressed, run  # noqa: F401 (the module fixture runs one real compress)

SVG = "{http://www.w3.org/2000/svg}"


def test_markdown_has_every_table(compressed, tmp_path):  # noqa: F811
    _, _, report = compressed
    res = run("report", report, "--format", "md")
    assert res.exit_code == 0, res.output
    rep = json.loads(report.read_text())
    md = res.output
    for title in ("### Size", "### Quality", "### Pruned channel groups", "### Latency"):
        assert title in md
    assert "| model | provider | batch | p50 ms | p90 ms | p99 ms | samples/s | speedup | cold start ms |" in md
    for t in rep["latency"]["timings"]:
        assert f"| {t['model']} | cpu | {t['batch']} | {t['p50_ms']:.3f} |" in md
    pruned = [g for g in rep["groups"] if g["channels_after"] < g["channels_before"]]
    assert sum(f"{g['channels_before']} -> {g['channels_after']}" in md for g in pruned) == len(pruned)
    slim = [t for t in rep["latency"]["timings"] if t["model"] == "slim"]
    assert slim and all(t["speedup_low"] <= t["speedup_high"] for t in slim)
    assert all(f"{t['speedup']:.2f}x ({t['speedup_low']:.2f}-{t['speedup_high']:.2f})" in md for t in slim
               if t["speedup_high"] - t["speedup_low"] >= 0.005)


def test_speedups_come_with_the_spread_between_rounds():
    base = [[2.0, 2.0, 2.0], [4.0, 4.0, 4.0]]  # the teacher's rounds: the machine slowed down by half
    t = _summarise("slim", "cpu", 1, [[1.0, 1.0, 1.0], [1.0, 1.1, 1.0]], 0.0, base)
    assert t.p50_ms == 1.0 and t.speedup == pytest.approx(3.0)  # pooled medians
    assert (t.speedup_low, t.speedup_high) == (pytest.approx(2.0), pytest.approx(4.0))  # round by round
    timings = {"latency": {"timings": [asdict(t)]}}
    assert "3.00x (2.00-4.00)" in markdown(timings)
    assert "| 1.00x |" in markdown({"latency": {"timings": [asdict(_summarise("t", "cpu", 1, base, 0.0, base))]}})


def test_a_link_of_the_chain_slower_than_the_one_before_is_pointed_out():
    def timing(model, batch, ms):
        return asdict(_summarise(model, "cpu", batch, [[ms]], 0.0, [[0.6]]))

    rep = {"latency": {"timings": [timing("teacher", 32, 0.6), timing("slim", 32, 0.24), timing("slim-int8", 32, 0.53),
                                   timing("teacher", 1, 0.05), timing("slim", 1, 0.03), timing("slim-int8", 1, 0.02),
                                   timing("slim-finetuned", 1, 0.0204)]}}  # 2% slower: noise
    notes = [line for line in markdown(rep).splitlines() if "slower than" in line]
    assert len(notes) == 1 and "slim-int8 is slower than slim on cpu at batch 32 (0.530 vs 0.240 ms)" in notes[0]


def test_html_is_self_contained_with_its_charts(compressed, tmp_path):  # noqa: F811
    _, _, report = compressed
    page = tmp_path / "report.html"
    res = run("report", report, "--format", "html", "-o", page)
    assert res.exit_code == 0, res.output
    text = page.read_text()
    root = ET.fromstring(text.split("\n", 1)[1])  # well-formed XHTML after the doctype
    assert "<script" not in text and "http://" not in text.replace("http://www.w3.org/", "")
    charts = root.findall(f".//{SVG}svg")
    assert [c.find(f"{SVG}title").text for c in charts] == ["channels per group", "p50 latency (ms)"]
    rep = json.loads(report.read_text())
    pruned = [g for g in rep["groups"] if g["channels_after"] < g["channels_before"]]
    assert len(charts[0].findall(f"{SVG}rect[@class='bar']")) == 2 * len(pruned)
    assert len(charts[1].findall(f"{SVG}rect[@class='bar']")) == len(rep["latency"]["timings"])


BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")


def test_html_opens_in_a_headless_browser_and_draws_its_charts(compressed, tmp_path):  # noqa: F811
    """Chromium shows a parse-error banner instead of an XHTML page it cannot read; the screenshot
    must show the bar colours of both charts."""
    browser = next((b for b in map(shutil.which, BROWSERS) if b), None)
    if browser is None:
        pytest.skip("no headless Chromium here (apt-get install chromium-headless-shell)")
    _, _, report = compressed
    page, shot = tmp_path / "report.html", tmp_path / "shot.png"
    assert run("report", report, "--format", "html", "-o", page).exit_code == 0
    strict = tmp_path / "report.xhtml"  # the XML parser: any well-formedness error shows as a banner
    strict.write_text(page.read_text())
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1000,3000"]
    dom = subprocess.run([browser, *flags, "--dump-dom", strict.as_uri()], capture_output=True, text=True,
                         timeout=120)
    assert dom.returncode == 0, dom.stderr[-500:]
    assert "error on line" not in dom.stdout and "parsererror" not in dom.stdout
    assert dom.stdout.count("<svg") == 2 and "p50 latency (ms)" in dom.stdout
    subprocess.run([browser, *flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120,
                   check=True)
    image = torchvision.io.read_image(str(shot))[:3].permute(1, 2, 0).reshape(-1, 3)
    for colour in COLOURS[:2]:  # "before" and "after" bars, in both charts
        rgb = torch.tensor([int(colour[i:i + 2], 16) for i in (1, 3, 5)], dtype=image.dtype)
        assert int((image == rgb).all(dim=1).sum()) > 500, f"no {colour} bars drawn"


def test_report_refuses_what_is_not_a_report(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text('{"hello": 1}')
    res = run("report", bad)
    assert res.exit_code == 2 and "not a crossprune report" in res.output


def test_an_unconfirmed_refinement_says_one_ratio_for_all_was_kept():
    from pipeline.render import _refine_note
    refinement = {"evaluations": 12, "misses": [], "moves": [{"move": "group 2 narrowed to 24"}],
                  "confirmation": {"start": 0.030, "refined": 0.035, "kept": False}}
    assert "not confirmed" in _refine_note(refinement)[0]
    refinement["confirmation"]["kept"] = True
    assert "not confirmed" not in _refine_note(refinement)[0] and "group 2 narrowed to 24" in _refine_note(refinement)[0]


@pytest.mark.parametrize("int8_ms, timed, said", [(2.0, False, True), (2.0, True, False), (0.5, False, False)])
def test_an_int8_model_slower_than_its_float_one_is_said_without_a_bench(int8_ms, timed, said):
    against = {"provider": "cpu", "batch": 32, "float_ms": 1.0, "int8_ms": int8_ms}
    rep = {"chain": [{"model": m, "accuracy": None, "top1_agreement": 1.0, "bytes": 1000}
                     for m in ("teacher", "slim", "slim-int8")],
           "quantization": {"activations": "uint8", "kept_float": [], "speed_trials": [],
                            "timed_against_float": against},
           "latency": {"timings": []} if timed else None}
    assert ("ran slower than the float one in the quantize stage's timing (2.000 vs 1.000 ms, cpu batch 32)"
            in markdown(rep)) == said
