"""Random task graphs for the chaos lab, and their answers computed in plain Python.

A `Workload` is a seeded graph of small pure functions on integers, made of
the shapes real users submit: maps, chains, tree reductions and diamonds,
wired to each other, with a few user errors mixed in, a few values that
come from `Client.scatter` (some of them replicated), sometimes one
*poison* task that crashes whichever worker runs it, and a quarter of
results too big (`Padded`) to ride inline with their reports, so that
clients and workers fetch values from each other as they would real data.

The lab submits the graph through a real client (futures as arguments) and,
separately, `evaluate` computes what every key must end as by running the
same functions sequentially. A key ends either with a value or with a
failure; a failure lists every task it may originate from, because when a
task has two failing inputs, whichever fails first on the cluster wins
(design.md §1: a dependent raises *the same* error as the failed input).

The task functions live at module level so they pickle by reference, and
each takes its own key as first argument (``label``): the simulated
executor learns from it which task it is running, for the trace.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from typing import Any

from trioflow.sim.nodes import WorkerCrash, note_running

# Every value is reduced modulo this prime, so values stay small ints.
MODULUS = 1_000_003
# The pickled size of a "big" value: above the 1 KiB under which a result
# rides inline with its report, so clients and peers must fetch it.
PADDED_BYTES = 2048


class SimUserError(Exception):
    """The error a workload's failing task raises on purpose (a user error)."""


class Padded(int):
    """An int that pickles to about `PADDED_BYTES` bytes (the padding is dropped
    on arrival). It compares, hashes and computes as the plain int it is."""

    def __new__(cls, value: int, padding: bytes = b"") -> Padded:
        return super().__new__(cls, value)

    def __reduce__(self):
        return (Padded, (int(self), bytes(PADDED_BYTES)))

    def __repr__(self) -> str:
        return repr(int(self))


# ----------------------------------------------------------- task functions --


def source(label: str, seed_value: int) -> int:
    """A root task: a number from nothing."""
    note_running(label)
    return (seed_value * 7919) % MODULUS


def step(label: str, x: int, salt: int) -> int:
    """One element of a map or one link of a chain."""
    note_running(label)
    return (x * 31 + salt) % MODULUS


def combine(label: str, *xs: int) -> int:
    """A reduction: a tree node or the bottom of a diamond."""
    note_running(label)
    return (sum(xs) * 3 + len(xs)) % MODULUS


def fail(label: str, *inputs: Any) -> int:
    """A user error: raises whatever its inputs."""
    note_running(label)
    raise SimUserError(f"{label} failed on purpose")


def poison(label: str, *inputs: Any) -> int:
    """Crashes the worker that runs it (a segfault, an ``os._exit``)."""
    note_running(label)
    raise WorkerCrash(f"{label} is poison")


def step_big(label: str, x: int, salt: int) -> int:
    """`step`, with a result too big to travel inline."""
    return Padded(step(label, x, salt))


def combine_big(label: str, *xs: int) -> int:
    """`combine`, with a result too big to travel inline."""
    return Padded(combine(label, *xs))


FUNCTIONS: dict[str, Callable[..., int]] = {
    "source": source,
    "step": step,
    "combine": combine,
    "step_big": step_big,
    "combine_big": combine_big,
    "fail": fail,
    "poison": poison,
}


# ---------------------------------------------------------------- the graph --


@dataclasses.dataclass(frozen=True)
class Ref:
    """An argument that is the value of another key (a future, when submitted)."""

    key: str


@dataclasses.dataclass(frozen=True)
class TaskNode:
    """One task: ``FUNCTIONS[op](key, *args)`` with `Ref` args resolved."""

    key: str
    op: str
    args: tuple[Any, ...]
    shape: str
    wave: int

    @property
    def dependencies(self) -> list[str]:
        return [a.key for a in self.args if isinstance(a, Ref)]


@dataclasses.dataclass(frozen=True)
class ScatteredValue:
    """A value put on the cluster with `Client.scatter` (no lineage)."""

    key: str
    value: int
    replicas: int  # 1: scattered only; n > 1: Client.replicate(n) too


