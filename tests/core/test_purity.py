"""trioflow.core stays pure: it imports only the standard library, core and errors."""

import ast
import pathlib
import sys

import trioflow.core

CORE = pathlib.Path(trioflow.core.__file__).parent
# Modules a pure state machine has no business importing, stdlib or not.
FORBIDDEN_STDLIB = {"socket", "threading", "asyncio", "time", "random", "selectors", "subprocess", "os"}


def imported_modules(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def test_core_imports_only_stdlib_core_and_errors():
    """Every import in trioflow/core is stdlib (not I/O, clock or randomness), core, or errors."""
    problems = []
    for path in sorted(CORE.glob("*.py")):
        for module in imported_modules(path):
            top = module.split(".")[0]
            if module.startswith("trioflow."):
                if not (module.startswith("trioflow.core") or module == "trioflow.errors"):
                    problems.append(f"{path.name}: {module}")
            elif top in FORBIDDEN_STDLIB or top not in sys.stdlib_module_names:
                problems.append(f"{path.name}: {module}")
    assert problems == []


def test_the_purity_walk_covers_every_core_module():
    """The walk above sees each state machine, the client's included (a module it missed would go unchecked)."""
    walked = {path.name for path in CORE.glob("*.py")}
    assert {"client_state.py", "scheduler_state.py", "worker_state.py"} <= walked
