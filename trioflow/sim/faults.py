"""Fault plans: which fault strikes which node, when, and for how long.

A plan is a list of `Fault` records sorted by time. Each has a compact text
form, so a failing plan can be printed, pasted on a command line and
replayed (``trioflow chaos --seed 7 --plan "crash@1.5:worker-0,hang@2:worker-1/4"``)::

    <kind>@<seconds after the workload starts>:<target>[/<duration seconds>]

The fault kinds (`FAULT_KINDS`), from the failure table of design.md §1:

========================  ==============================================  ============
kind                      what happens                                    target
========================  ==============================================  ============
``crash``                 the worker process dies (SIGKILL): its          a worker
                          connections reset; its nanny starts a new one
``restart``               its nanny restarts the worker politely          a worker
                          (SIGTERM: it says goodbye first)
``hang``                  the worker freezes: nothing it sends or is      a worker
                          sent arrives, for `duration` s (then thaws)
``partition``             the workers named (``worker-0+worker-2``)       workers
                          cannot reach anyone else for `duration` s
``reset``                 every connection of the worker is reset         a worker
``scheduler_restart``     the scheduler dies and a new one serves at      scheduler
                          the same address `duration` s later
========================  ==============================================  ============

`random_plan` draws a plan from a seeded `random.Random` and a mix of kinds
(weights, `DEFAULT_MIX` unless told otherwise). A seed names a run only
together with its mix: to pin a run for good, pin its plan (its text form).
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class FaultKind:
    """What the plan generator must know about a kind of fault.

    Attributes:
        name: as in plans.
        target: "worker", "workers" (a group) or "scheduler".
        durations: (min, max) seconds the fault lasts; None if instantaneous
            (the system heals by itself: the nanny restarts the worker).
    """

    name: str
    target: str
    durations: tuple[float, float] | None = None


FAULT_KINDS: dict[str, FaultKind] = {
    kind.name: kind
    for kind in (
        FaultKind("crash", "worker"),
        FaultKind("restart", "worker"),
        # Half of the hangs and partitions end before worker_ttl (3 s), half after.
        FaultKind("hang", "worker", (0.5, 6.0)),
        FaultKind("partition", "workers", (0.5, 6.0)),
        FaultKind("reset", "worker"),
        FaultKind("scheduler_restart", "scheduler", (0.5, 4.0)),
    )
}

# The default weights of `random_plan`.
DEFAULT_MIX: dict[str, float] = {
    "crash": 3,
    "restart": 1,
    "hang": 2,
    "partition": 1,
    "reset": 1,
    "scheduler_restart": 1,
}

_FAULT_RE = re.compile(
    r"^(?P<kind>[a-z_]+)@(?P<time>[0-9.]+):(?P<target>[a-z0-9+-]+)(?:/(?P<duration>[0-9.]+))?$"
)


@dataclasses.dataclass(frozen=True, order=True)
class Fault:
    """One fault of a plan.

    Attributes:
        time: seconds after the workload starts (virtual time).
        kind: a key of `FAULT_KINDS`.
        target: a node (``worker-2``, ``scheduler``) or, for a partition,
            the nodes cut off, joined by ``+``.
        duration: seconds until it heals (0 for instantaneous faults).
    """

    time: float
    kind: str
    target: str
    duration: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r} (known: {', '.join(FAULT_KINDS)})")
        if self.time < 0 or self.duration < 0:
            raise ValueError(f"a fault's time and duration must be >= 0: {self}")

    @property
    def ends(self) -> float:
        """When the fault has healed (the time itself for instantaneous ones)."""
        return self.time + self.duration

    @property
    def targets(self) -> list[str]:
        return self.target.split("+")

    def __str__(self) -> str:
        text = f"{self.kind}@{self.time:g}:{self.target}"
        return f"{text}/{self.duration:g}" if self.duration else text

    @classmethod
    def parse(cls, text: str) -> Fault:
        """The inverse of `str`.

        Raises:
            ValueError: `text` is not a fault.
        """
        match = _FAULT_RE.match(text.strip())
        if match is None:
            raise ValueError(f"{text!r} is not a fault (expected kind@time:target[/duration])")
        duration = float(match["duration"]) if match["duration"] else 0.0
        return cls(float(match["time"]), match["kind"], match["target"], duration)


def format_plan(plan: Sequence[Fault]) -> str:
    return ",".join(map(str, plan))


def parse_plan(text: str) -> list[Fault]:
    """A plan from its text form (faults separated by commas; "" is no fault)."""
    return sorted(Fault.parse(part) for part in text.split(",") if part.strip())


def random_plan(
    rng: random.Random,
    *,
    n_faults: int,
    n_workers: int,
    window: float,
    mix: Mapping[str, float] = DEFAULT_MIX,
) -> list[Fault]:
    """`n_faults` faults drawn from `mix`, at times in [0, `window`) seconds.

    Times and durations are rounded to milliseconds so that plans print
    short and replay exactly.
    """
    kinds = [k for k, weight in mix.items() if weight > 0]
    weights = [mix[k] for k in kinds]
    if n_faults and not kinds:
        raise ValueError("the fault mix gives every kind weight 0")
    plan = []
    for _ in range(n_faults):
        kind = FAULT_KINDS[rng.choices(kinds, weights)[0]]
        time = round(rng.uniform(0, window), 3)
        duration = round(rng.uniform(*kind.durations), 3) if kind.durations else 0.0
        if kind.target == "scheduler":
            target = "scheduler"
        elif kind.target == "workers":
            size = rng.randint(1, max(1, n_workers - 1))
            target = "+".join(f"worker-{i}" for i in sorted(rng.sample(range(n_workers), size)))
        else:
            target = f"worker-{rng.randrange(n_workers)}"
        plan.append(Fault(time, kind.name, target, duration))
    return sorted(plan)


def last_heal(plan: Sequence[Fault]) -> float:
    """When the last fault of `plan` has healed (0 for no faults)."""
    return max((fault.ends for fault in plan), default=0.0)


def count_by_kind(plan: Sequence[Fault]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for fault in plan:
        counts[fault.kind] = counts.get(fault.kind, 0) + 1
    return counts
