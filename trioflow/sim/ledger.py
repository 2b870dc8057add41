"""What the chaos lab writes down while a run happens, for the oracles.

Three oracles judge a run by what happened *during* it rather than by its
end state (docs/chaos.md, "What every run checks"), so the lab keeps a
ledger of the facts they need, each taken from the ground truth of the
simulation (what a worker's store and threads really held, which faults
really struck) at the moment it happened:

* **Runs and what may justify them.** Every call of a task function, by
  key; every event that may legitimately cost a key a run or its value: a
  worker lost (the scheduler declared it gone, or its process ended) while
  the key was assigned to it, running there or held there; a failed fetch
  of the key (a ``replica_missing``); a scheduler restart after which no
  worker back by the end of the new scheduler's recovery window runs or
  holds the key, although it had run before or was running on a worker
  that did not come back in time. `check_executions` allows each key one
  run plus one per such event on the key, on any key it depends on, or on
  any key that depends on it.
* **Scattered data declared lost**, with every live worker that offered a
  copy at that moment, whether the scheduler counted it as registered, and
  whether a worker fault had cut it off since it last registered.
  `check_data_losses` allows the loss only if every such worker was lost.
* **Values delivered**: each value the client received for a key and each
  copy a worker held at the end. `check_deliveries` requires one value
  per key.

A worker is named by its node (``worker-2``); every incarnation of it has
the same address. A loss is counted once per registration: the death of a
process and the scheduler noticing its closed connection are one loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Restart:
    """A scheduler died at `died_at`; its successor's recovery window closed
    at `recovered_at`, when the workers registered with it ran or held
    `kept`; `everywhere` is what the workers alive at the death ran or held."""

    died_at: float
    recovered_at: float
    kept: frozenset[str]
    everywhere: frozenset[str]


@dataclasses.dataclass(frozen=True)
class DataLoss:
    """The scheduler declared scattered data `key` lost at `time`.

    Attributes:
        holders: every worker (node) that offered a copy at that moment,
            with how it stood: "registered" (the scheduler counted it as a
            live worker), "registered, struck" (the same, but a worker
            fault had struck it since it registered: its departure may be
            the next event of the same instant), "cut off" (not registered,
            and struck since it last registered), or "absent" (not
            registered, no fault: it had simply not come back yet).
    """

    time: float
    key: str
    holders: tuple[tuple[str, str], ...]


class Ledger:
    """The facts of one run that the ledger oracles judge (see the module docstring)."""

    def __init__(self) -> None:
        # key -> [(time, node)] of every call of its function.
        self.runs: dict[str, list[tuple[float, str]]] = {}
        # key -> the events that may justify running it again, described.
        self.excuses: dict[str, list[str]] = {}
        self.data_losses: list[DataLoss] = []
        # key -> [(value, where it was seen)].
        self.deliveries: dict[str, list[tuple[Any, str]]] = {}
        # node -> how many times it registered (with any scheduler).
        self._registrations: dict[str, int] = {}
        # (node, registration) -> the loss it ended in, described.
        self._losses: dict[tuple[str, int], str] = {}
        # node -> when its registrations ended.
        self.left_at: dict[str, list[float]] = {}
        # Nodes struck by a worker fault since they last registered.
        self.cut_off: set[str] = set()
        # node -> the keys it ran or held when the scheduler last died, and when.
        self._at_scheduler_death: dict[str, set[str]] = {}
        self._died_at: float | None = None
        self.restarts: list[Restart] = []

    # -- runs --

    def ran(self, key: str, node: str, time: float) -> None:
        self.runs.setdefault(key, []).append((time, node))

    def excuse(self, keys: Iterable[str], why: str) -> None:
        for key in keys:
            self.excuses.setdefault(key, []).append(why)

    # -- workers --

    def registered(self, node: str) -> None:
        self._registrations[node] = self._registrations.get(node, 0) + 1
        self.cut_off.discard(node)

    def struck(self, node: str) -> None:
        """A worker fault (crash, restart, hang, partition, reset) hit `node`."""
        self.cut_off.add(node)

    def worker_lost(self, node: str, keys: Iterable[str], time: float, how: str) -> None:
        """`node`'s current registration ended (`how`); `keys` were assigned
        to it, running there, or held there.

        One loss per registration: the death of the process and the
        scheduler noticing it are the same event, whose keys are the union
        of what each saw (the process what it ran and held, the scheduler
        what it had assigned there, whose reports may have died with the
        connection). A node that never registered held nothing the
        scheduler knew of.
        """
        registration = (node, self._registrations.get(node, 0))
        if registration[1] == 0:
            return
        if registration not in self._losses:
            self.left_at.setdefault(node, []).append(time)
        self.excuse(keys, self._losses.setdefault(registration, f"{node} lost at {time:.3f} ({how})"))

    def scheduler_died(self, time: float, held: dict[str, set[str]]) -> None:
        """The scheduler died; `held` is what each live worker ran or held."""
        self._died_at = time
        for node, keys in held.items():
            self._at_scheduler_death.setdefault(node, set()).update(keys)

    def recovery_ended(self, time: float, back: dict[str, set[str]]) -> None:
        """A new scheduler closed its recovery window; `back` is what each
        worker registered with it runs or holds now (a run that ended in an
        error while no scheduler listened is forgotten: it runs again)."""
        if self._died_at is None:
            return  # the first scheduler: nothing was lost
        kept = set().union(*back.values()) if back else set()
        everywhere = set().union(*self._at_scheduler_death.values()) if self._at_scheduler_death else set()
        self.restarts.append(Restart(self._died_at, time, frozenset(kept), frozenset(everywhere)))
        self._at_scheduler_death.clear()
        self._died_at = None

    def excuses_for(self, keys: Iterable[str]) -> set[str]:
        """The distinct events that may justify running again any of `keys`."""
        found: set[str] = set()
        keys = list(keys)
        for key in keys:
            found.update(self.excuses.get(key, ()))
        for restart in self.restarts:
            for key in keys:
                ran_before = any(time < restart.died_at for time, _ in self.runs.get(key, ()))
                if key not in restart.kept and (key in restart.everywhere or ran_before):
                    found.add(f"the scheduler died at {restart.died_at:.3f} and no worker back "
                              f"by {restart.recovered_at:.3f} had {key}")
                    break
        return found

    # -- data --

    def data_lost(self, key: str, time: float, holders: tuple[tuple[str, str], ...]) -> None:
        self.data_losses.append(DataLoss(time, key, holders))

    def spared(self, loss: DataLoss) -> list[tuple[str, str]]:
        """The holders of `loss` that were not lost: registered and unharmed,
        or absent. A struck holder still registered at the loss counts as
        lost if its registration ended in that same instant (two workers cut
        off together leave one after the other)."""
        spared = []
        for node, why in loss.holders:
            if why == "cut off":
                continue
            if why == "registered, struck" and any(abs(t - loss.time) < 1e-9 for t in self.left_at.get(node, ())):
                continue
            spared.append((node, why))
        return spared

    def delivered(self, key: str, value: Any, where: str) -> None:
        self.deliveries.setdefault(key, []).append((value, where))
