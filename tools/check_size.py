"""Module and function sizes of the package, against the limits the code is kept to.

    python tools/check_size.py            # prints offenders, exits 1 if any

A module of pipeline/ or exporters/ holds at most MODULE_LINES lines. A function holds at most
FUNCTION_LINES lines unless a comment within its first lines starts with `# long:` and says why
(one walk that must stay in one frame, a table of cases that reads best whole).
"""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "exporters")
MODULE_LINES = 450
FUNCTION_LINES = 60
REASON = "# long:"
REASON_WITHIN = 4  # lines after the def (or after its docstring) where the reason may stand


@dataclass(frozen=True)
class Offender:
    path: str
    name: str
    lines: int
    limit: int

    def __str__(self) -> str:
        return f"{self.path}: {self.name} has {self.lines} lines (limit {self.limit})"


def offenders(root: Path = ROOT) -> list[Offender]:
    out = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            text = path.read_text()
            lines = text.splitlines()
            rel = str(path.relative_to(root))
            if len(lines) > MODULE_LINES:
                out.append(Offender(rel, "module", len(lines), MODULE_LINES))
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    size = node.end_lineno - node.lineno + 1
                    if size > FUNCTION_LINES and not _explained(node, lines):
                        out.append(Offender(rel, f"{node.name}()", size, FUNCTION_LINES))
    return out


def _explained(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> bool:
    body = node.body
    start = body[0].end_lineno if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
        else node.lineno
    return any(line.strip().startswith(REASON) for line in lines[start:start + REASON_WITHIN])


def main() -> int:
    found = offenders()
    for o in found:
        print(o)
    print(f"{len(found)} over the limits ({MODULE_LINES} lines a module, {FUNCTION_LINES} a function "
          f"without a '{REASON}' comment)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
