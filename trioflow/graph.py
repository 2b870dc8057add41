"""`Client.get`: computing dask-style task graphs on trioflow.

A dask graph maps keys to tasks. Recent dask represents tasks as
`dask._task_spec` nodes, each knowing its dependencies and callable with
their values; the classic form is a tuple ``(function, *args)`` whose
arguments may name other keys. Both become ordinary trioflow tasks, one per
key, so `dask.compute(..., scheduler=client.get)` gets every resilience
behaviour of trioflow for free.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any


def graph_key(key: Hashable) -> str:
    """The trioflow key of a dask key (dask uses strings and tuples)."""
    return key if isinstance(key, str) else repr(key)


def graph_nodes(dsk: Mapping) -> dict[Hashable, Any]:
    """Every task of `dsk` as a node with ``.dependencies`` and ``node(values)``."""
    graph = dict(dsk)
    try:
        from dask._task_spec import convert_legacy_graph
    except ImportError:
        return {key: ClassicTask(value, graph) for key, value in graph.items()}
    return convert_legacy_graph(graph)


def needed_in_order(nodes: Mapping[Hashable, Any], targets: list[Hashable]) -> list[Hashable]:
    """The keys `targets` need, dependencies before dependents (no recursion)."""
    order: list[Hashable] = []
    state: dict[Hashable, bool] = {}  # False: visiting, True: done
    for target in targets:
        stack = [(target, False)]
        while stack:
            key, expanded = stack.pop()
            if state.get(key) is True:
                continue
            if expanded:
                state[key] = True
                order.append(key)
                continue
            if key not in nodes:
                raise KeyError(f"the graph has no key {key!r}")
            if state.get(key) is False:
                raise ValueError(f"the graph has a cycle through {key!r}")
            state[key] = False
            stack.append((key, True))
            for dep in sorted(nodes[key].dependencies, key=repr):
                if state.get(dep) is not True:
                    stack.append((dep, False))
    return order


def flatten_keys(keys: Any) -> list[Hashable]:
    if isinstance(keys, list):
        return [k for sub in keys for k in flatten_keys(sub)]
    return [keys]


def run_graph_node(node: Any, values: dict) -> Any:
    """What a worker runs for one graph key: the node, given its inputs."""
    return node(values)


class ClassicTask:
    """A classic dask task ``(function, *args)`` (used when dask is absent)."""

    def __init__(self, task: Any, graph: Mapping):
        self.task = task
        self.dependencies = frozenset(_references(task, graph))

    def __call__(self, values: Mapping) -> Any:
        return _evaluate(self.task, values)


def _is_key(obj: Any, graph: Mapping) -> bool:
    try:
        return obj in graph
    except TypeError:  # unhashable
        return False


def _references(task: Any, graph: Mapping) -> list[Hashable]:
    if isinstance(task, tuple) and task and callable(task[0]):
        return [k for arg in task[1:] for k in _references(arg, graph)]
    if isinstance(task, list):
        return [k for arg in task for k in _references(arg, graph)]
    if _is_key(task, graph):
        return [task]
    return []


def _evaluate(task: Any, values: Mapping) -> Any:
    if isinstance(task, tuple) and task and callable(task[0]):
        return task[0](*(_evaluate(arg, values) for arg in task[1:]))
    if isinstance(task, list):
        return [_evaluate(arg, values) for arg in task]
    if _is_key(task, values):
        return values[task]
    return task
