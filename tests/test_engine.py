"""Where torch computes (--device): a GPU must prune as the CPU does, and asking for one that is
not there is a usage error, not a crash. The GPU tests run where torch sees CUDA;
everywhere else they skip, saying so."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from pipeline import engine
from pipeline.cli import main
from pipeline.runtime import make_session, run_batched

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device here")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def compress(vgg_path, npz_path, out, device, *extra):
    report = out.with_suffix(".json")
    res = run("compress", vgg_path, "--data", npz_path, "--shots", 3, "-o", out, "--report", report, "--no-bench",
              "--quiet", "--device", device, *extra)
    assert res.exit_code == 0, res.output
    return json.loads(report.read_text())


def test_the_report_says_where_torch_ran(vgg_path, npz_path, tmp_path):
    rep = compress(vgg_path, npz_path, tmp_path / "s.onnx", "cpu", "--method", "cross")
    assert rep["engine"]["device"] == "cpu" and rep["engine"]["name"]
    res = run("report", tmp_path / "s.json")
    assert "torch on cpu" in res.output, res.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_asking_for_a_gpu_that_is_not_there_is_a_usage_error(vgg_path, npz_path, tmp_path):
    res = run("compress", vgg_path, "--data", npz_path, "--shots", 2, "-o", tmp_path / "s.onnx", "--no-bench",
              "--device", "cuda")
    assert res.exit_code == 2, res.output
    assert "--device cuda" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "s.onnx").exists()


@needs_cuda
@pytest.mark.parametrize("extra", [
    ("--method", "cross"),
    ("--method", "auto", "--scope", "all"),
    ("--method", "soft", "--solver", "pgd", "--pgd-iters", "200"),
    ("--method", "layerwise", "--target-flops", "0.4", "--finetune-steps", "20"),
], ids=["cross", "auto-all", "pgd", "allocated-finetuned"])
def test_a_gpu_prunes_as_the_cpu_does(vgg_path, npz_path, tmp_path, extra):
    cpu = compress(vgg_path, npz_path, tmp_path / "cpu.onnx", "cpu", *extra)
    gpu = compress(vgg_path, npz_path, tmp_path / "gpu.onnx", "cuda", *extra)
    assert gpu["engine"]["device"] == "cuda"
    assert [g["kept"] for g in gpu["groups"]] == [g["kept"] for g in cpu["groups"]]
    assert gpu["parity"]["slim_vs_masked_student"] < 1e-4
    x = np.load(npz_path)["x"][:16]
    a, b = (run_batched(make_session(str(tmp_path / name)), x)[0] for name in ("cpu.onnx", "gpu.onnx"))
    # float64 statistics on both; what differs is float32 rounding in the forward passes
    assert np.abs(a - b).max() <= 1e-3 * np.abs(a).max()
    again = compress(vgg_path, npz_path, tmp_path / "again.onnx", "cuda", *extra)
    assert again["output"]["sha256"] == gpu["output"]["sha256"], "not deterministic on the GPU"
    onnx.checker.check_model(onnx.load(str(tmp_path / "gpu.onnx")))


@pytest.mark.parametrize("device, code", [("auto", 0), ("cuda", 3)])
def test_a_twin_that_fails_on_the_chosen_device_falls_back_to_the_cpu_only_under_auto(
        vgg_path, npz_path, tmp_path, monkeypatch, device, code):
    """Stand-in for a converter that builds its tensors on the CPU: on the meta device every
    module converts and no forward pass gives numbers, so the parity check fails there."""
    monkeypatch.setattr(engine, "resolve", lambda name="auto": torch.device("meta"))
    report = tmp_path / "r.json"
    res = run("compress", vgg_path, "--data", npz_path, "--shots", 2, "-o", tmp_path / "s.onnx", "--report", report,
              "--no-bench", "--method", "cross", "--device", device)
    assert res.exit_code == code, res.output
    if code == 0:
        assert "warning: the torch twin fails on meta" in res.output and "running torch on the CPU" in res.output
        assert json.loads(report.read_text())["engine"]["device"] == "cpu"
    else:
        assert "Traceback" not in res.output and not (tmp_path / "s.onnx").exists()


def out_of_memory(monkeypatch, times: int) -> None:
    """Failure injected where a GPU would run out: in the solver, after every check passed, the
    first `times` calls."""
    from pipeline import prune

    real, calls = prune.prune, []

    def solver(*args, **kwargs):
        calls.append(1)
        if len(calls) <= times:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(prune, "prune", solver)


def test_a_gpu_out_of_memory_under_auto_starts_again_on_the_cpu(vgg_path, npz_path, tmp_path, monkeypatch):
    out_of_memory(monkeypatch, 1)
    report = tmp_path / "r.json"
    res = run("compress", vgg_path, "--data", npz_path, "--shots", 2, "-o", tmp_path / "s.onnx", "--report", report,
              "--no-bench", "--method", "cross")
    assert res.exit_code == 0, res.output
    assert "the GPU ran out of memory" in res.output and "starting again with torch on the CPU" in res.output
    assert json.loads(report.read_text())["engine"]["device"] == "cpu" and (tmp_path / "s.onnx").exists()


def test_a_gpu_out_of_memory_is_one_line_with_the_way_out(vgg_path, npz_path, tmp_path, monkeypatch):
    out_of_memory(monkeypatch, 2)  # on the GPU, and again: nothing left to fall back to
    res = run("compress", vgg_path, "--data", npz_path, "--shots", 2, "-o", tmp_path / "s.onnx", "--no-bench",
              "--method", "cross")
    assert res.exit_code == 1
    assert "ran out of memory" in res.output and "--device cpu" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "s.onnx").exists()
