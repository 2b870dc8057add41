"""Dask graphs and collections on trioflow: turning a graph into tasks.

`Client.get`, `Client.compute` and `Client.persist` accept what dask hands
a scheduler: a graph (a plain dict, a `HighLevelGraph`, or one of dask's
expression objects, which are not mappings but have ``__dask_graph__``)
and the keys wanted. This module turns it into one trioflow task per dask
key, using dask's own helpers for everything dask already knows how to do:

* ``dask._task_spec.convert_legacy_graph`` turns every value into a
  `GraphNode` (classic ``(function, *args)`` tuples included) that knows
  its ``dependencies`` and is called with their values: ``node(values)``.
  That call is what a worker runs (`run_graph_node`).
* ``dask._task_spec.cull`` keeps only what the wanted keys need.
* ``dask.order.order`` gives dask's static order, the order in which a
  sequential scheduler would run the tasks (it keeps memory low).

What is left for us is the plumbing: naming keys (trioflow keys are
strings; a dask key ``('x', 0)`` becomes ``"('x', 0)"``), recognising
trioflow `Future` objects inside a graph (a persisted collection's graph
maps each key to the `Future` holding it: no task is made for it, the
dependents read the future's key), and putting the tasks in a submission
order. A scheduler links a task to its inputs when it arrives, so the
order must list inputs first; among the tasks whose inputs are listed, we
take the one dask's order ranks first. The scheduler gives earlier
submissions higher priority, so dask's order becomes the execution order
wherever the dependencies allow.

All of this runs *off* the Trio loop that carries the client (and, in a
`LocalCluster`, the scheduler): converting and pickling a big graph takes
a while, and design.md §6 rule 6 forbids heavy client work on that loop.
`AsyncClient` runs `plan_graph` and `pickle_graph` in a worker thread; the
blocking `Client` runs them in the caller's thread.

Dask is imported lazily: trioflow runs without it, and these functions
raise an `ImportError` that says what to install.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Hashable, Mapping
from typing import Any

from trioflow.comm import messages as m
from trioflow.comm.serialize import SerializedFunction, dumps, dumps_function
from trioflow.protocol import TaskRef


def graph_key(key: Hashable) -> str:
    """The trioflow key of a dask key (dask uses strings and tuples)."""
    return key if isinstance(key, str) else repr(key)


def flatten_keys(keys: Any) -> list[Hashable]:
    """The keys of a (nested) list of keys, as dask passes them, in order."""
    if isinstance(keys, list):
        return [k for sub in keys for k in flatten_keys(sub)]
    return [keys]


def run_graph_node(node: Any, values: dict) -> Any:
    """What a worker runs for one graph key: the node, given its inputs.

    `values` maps each dask key the node depends on to its value (the
    trioflow `TaskRef`s in it were swapped for values on the worker).
    """
    return node(values)


# The oldest dask trioflow supports: the first whose graphs recognise a
# future that is not dask.distributed's by its ``__dask_future__`` flag
# (older ones fuse a persisted collection's futures into tasks as data).
# docs/dask-users.md says how this was checked.
OLDEST_DASK = (2026, 1)


def _dask():
    try:
        import dask
        import dask.order
        from dask import _task_spec
    except ImportError as exc:
        raise ImportError(
            "computing dask graphs needs dask: pip install 'dask[array,bag,dataframe]' "
            f"(or trioflow's 'test' extra) ({exc})"
        ) from None
    try:
        version = tuple(int(part) for part in dask.__version__.split(".")[:2])
    except ValueError:
        version = OLDEST_DASK  # a development version: assume it is recent
    if version < OLDEST_DASK:
        raise ImportError(
            f"trioflow needs dask {OLDEST_DASK[0]}.{OLDEST_DASK[1]}.0 or newer, found {dask.__version__}: "
            "pip install -U 'dask[array,bag,dataframe]'"
        )
    return _task_spec, dask.order


@dataclasses.dataclass
class GraphTask:
    """One dask key to run as a trioflow task."""

    key: str  # the trioflow key
    node: Any  # dask's GraphNode
    # dask key of each input -> the trioflow key holding its value
    inputs: dict[Hashable, str]


@dataclasses.dataclass
class GraphPlan:
    """A dask graph ready to submit: tasks in submission order, and the rest.

    Attributes:
        tasks: the tasks to submit, every input before its dependents.
        keys: the trioflow key of each dask key asked for.
        futures: `Future` objects found in the graph (a persisted
            collection), by trioflow key; kept so that their keys stay held
            until the tasks that read them are submitted.
        external: trioflow keys the tasks read that are not in the graph
            (futures nested in a task's arguments); the client must hold them.
    """

    tasks: list[GraphTask]
    keys: dict[Hashable, str]
    futures: dict[str, Any]
    external: list[str]
    # Filled by `pickle_graph`: the function every task calls, and each
    # task with its pickled arguments.
    function: SerializedFunction | None = None
    pickled: list[tuple[GraphTask, Any]] = dataclasses.field(default_factory=list)


def plan_graph(dsk: Any, wanted: list[Hashable], is_future) -> GraphPlan:
    """Convert, cull and order the graph `dsk` for the dask keys `wanted`.

    Args:
        dsk: a mapping of dask keys to tasks, or an object with
            ``__dask_graph__`` (a dask expression or collection).
        wanted: the dask keys whose values are asked for.
        is_future: tells a trioflow `Future` (it is the client's class).

    Raises:
        KeyError: a wanted key is not in the graph.
        ImportError: dask is not installed.
    """
    task_spec, order = _dask()
    if not isinstance(dsk, Mapping):
        dsk = dsk.__dask_graph__()
    futures: dict[Hashable, Any] = {}
    rest: dict[Hashable, Any] = {}
    for key, value in dsk.items():
        (futures if is_future(value) else rest)[key] = value
    missing = [k for k in wanted if k not in rest and k not in futures]
    if missing:
        raise KeyError(f"the graph has no key {missing[0]!r}")
    # Keys held by futures stay keys of the graph, so references to them
    # become dependencies (and not literal values).
    nodes = task_spec.convert_legacy_graph(rest, all_keys=_Keys(rest, futures))
    nodes = task_spec.cull(nodes, [k for k in wanted if k in nodes])
    names = {key: graph_key(key) for key in nodes}
    names.update({key: future.key for key, future in futures.items()})
    external: dict[str, None] = {}
    for key, node in list(nodes.items()):
        target = getattr(node, "target", None)
        if isinstance(node, task_spec.Alias) and target not in nodes and target not in futures:
            # A key that only names a future's key (dask turned a future in
            # the graph into this): the future is the value, no task needed.
            if not isinstance(target, str):
                raise KeyError(f"task {key!r} is an alias of {target!r}, which is not in the graph")
            names[key] = target
            external[target] = None
            del nodes[key]
    inputs: dict[Hashable, dict[Hashable, str]] = {}
    for key, node in nodes.items():
        refs = {}
        for dep in node.dependencies:
            if dep in names:
                refs[dep] = names[dep]
            elif isinstance(dep, str):
                # A future nested in the task's arguments: dask made it a
                # reference to the future's own key.
                refs[dep] = dep
                external[dep] = None
            else:
                raise KeyError(f"task {key!r} needs {dep!r}, which is not in the graph")
        inputs[key] = refs
    ranks = order.order(nodes) if nodes else {}
    tasks = [GraphTask(names[key], nodes[key], inputs[key]) for key in _inputs_first(nodes, ranks)]
    for task in tasks:
        check_key(task.key)
    return GraphPlan(
        tasks,
        {key: names[key] for key in wanted},
        {future.key: future for future in futures.values()},
        list(external),
    )


class _Keys:
    """The keys of the graph for `convert_legacy_graph`: its tasks' and its futures'."""

    def __init__(self, *mappings: Mapping):
        self.mappings = mappings

    def __contains__(self, key: object) -> bool:
        return any(key in mapping for mapping in self.mappings)


def _inputs_first(nodes: Mapping, ranks: Mapping) -> list[Hashable]:
    """The keys of `nodes`, each after its inputs; ties go by dask's `ranks`.

    Kahn's algorithm with a heap: of the tasks whose inputs are all listed,
    the one dask ranks first comes next. Inputs outside `nodes` (futures)
    are already on the cluster and do not count.
    """
    waiting = {key: sum(dep in nodes for dep in node.dependencies) for key, node in nodes.items()}
    dependents: dict[Hashable, list[Hashable]] = {}
    for key, node in nodes.items():
        for dep in node.dependencies:
            if dep in nodes:
                dependents.setdefault(dep, []).append(key)
    position = {key: i for i, key in enumerate(nodes)}  # keys may not be comparable
    ready = [(ranks.get(key, 0), position[key], key) for key, n in waiting.items() if n == 0]
    heapq.heapify(ready)
    out = []
    while ready:
        _, _, key = heapq.heappop(ready)
        out.append(key)
        for dependent in dependents.get(key, ()):
            waiting[dependent] -= 1
            if waiting[dependent] == 0:
                heapq.heappush(ready, (ranks.get(dependent, 0), position[dependent], dependent))
    if len(out) != len(nodes):
        stuck = next(key for key, n in waiting.items() if n)
        raise ValueError(f"the graph has a cycle through {stuck!r}")
    return out


def pickle_graph(plan: GraphPlan) -> GraphPlan:
    """Pickle each task's node and input references (off the loop).

    Fills in the function every graph task calls (`run_graph_node`) and,
    per task, its pickled ``((node, {dask key: TaskRef}), {})`` arguments.
    """
    plan.function = dumps_function(run_graph_node)
    for task in plan.tasks:
        refs = {dep: TaskRef(key) for dep, key in task.inputs.items()}
        plan.pickled.append((task, dumps(((task.node, refs), {}))))
    return plan


def graph_plan(dsk: Any, wanted: list[Hashable], is_future) -> GraphPlan:
    """`plan_graph`, then `pickle_graph`: everything `Client.get` does off the loop."""
    return pickle_graph(plan_graph(dsk, wanted, is_future))


def shape_like(keys: Any, values: Mapping) -> Any:
    """`keys` (a key or nested lists of keys) with each key replaced by its value."""
    if isinstance(keys, list):
        return [shape_like(sub, values) for sub in keys]
    return values[keys]


# ------------------------------------------------------------ collections --
#
# `compute` and `persist` do what dask.distributed's do, through the same
# dask functions: `collections_to_expr` gathers the collections into one
# expression, `.optimize()` runs dask's optimizations, and for `compute`
# `FinalizeCompute` adds the step that turns a collection's pieces into its
# value (concatenating an array's blocks, a dataframe's partitions...).


def _collections_api():
    try:
        import dask
        from dask._expr import FinalizeCompute
        from dask.base import collections_to_expr
    except ImportError as exc:
        raise ImportError(
            "compute() and persist() need dask 2026.1 or newer: "
            f"pip install 'dask[array,bag,dataframe]' ({exc})"
        ) from None
    return dask, collections_to_expr, FinalizeCompute


def _as_list(collections: Any) -> tuple[bool, list]:
    if isinstance(collections, (list, tuple)):
        return False, list(collections)
    return True, [collections]


def compute_plan(collections: Any, optimize_graph: bool, is_future):
    """What `Client.compute` submits: one value per collection.

    Returns ``((singleton, items), plan, where)``: `where` maps the
    position of each dask collection among `items` to its wanted key.
    """
    dask, collections_to_expr, FinalizeCompute = _collections_api()
    singleton, items = _as_list(collections)
    positions = [i for i, item in enumerate(items) if dask.is_dask_collection(item)]
    if not positions:
        return (singleton, items), GraphPlan([], {}, {}, []), {}
    expr = FinalizeCompute(collections_to_expr([items[i] for i in positions], optimize_graph)).optimize()
    names = flatten_keys(expr.__dask_keys__())
    if len(names) != len(positions):
        raise RuntimeError(f"dask gave {len(names)} keys for {len(positions)} collections")
    plan = graph_plan(expr, names, is_future)
    return (singleton, items), plan, dict(zip(positions, names, strict=True))


def persist_plan(collections: Any, optimize_graph: bool, is_future):
    """What `Client.persist` submits: every key of every collection.

    Returns ``(singleton, plan, rebuild)``; ``rebuild({dask key: Future})``
    makes the collections backed by those futures (each collection's own
    ``__dask_postpersist__``).
    """
    dask, collections_to_expr, _ = _collections_api()
    singleton, items = _as_list(collections)
    for item in items:
        if not dask.is_dask_collection(item):
            raise TypeError(f"persist() takes dask collections, got {type(item).__name__}")
    expr = collections_to_expr(items, optimize_graph).optimize()
    # A list of collections becomes one sequence expression: its keys come
    # as one list per collection.
    keys = [flatten_keys(k) for k in expr.__dask_keys__()]
    plan = graph_plan(expr, [k for ks in keys for k in ks], is_future)

    def rebuild(futures: Mapping) -> list:
        out = []
        for item, item_keys in zip(items, keys, strict=True):
            function, args = item.__dask_postpersist__()
            out.append(function({k: futures[k] for k in item_keys}, *args))
        return out

    return singleton, plan, rebuild


def check_key(key: str) -> None:
    """Refuse a dask key too long to be a trioflow key, naming it."""
    if not 0 < len(key) <= m.MAX_KEY_CHARS:
        raise ValueError(f"dask key {key[:80]!r}... is longer than {m.MAX_KEY_CHARS} characters")