@dataclasses.dataclass(frozen=True)
class Value:
    """The key must end with this value."""

    value: int


@dataclasses.dataclass(frozen=True)
class Failure:
    """The key must fail with the error of one of `origins` (failing tasks)."""

    origins: tuple[str, ...]


Expected = Value | Failure


@dataclasses.dataclass
class Workload:
    """A task graph in topological order, with when each wave is submitted.

    Attributes:
        scattered: values scattered before the first wave.
        nodes: the tasks; every dependency comes earlier in the list.
        wave_times: seconds after the start at which wave i is submitted.
        poison: the key of the poison task, if any.
    """

    scattered: list[ScatteredValue]
    nodes: list[TaskNode]
    wave_times: list[float]
    poison: str | None = None

    def __post_init__(self) -> None:
        self.by_key: dict[str, TaskNode] = {node.key: node for node in self.nodes}

    @property
    def keys(self) -> list[str]:
        return [s.key for s in self.scattered] + [n.key for n in self.nodes]

    def ancestors(self, key: str) -> dict[str, None]:
        """`key` and every key it depends on, directly or not (ordered)."""
        seen: dict[str, None] = {}
        stack = [key]
        while stack:
            k = stack.pop()
            if k in seen:
                continue
            seen[k] = None
            node = self.by_key.get(k)
            if node is not None:
                stack.extend(node.dependencies)
        return seen

    def descendants(self, key: str) -> dict[str, None]:
        """`key` and every key that depends on it, directly or not (ordered)."""
        if not hasattr(self, "_dependents"):
            self._dependents: dict[str, list[str]] = {}
            for node in self.nodes:
                for dep in node.dependencies:
                    self._dependents.setdefault(dep, []).append(node.key)
        seen: dict[str, None] = {}
        stack = [key]
        while stack:
            k = stack.pop()
            if k in seen:
                continue
            seen[k] = None
            stack.extend(self._dependents.get(k, ()))
        return seen

    def describe(self) -> str:
        shapes: dict[str, int] = {}
        for node in self.nodes:
            shapes[node.shape] = shapes.get(node.shape, 0) + 1
        errors = sum(node.op == "fail" for node in self.nodes)
        parts = [f"{count} {shape}" for shape, count in shapes.items()]
        return (
            f"{len(self.nodes)} tasks ({', '.join(parts)}), {errors} user errors, "
            f"{len(self.scattered)} scattered, poison={self.poison or 'none'}, "
            f"{len(self.wave_times)} waves"
        )


def evaluate(workload: Workload) -> dict[str, Expected]:
    """What every key must end as, computed sequentially in plain Python."""
    expected: dict[str, Expected] = {s.key: Value(s.value) for s in workload.scattered}
    for node in workload.nodes:
        origins: dict[str, None] = {}
        for dep in node.dependencies:
            outcome = expected[dep]
            if isinstance(outcome, Failure):
                origins.update(dict.fromkeys(outcome.origins))
        if origins:
            expected[node.key] = Failure(tuple(origins))
            continue
        args = [expected[a.key].value if isinstance(a, Ref) else a for a in node.args]  # type: ignore[union-attr]
        try:
            expected[node.key] = Value(FUNCTIONS[node.op](node.key, *args))
        except (SimUserError, WorkerCrash):
            expected[node.key] = Failure((node.key,))
    return expected


# ---------------------------------------------------------------- generator --


