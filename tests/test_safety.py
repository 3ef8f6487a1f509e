"""Untrusted models and data, interruption, determinism: fail clearly, never lose or leak anything."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.cli import main
from tests.conftest import export, make_data

CLEAN_EXITS = {0, 2, 3, 4, 5, 6}


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def with_external_data(src, folder, location: str):
    """A copy of the model whose first Conv weight lives in an external file at `location`."""
    proto = onnx.load(str(src))
    init = next(i for i in proto.graph.initializer if len(i.dims) == 4)
    raw = onnx.numpy_helper.to_array(init).tobytes()
    init.ClearField("raw_data")
    init.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(raw)))):
        init.external_data.add(key=key, value=value)
    path = folder / "ext.onnx"
    onnx.save(proto, str(path))
    return path, raw


def test_external_data_inside_the_folder_loads(vgg_path, npz_path, tmp_path):
    path, raw = with_external_data(vgg_path, tmp_path, "weights.bin")
    (tmp_path / "weights.bin").write_bytes(raw)
    res = run("inspect", path, "--json")
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
def test_external_data_outside_the_folder_is_refused(vgg_path, tmp_path, where):
    folder = tmp_path / "model"
    folder.mkdir()
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 4096)
    location = {"parent": "../secret.bin", "absolute": str(secret), "symlink": "link.bin"}[where]
    if where == "symlink":
        os.symlink(secret, folder / "link.bin")
    path, _ = with_external_data(vgg_path, folder, location)
    res = run("inspect", path)
    assert res.exit_code == 3 and "outside the model's folder" in res.output


def test_declared_giant_tensor_is_refused_before_allocation(vgg_path, tmp_path):
    proto = onnx.load(str(vgg_path))
    huge = onnx.TensorProto(name="huge", data_type=onnx.TensorProto.FLOAT, dims=[1 << 40])  # no data behind it
    proto.graph.initializer.append(huge)
    path = tmp_path / "huge.onnx"
    onnx.save(proto, str(path))
    res = run("inspect", path)
    assert res.exit_code == 3 and "'huge' declares" in res.output and "--max-memory" in res.output


def test_data_over_the_budget_is_refused(vgg_path, npz_path, tmp_path):
    res = run("compress", vgg_path, "--data", npz_path, "--shots", 2, "-o", tmp_path / "s.onnx",
              "--max-memory", "32K", "--no-bench")
    assert res.exit_code == 4 and "over the memory budget" in res.output
    assert run("inspect", vgg_path, "--max-memory", "lots").exit_code == 2


def test_raw_pixels_for_a_normalising_model_are_refused(vgg_path, tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(vgg_path.read_bytes())
    (tmp_path / "m.preprocess.json").write_text(json.dumps({"mean": [0.3], "std": [0.35]}))
    x, y = make_data()
    np.savez(tmp_path / "raw.npz", x=(np.abs(x) * 80).astype(np.float32), y=y)
    res = run("compress", model, "--data", tmp_path / "raw.npz", "--shots", 2, "-o", tmp_path / "s.onnx", "--no-bench")
    assert res.exit_code == 4 and "preprocessed the same way" in res.output


def test_model_without_prunable_channels(tmp_path, npz_path):
    path = export(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 10)), tmp_path / "lin.onnx")
    res = run("compress", path, "--data", npz_path, "--shots", 2, "-o", tmp_path / "s.onnx", "--no-bench")
    assert res.exit_code == 5 and "no prunable channel group" in res.output


def test_opset_onnx_does_not_know(vgg_path, tmp_path):
    proto = onnx.load(str(vgg_path))
    proto.opset_import[0].version = 99
    path = tmp_path / "future.onnx"
    onnx.save(proto, str(path))
    res = run("inspect", path)
    assert res.exit_code == 3 and "future.onnx: opset 99 is newer" in res.output


def comparable(report: dict) -> dict:
    """The report without what depends on the clock."""
    drop = {"stages_seconds", "latency", "peak_rss_mb", "output"}
    out = {k: v for k, v in report.items() if k not in drop}
    out["groups"] = [{k: v for k, v in g.items() if k != "seconds"} for g in report["groups"]]
    out["options"] = {k: v for k, v in report["options"].items() if k != "output"}  # a.onnx vs b.onnx
    return out


def test_reports_are_identical_for_the_same_seed(vgg_path, npz_path, tmp_path):
    reports = []
    for name in ("a", "b"):
        res = run("compress", vgg_path, "--data", npz_path, "--shots", 2, "--seed", 5, "-o", tmp_path / f"{name}.onnx",
                  "--no-bench", "--json")
        assert res.exit_code == 0, res.output
        reports.append(comparable(json.loads(res.stdout)))
    assert reports[0] == reports[1]
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_killed_mid_run_leaves_nothing(vgg_path, npz_path, tmp_path, sig):
    model = tmp_path / "in.onnx"
    model.write_bytes(vgg_path.read_bytes())
    before = model.read_bytes()
    out = tmp_path / "out.onnx"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "compress", str(model), "--data", str(npz_path),
                             "--shots", "3", "-o", str(out), "--method", "cross", "--solver", "pgd",
                             "--pgd-iters", "1000000"],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    for line in proc.stderr:  # wait until the long stage has started
        if "prune" in line or time.time() > deadline:
            break
    time.sleep(0.5)
    proc.send_signal(sig)
    rest = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, rest
    assert "interrupted" in rest
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx"]
    assert model.read_bytes() == before


FUZZ = settings(max_examples=int(os.environ.get("CROSSPRUNE_FUZZ_EXAMPLES", "25")), deadline=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(data=st.data())
def test_mutated_models_fail_cleanly(vgg_path, npz_path, tmp_path_factory, data):
    raw = bytearray(vgg_path.read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[:data.draw(st.integers(0, len(raw)))]
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / "m.onnx"
    path.write_bytes(bytes(raw))
    res = run("inspect", path)
    assert res.exit_code in CLEAN_EXITS, res.output
    res = run("compress", path, "--data", npz_path, "--shots", 2, "-o", folder / "s.onnx", "--no-bench", "--quiet")
    assert res.exit_code in CLEAN_EXITS, res.output
    if res.exit_code != 0:
        assert not (folder / "s.onnx").exists()


@FUZZ
@given(n=st.integers(0, 12), shape=st.sampled_from([(1, 16, 16), (3, 16, 16), (1, 8, 8), (16, 16), (1, 16, 16, 1)]),
       dtype=st.sampled_from(["float32", "float64", "float16", "int32", "uint8", "bool"]),
       poison=st.sampled_from([None, np.nan, np.inf, 1e30]), labels=st.sampled_from(["none", "ok", "float", "short"]))
def test_mutated_data_fails_cleanly(vgg_path, tmp_path_factory, n, shape, dtype, poison, labels):
    x = np.random.default_rng(n).standard_normal((n, *shape)).astype(dtype)
    if poison is not None and n and np.issubdtype(x.dtype, np.floating):
        x.flat[0] = poison
    arrays = {"x": x}
    if labels == "ok":
        arrays["y"] = np.arange(n) % 2
    elif labels == "float":
        arrays["y"] = np.zeros(n)
    elif labels == "short":
        arrays["y"] = np.zeros(max(n - 1, 0), np.int64)
    folder = tmp_path_factory.mktemp("fuzzdata")
    np.savez(folder / "d.npz", **arrays)
    res = run("compress", vgg_path, "--data", folder / "d.npz", "--samples", max(n, 1), "-o", folder / "s.onnx",
              "--no-bench", "--quiet")
    assert res.exit_code in CLEAN_EXITS, res.output


OPS = ["Relu", "Add", "Mul", "Concat", "Transpose", "Conv", "Gemm", "Flatten", "MaxPool", "Reshape", "Sigmoid",
       "BatchNormalization", "GlobalAveragePool", "Split", "Identity"]


@FUZZ
@given(data=st.data())
def test_structurally_mutated_graphs_fail_cleanly(vgg_path, npz_path, tmp_path_factory, data):
    """Valid protobufs with wrong graphs: op types, wiring, attributes and shapes changed."""
    proto = onnx.load(str(vgg_path))
    nodes, inits = proto.graph.node, proto.graph.initializer
    for _ in range(data.draw(st.integers(1, 3))):
        kind = data.draw(st.sampled_from(["op", "input", "attr", "dims", "drop"]))
        node = nodes[data.draw(st.integers(0, len(nodes) - 1))]
        if kind == "op":
            node.op_type = data.draw(st.sampled_from(OPS))
        elif kind == "input" and node.input:
            tensors = [o for n in nodes for o in n.output] + [i.name for i in inits]
            node.input[data.draw(st.integers(0, len(node.input) - 1))] = data.draw(st.sampled_from(tensors))
        elif kind == "attr" and node.attribute:
            attr = node.attribute[data.draw(st.integers(0, len(node.attribute) - 1))]
            if attr.type == onnx.AttributeProto.INT:
                attr.i = data.draw(st.integers(-3, 5))
            elif attr.type == onnx.AttributeProto.INTS and attr.ints:
                attr.ints[0] = data.draw(st.integers(-2, 5))
        elif kind == "dims":
            init = inits[data.draw(st.integers(0, len(inits) - 1))]
            if init.dims:
                init.dims[0] = max(1, init.dims[0] + data.draw(st.integers(-2, 2)))
        elif kind == "drop" and len(nodes) > 2:
            nodes.remove(node)
    folder = tmp_path_factory.mktemp("fuzzgraph")
    path = folder / "m.onnx"
    path.write_bytes(proto.SerializeToString())
    res = run("inspect", path)
    assert res.exit_code in CLEAN_EXITS, res.output
    res = run("compress", path, "--data", npz_path, "--shots", 2, "-o", folder / "s.onnx", "--no-bench", "--quiet")
    assert res.exit_code in CLEAN_EXITS, res.output


def test_debug_shows_the_traceback(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x01garbage")
    quiet = subprocess.run([sys.executable, "-m", "pipeline", "inspect", str(junk)], capture_output=True, text=True)
    loud = subprocess.run([sys.executable, "-m", "pipeline", "inspect", str(junk), "--debug"], capture_output=True, text=True)
    assert "Traceback" not in quiet.stderr and "Traceback" in loud.stderr and "ModelError" in loud.stderr
    assert quiet.returncode == 3 and loud.returncode != 0


def test_folder_given_as_model(tmp_path):
    res = run("inspect", tmp_path)
    assert res.exit_code == 3 and "not a regular file" in res.output


def test_a_collapsed_model_is_refused_with_what_to_try_and_the_floor_can_be_turned_off(tmp_path):
    """The trained demo teacher cut to a sliver of its channels answers unlike itself on shots the
    pruning never saw (set aside, since every sample is a shot): exit 7 with the reason, no model;
    --min-fidelity 0 writes it. At its usual ratio the same command passes."""
    assets = Path(__file__).resolve().parents[1] / "pipeline" / "assets"
    out, report = tmp_path / "slim.onnx", tmp_path / "r.json"
    base = ["compress", assets / "demo_vgg.onnx", "--data", assets / "demo_shots", "--shots", 10, "--method",
            "cross", "--no-bench", "-o", out, "--report", report]
    res = run(*base, "--ratio", 0.05)
    assert res.exit_code == 7 and "collapsed" in res.output and "--ratio" in res.output, res.output
    assert not out.exists()
    rep = json.loads(report.read_text())
    assert (rep["quality"]["split"], rep["quality"]["samples"], rep["data"]["calibration_samples"]) == \
        ("held-out", 20, 80)
    assert any("20 of the 100 samples set aside" in n for n in rep["data"]["notes"])
    assert run(*base, "--ratio", 0.05, "--min-fidelity", 0).exit_code == 0 and out.exists()
    out.unlink()
    res = run(*base, "--ratio", 0.5)
    assert res.exit_code == 0 and json.loads(report.read_text())["quality"]["top1_agreement"] > 0.8, res.output
