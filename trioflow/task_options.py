"""The options of `submit`, `map`, `get`, `compute` and `persist`, checked once.

dask.distributed's `submit` takes a few keywords of its own and passes
every other keyword to the function; trioflow does the same, with the same
names:

=====================  ======================================================
``retries``            rerun the task this many times if the function raises
``workers``            worker address(es) allowed to run it
``allow_other_workers``  with ``workers``: a preference, not a restriction
                       (used when none of those workers is alive)
``resources``          ``{"GPU": 1}``: run only on a worker that declared at
                       least that much of each, counting what the tasks
                       already running there use
``priority``           higher runs first; the scheduler's own order (earlier
                       submissions first) breaks ties
=====================  ======================================================

Each is checked here, in the caller, with an error that names the option
and the value: a bad value must not travel to the scheduler and come back
as a refusal. The bounds are those of the wire declarations
(`trioflow.comm.messages`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any

from trioflow.comm import messages as m


@dataclasses.dataclass(frozen=True)
class TaskOptions:
    """The scheduling options of a batch of tasks, already checked."""

    retries: int = 0
    workers: tuple[str, ...] | None = None
    allow_other_workers: bool = False
    resources: dict[str, float] | None = None
    priority: int = 0

    def wire_fields(self) -> dict[str, Any]:
        """The `TaskWire` fields these options set."""
        return {
            "retries": self.retries,
            "workers": None if self.workers is None else list(self.workers),
            "loose": self.allow_other_workers,
            "resources": self.resources,
            "priority": self.priority,
        }


def task_options(
    retries: Any = 0,
    workers: Any = None,
    allow_other_workers: Any = False,
    resources: Any = None,
    priority: Any = 0,
) -> TaskOptions:
    """Check the options; return them as `TaskOptions`.

    Raises:
        ValueError, TypeError: an option's value is out of bounds or of the
            wrong type; the message names the option.
    """
    if retries is None:
        retries = 0
    if not isinstance(retries, int) or isinstance(retries, bool) or not 0 <= retries <= m.MAX_RETRIES:
        raise ValueError(f"retries must be an int between 0 and {m.MAX_RETRIES}, got {retries!r}")
    if priority is None:
        priority = 0
    if not isinstance(priority, int) or isinstance(priority, bool) or not abs(priority) <= m.MAX_PRIORITY:
        raise ValueError(f"priority must be an int between -{m.MAX_PRIORITY} and {m.MAX_PRIORITY}, got {priority!r}")
    if allow_other_workers is None:
        allow_other_workers = False
    if not isinstance(allow_other_workers, bool):
        raise TypeError(f"allow_other_workers must be True or False, got {allow_other_workers!r}")
    restrictions = _workers(workers)
    if allow_other_workers and restrictions is None:
        raise ValueError("allow_other_workers=True needs workers=[...] (it loosens that restriction)")
    return TaskOptions(retries, restrictions, allow_other_workers, check_resources(resources, "resources"), priority)


def _workers(workers: Any) -> tuple[str, ...] | None:
    if workers is None:
        return None
    if isinstance(workers, str):
        workers = [workers]
    if not isinstance(workers, Iterable):
        raise TypeError(f"workers must be an address or a list of addresses, got {workers!r}")
    out = tuple(str(w) for w in workers)
    if not out:
        raise ValueError("workers=[] allows no worker at all; pass None for any worker")
    if len(out) > m.MAX_WORKERS:
        raise ValueError(f"workers lists {len(out)} addresses, more than {m.MAX_WORKERS}")
    return out


def check_resources(resources: Any, what: str) -> dict[str, float] | None:
    """``{name: amount}`` with names of at most `MAX_RESOURCE_NAME_CHARS`
    characters and positive, finite amounts; None for none.

    Raises:
        ValueError, TypeError: naming `what` and the bad entry.
    """
    if resources is None:
        return None
    if not isinstance(resources, Mapping):
        raise TypeError(f"{what} must be a dict like {{'GPU': 1}}, got {resources!r}")
    if len(resources) > m.MAX_RESOURCES:
        raise ValueError(f"{what} names {len(resources)} resources, more than {m.MAX_RESOURCES}")
    out: dict[str, float] = {}
    for name, amount in resources.items():
        if not isinstance(name, str) or not 0 < len(name) <= m.MAX_RESOURCE_NAME_CHARS:
            raise ValueError(f"{what}: a resource name must be a non-empty string of at most "
                             f"{m.MAX_RESOURCE_NAME_CHARS} characters, got {name!r}")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)):
            raise TypeError(f"{what}: the amount of {name!r} must be a number, got {amount!r}")
        if not (0 < amount <= m.MAX_RESOURCE_AMOUNT) or math.isnan(amount):
            raise ValueError(f"{what}: the amount of {name!r} must be positive and at most "
                             f"{m.MAX_RESOURCE_AMOUNT:g}, got {amount!r}")
        out[name] = float(amount)
    return out or None


def parse_resources(text: str) -> dict[str, float]:
    """``"GPU=2,MEM=4e9"`` (the CLI's ``--resources``) as a dict.

    Raises:
        ValueError: an entry is not NAME=NUMBER.
    """
    out: dict[str, Any] = {}
    for part in text.replace(" ", ",").split(","):
        if not part:
            continue
        name, sep, amount = part.partition("=")
        try:
            if not sep:
                raise ValueError
            out[name] = float(amount)
        except ValueError:
            raise ValueError(f"resources: {part!r} is not NAME=NUMBER (e.g. GPU=2)") from None
    return check_resources(out, "resources") or {}


def resources_flag(resources: Mapping[str, float]) -> list[str]:
    """``--resources`` for a worker process, or nothing: `parse_resources` read backwards.

    The CLI and `LocalCluster` both start worker processes; the flag is
    spelled here, beside its parser, so the two cannot drift apart.
    """
    if not resources:
        return []
    return ["--resources", ",".join(f"{name}={amount!r}" for name, amount in resources.items())]
