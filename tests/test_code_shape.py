"""Code shape: every function in etegrec/ is at most 80 lines long."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAX_LINES = 80


def test_every_function_is_at_most_80_lines() -> None:
    too_long = []
    for path in sorted((REPO / "etegrec").rglob("*.py")):
        name = path.relative_to(REPO).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    too_long.append(f"{name}:{node.lineno} {node.name}() has {lines} lines")
    assert not too_long, "split these functions (at most 80 lines each):\n" + "\n".join(too_long)