class _Builder:
    def __init__(self, rng: random.Random):
        self.rng = rng
        self.nodes: list[TaskNode] = []
        # Keys later shapes may take as inputs, so the graph is one web
        # rather than separate islands.
        self.outputs: list[str] = []
        self.wave = 0

    def add(self, shape: str, op: str, *args: Any) -> str:
        key = f"{shape}-{len(self.nodes):03d}"
        self.nodes.append(TaskNode(key, op, tuple(args), shape, self.wave))
        return key

    def input(self, shape: str) -> str:
        """An earlier output (half the time, if any) or a new source task."""
        if self.outputs and self.rng.random() < 0.5:
            return self.rng.choice(self.outputs)
        return self.add(shape, "source", self.rng.randrange(MODULUS))

    def salt(self) -> int:
        return self.rng.randrange(1000)

    def map(self) -> None:
        width = self.rng.randint(4, 24)
        layer = [self.add("map", "step", Ref(self.input("map")), self.salt()) for _ in range(width)]
        self.outputs.extend(self.rng.sample(layer, min(3, len(layer))))

    def chain(self) -> None:
        key = self.input("chain")
        for _ in range(self.rng.randint(3, 12)):
            key = self.add("chain", "step", Ref(key), self.salt())
        self.outputs.append(key)

    def tree(self) -> None:
        layer = [self.input("tree") for _ in range(self.rng.randint(4, 32))]
        while len(layer) > 1:
            fan_in = self.rng.choice((2, 2, 3))
            layer = [
                self.add("tree", "combine", *map(Ref, layer[i : i + fan_in]))
                for i in range(0, len(layer), fan_in)
            ]
        self.outputs.append(layer[0])

    def diamond(self) -> None:
        top = self.input("diamond")
        left = self.add("diamond", "step", Ref(top), self.salt())
        right = self.add("diamond", "step", Ref(top), self.salt())
        self.outputs.append(self.add("diamond", "combine", Ref(left), Ref(right)))


def generate(
    seed_rng: random.Random,
    *,
    sizes_rng: random.Random | None = None,
    big_share: float = 0.25,
    n_tasks: int = 200,
    error_rate: float = 0.02,
    poison_probability: float = 0.5,
    max_scattered: int = 3,
    max_waves: int = 3,
) -> Workload:
    """A random workload of about `n_tasks` tasks (the last shape may overshoot).

    Args:
        seed_rng: the source of the graph's shape, errors and waves.
        sizes_rng: decides which results are big (a stream of its own, so
            the graph of a seed does not depend on it); none if omitted.
        big_share: the share of steps and combines whose results are big.
        n_tasks: how many tasks to aim for.
        error_rate: the share of tasks turned into user errors.
        poison_probability: the chance that one task is poison.
        max_scattered: at most this many scattered values.
        max_waves: the graph is submitted in 1..max_waves waves.
    """
    rng = seed_rng
    builder = _Builder(rng)
    scattered = []
    for i in range(rng.randint(0, max_scattered)):
        key = f"data-{i}"
        scattered.append(ScatteredValue(key, rng.randrange(MODULUS), rng.choice((1, 2))))
        builder.outputs.append(key)
    shapes = (builder.map, builder.chain, builder.tree, builder.diamond)
    while len(builder.nodes) < n_tasks:
        rng.choice(shapes)()
    nodes = builder.nodes
    # Mix in user errors and perhaps one poison task, keeping each task's
    # inputs (so the failure reaches its dependents like any other).
    for index in sorted(rng.sample(range(len(nodes)), int(len(nodes) * error_rate))):
        node = nodes[index]
        nodes[index] = dataclasses.replace(node, op="fail")
    poison_key = None
    if rng.random() < poison_probability:
        index = rng.randrange(len(nodes))
        nodes[index] = dataclasses.replace(nodes[index], op="poison")
        poison_key = nodes[index].key
    if sizes_rng is not None:
        for index, node in enumerate(nodes):
            if node.op in ("step", "combine") and sizes_rng.random() < big_share:
                nodes[index] = dataclasses.replace(node, op=f"{node.op}_big")
    # Waves: contiguous slices of the topological order, so a task is never
    # submitted before its inputs.
    n_waves = rng.randint(1, max_waves)
    cuts = sorted(rng.sample(range(1, len(nodes)), n_waves - 1)) if n_waves > 1 else []
    bounds = [0, *cuts, len(nodes)]
    waved: list[TaskNode] = []
    for wave in range(n_waves):
        waved.extend(dataclasses.replace(n, wave=wave) for n in nodes[bounds[wave] : bounds[wave + 1]])
    wave_times = [0.0]
    for _ in range(n_waves - 1):
        wave_times.append(round(wave_times[-1] + rng.uniform(0.2, 2.0), 6))
    return Workload(scattered, waved, wave_times, poison_key)
