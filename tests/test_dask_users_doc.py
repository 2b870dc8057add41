"""docs/dask-users.md: every row of the migration table names tests that exist."""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def table_rows():
    text = (ROOT / "docs" / "dask-users.md").read_text()
    section = text.split("## The migration table", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| dask.distributed")]
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows if not set(row) <= set("|-")]


def test_every_row_is_marked_and_backed_by_existing_tests():
    """Each row says same/different/not supported; each test it names exists
    (a row of features not supported at all names none)."""
    rows = table_rows()
    assert len(rows) > 20
    for row in rows:
        assert len(row) == 4, row
        _, _, mark, tests = row
        assert mark in ("same", "different", "not supported"), row
        if tests == "—":
            assert mark == "not supported", row
            continue
        current = None
        for token in re.findall(r"`([^`]+)`", tests):
            if token.startswith("::"):
                assert current is not None, row
                path, name = current, token[2:]
            elif "::" in token:
                path, name = token.split("::", 1)
            else:
                path, name = token, None
            file = ROOT / "tests" / path
            assert file.exists(), f"{path} (row {row[0]})"
            current = path
            if name is not None:
                defined = {
                    node.name for node in ast.walk(ast.parse(file.read_text()))
                    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                }
                assert name.split("[")[0] in defined, f"{path}::{name} (row {row[0]})"
