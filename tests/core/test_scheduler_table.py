"""The scheduler core changes a task's state only through its table, or in
the places `OUTSIDE_THE_TABLE` lists (h11's rule: every exception named)."""

from __future__ import annotations

import ast
import inspect

from trioflow.core import scheduler_state, scheduler_transitions
from trioflow.core.scheduler_transitions import OUTSIDE_THE_TABLE, TRANSITIONS


def _functions(module) -> dict[str, ast.FunctionDef]:
    """`Class.method` (or `function`) -> its definition, for one module."""
    tree = ast.parse(inspect.getsource(module))
    found: dict[str, ast.FunctionDef] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    found[f"{node.name}.{item.name}"] = item
        elif isinstance(node, ast.FunctionDef):
            found[node.name] = node
    return found


def _sets_a_state(fn: ast.FunctionDef) -> bool:
    for node in ast.walk(fn):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for part in ast.walk(target):
                    if isinstance(part, ast.Attribute) and part.attr == "state" and isinstance(part.ctx, ast.Store):
                        return True
    return False


def _calls(fn: ast.FunctionDef) -> set[str]:
    """Names of the `self.<name>(...)` methods `fn` calls."""
    return {
        node.func.attr
        for node in ast.walk(fn)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "self"
    }


def state_changes_outside_the_table() -> list[str]:
    functions = {**_functions(scheduler_transitions), **_functions(scheduler_state)}
    allowed = {f"TaskTransitions.{method.__name__}" for method in TRANSITIONS.values()} | set(OUTSIDE_THE_TABLE)
    # A helper may set a state when only allowed functions call it (the
    # moves of the table share `_assign`, `_await_copy`, ...).
    changed = True
    while changed:
        changed = False
        for name, fn in functions.items():
            if name in allowed:
                continue
            method = name.rpartition(".")[2]
            callers = [caller for caller, body in functions.items() if method in _calls(body)]
            if callers and all(caller in allowed for caller in callers):
                allowed.add(name)
                changed = True
    return [name for name, fn in functions.items() if _sets_a_state(fn) and name not in allowed]


def test_every_state_change_is_a_move_of_the_table_or_a_listed_exception():
    """Code that sets a task's state runs only inside a move of TRANSITIONS,
    or is named in OUTSIDE_THE_TABLE with its reason."""
    assert state_changes_outside_the_table() == []


def test_the_listed_exceptions_exist():
    """Each exception OUTSIDE_THE_TABLE names is a function of the core (a
    renamed one would leave the list lying)."""
    functions = {**_functions(scheduler_transitions), **_functions(scheduler_state)}
    assert [name for name in OUTSIDE_THE_TABLE if name not in functions] == []
