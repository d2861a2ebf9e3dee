"""The code's size rule: no function or method over 60 lines (lgt_ops/, dags/, plugins/) and
no stage module over 300 lines (lgt_ops/stages/). Offenders are listed as path:line."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

MAX_FUNCTION_LINES = 60
MAX_STAGE_FILE_LINES = 300
ROOTS = ("lgt_ops", "dags", "plugins")
FILE_LENGTH = "<file length>"

def _offenders(base: Path = ROOT) -> list[tuple[str, int, str, int]]:
    """(path, line, what, lines) of every function and stage file over its limit."""
    out = []
    for path in sorted(p for root in ROOTS for p in (base / root).rglob("*.py")):
        rel = path.relative_to(base).as_posix()
        text = path.read_text(encoding="utf-8")
        length = len(text.splitlines())
        if rel.startswith("lgt_ops/stages/") and length > MAX_STAGE_FILE_LINES:
            out.append((rel, 1, FILE_LENGTH, length))
        for node in ast.walk(ast.parse(text, filename=rel)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    out.append((rel, node.lineno, node.name, lines))
    return out


def test_no_function_or_stage_file_is_over_its_limit():
    found = _offenders()
    listing = "\n".join(f"{path}:{line} {what}: {n} lines" for path, line, what, n in found)
    assert not found, (
        f"functions over {MAX_FUNCTION_LINES} lines or stage files over"
        f" {MAX_STAGE_FILE_LINES} lines (split them):\n{listing}"
    )


def _function(name: str, lines: int, indent: str = "") -> str:
    body = "".join(f"{indent}    x{i} = {i}\n" for i in range(lines - 1))
    return f"{indent}async def {name}():\n{body}"


def test_the_check_finds_what_is_over_and_only_that(tmp_path):
    """A 61-line method and a 301-line stage file are reported; 60 and 300 lines are not."""
    stages = tmp_path / "lgt_ops" / "stages"
    stages.mkdir(parents=True)
    (stages / "ok.py").write_text(_function("fine", 60) + "\n" * 240)
    (stages / "big.py").write_text(_function("fine", 60) + "\n" * 241)
    (tmp_path / "dags").mkdir()
    (tmp_path / "dags" / "d.py").write_text("class C:\n" + _function("long", 61, "    "))
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "p.py").write_text(_function("fine", 60))
    assert _offenders(tmp_path) == [
        ("dags/d.py", 2, "long", 61),
        ("lgt_ops/stages/big.py", 1, FILE_LENGTH, 301),
    ]
