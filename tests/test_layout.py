"""The repository keeps its shape: modules and functions within their sizes, the CLI reference current."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import check_size  # noqa: E402
import write_cli_doc  # noqa: E402


def test_modules_and_functions_stay_within_their_sizes():
    assert [str(o) for o in check_size.offenders()] == []


def test_the_size_check_finds_a_long_function_without_a_reason(tmp_path):
    (tmp_path / "pipeline").mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(check_size.FUNCTION_LINES))
    (tmp_path / "pipeline" / "long.py").write_text(f"def long():\n{body}\n\n\ndef explained():\n"
                                                   f"    # long: one table of cases\n{body}\n")
    assert [o.name for o in check_size.offenders(tmp_path)] == ["long()"]


def test_the_cli_reference_is_what_the_commands_print():
    assert write_cli_doc.TARGET.read_text() == write_cli_doc.render(), "run python tools/write_cli_doc.py"
