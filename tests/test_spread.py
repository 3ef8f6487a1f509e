"""--ratio 0.6 under --scope all on a squeeze-excitation network: one ratio for all collapses it, the
same FLOPs spread by the loss curves do not (tools/teachers/tiny_se.onnx, trained on
Fashion-MNIST; the shots and test images are the demo's, padded to the teacher's 32x32)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import main
from tests.conftest import TinyResidual, export, make_data, randomise_bn

ROOT = Path(__file__).resolve().parents[1]
TEACHER = ROOT / "tools" / "teachers" / "tiny_se.onnx"
BLACK = -0.286 / 0.353  # a black pixel, normalised as the teacher was trained


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, Path]:
    """10 shots per class and 1,000 other test images."""
    data = np.load(ROOT / "pipeline" / "assets" / "demo_eval.npz")
    x = np.pad(data["x"], ((0, 0), (0, 0), (2, 2), (2, 2)), constant_values=BLACK)
    y = data["y"]
    shots = np.concatenate([np.flatnonzero(y == c)[:10] for c in range(10)])
    rest = np.setdiff1d(np.arange(len(y)), shots)[:1000]
    folder = tmp_path_factory.mktemp("se")
    np.savez(folder / "shots.npz", x=x[shots], y=y[shots])
    np.savez(folder / "test.npz", x=x[rest], y=y[rest])
    return folder / "shots.npz", folder / "test.npz"


def compress(tmp_path: Path, images: tuple[Path, Path], *extra: str):
    tmp_path.mkdir()
    out, report = tmp_path / "slim.onnx", tmp_path / "report.json"
    res = CliRunner().invoke(main, ["compress", str(TEACHER), "--data", str(images[0]), "--shots", "10",
                                    "--eval-data", str(images[1]), "--scope", "all", "--ratio", "0.6",
                                    "--method", "cross", "-o", str(out), "--report", str(report), "--no-bench",
                                    "--quiet", *extra])
    return res, out, json.loads(report.read_text()) if report.exists() else None


def test_the_ratios_flops_spread_by_the_loss_curves_keep_an_se_network_working(tmp_path, images):
    res, out, rep = compress(tmp_path / "uniform", images, "--uniform")
    assert res.exit_code == 7 and "collapsed" in res.output and not out.exists()  # one ratio for all
    uniform = rep["quality"]["student_accuracy"]

    res, out, rep = compress(tmp_path / "spread", images)
    assert res.exit_code == 0, res.output
    spread = rep["allocation"]
    assert spread["chosen"] == "allocated" and spread["cost"].endswith("spread")
    scores = spread["holdout_relative_squared_error"]
    assert scores["allocated"] < scores["uniform"]
    assert rep["quality"]["student_accuracy"] > uniform + 0.2
    # the same FLOPs, within a rounding step of the groups'
    assert abs(spread["share"] - spread["ratio_share"]) < 0.02
    assert "spread over the groups by their loss curves" in CliRunner().invoke(
        main, ["report", str(tmp_path / "spread" / "report.json")]).output


def test_uniform_is_about_the_ratio_alone(tmp_path, images):
    res = CliRunner().invoke(main, ["compress", str(TEACHER), "--data", str(images[0]), "--shots", "10",
                                    "--target-flops", "0.5", "--uniform", "-o", str(tmp_path / "x.onnx")])
    assert res.exit_code == 2 and "--uniform" in res.output and "--target-flops" in res.output


def test_method_auto_s_held_out_error_settles_one_ratio_for_all_without_pruning_again(tmp_path):
    """Under --method auto the chosen objective's error on the first fold is one ratio for all's:
    where it settles, nothing is pruned on the fold again; --method cross prunes it to know."""
    torch.manual_seed(0)
    model = export(randomise_bn(TinyResidual()), tmp_path / "r.onnx")
    x, y = make_data(4)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    reports = {}
    for method in ("auto", "cross"):
        report = tmp_path / f"{method}.json"
        res = CliRunner().invoke(main, ["compress", str(model), "--data", str(tmp_path / "d.npz"), "--shots", "4",
                                        "--scope", "all", "--ratio", "0.75", "--method", method, "-o",
                                        str(tmp_path / f"{method}.onnx"), "--report", str(report), "--no-bench",
                                        "--augment", "none"])
        assert res.exit_code == 0, res.output
        reports[method] = (json.loads(report.read_text()), res.output)
    (auto, said), (cross, cross_said) = reports["auto"], reports["cross"]
    assert auto["allocation"]["chosen"] == "uniform" and auto["auto"]["holdout_splits"] == 1
    chosen = f"{auto['auto']['method']} mu={auto['auto']['mu']}"
    uniform = auto["allocation"]["holdout_relative_squared_error"]["uniform"]
    assert uniform == auto["auto"]["holdout_relative_squared_error"][chosen] <= 0.02
    assert "spread, held-out fold" not in said and "spread, held-out fold" in cross_said
