"""Exchanges the scheduler conducts with workers and nannies for a client.

A few client requests cannot be answered from the scheduler's state alone:
`scatter` puts data on workers, `run` calls every worker, `replicate` waits
for copies to be made, `restart` asks every nanny for a new worker. Each is
a task of its own (spawned by the driver in `trioflow/scheduler.py`) that
talks to other processes and then hands the result back to the driver with
`Scheduler._post`, so the core is still touched by the driver alone.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio

from trioflow.comm import RequestFailed, reply
from trioflow.comm.serialize import Serialized
from trioflow.errors import CommClosedError

if TYPE_CHECKING:
    from trioflow.scheduler import ClientLink, Scheduler, WorkerLink

logger = logging.getLogger("trioflow.scheduler")


async def scatter(
    scheduler: Scheduler, link: ClientLink, request: dict, data: dict[str, Serialized], broadcast: bool
) -> None:
    """Put scattered values on workers, then record where they landed.

    The values go straight from here to the chosen workers; the core learns
    of them (`DataScattered`) only once a worker has confirmed, so `who_has`
    never names a worker that does not hold the value.
    """
    await scheduler.wait_for_workers(1)
    targets = scheduler.state.scatter_targets(data, broadcast)
    by_worker: dict[str, dict[str, Serialized]] = {}
    for key, addresses in targets.items():
        for address in addresses:
            by_worker.setdefault(address, {})[key] = data[key]
    placed: dict[str, tuple[int, list[str]]] = {}

    async def put(address: str, values: dict[str, Serialized]) -> None:
        worker = scheduler.workers.get(address)
        if worker is None:
            return
        try:
            answer = await worker.requests.call({"op": "put_data", "data": values})
        except (CommClosedError, RequestFailed) as exc:
            logger.warning("could not scatter to %s: %s", address, exc)
            return
        for key, nbytes in answer.get("nbytes", {}).items():
            entry = placed.setdefault(key, (int(nbytes), []))
            entry[1].append(address)

    async with trio.open_nursery() as nursery:
        for address, values in by_worker.items():
            nursery.start_soon(put, address, values)
    failed = [key for key in data if key not in placed]
    scheduler._post(scheduler._scattered, link, request, placed, failed)


async def run_everywhere(scheduler: Scheduler, link: ClientLink, request: dict, function: Serialized) -> None:
    """`Client.run`: call `function` on every worker; reply with each outcome."""
    results: dict[str, dict[str, Any]] = {}

    async def run_on(address: str, worker: WorkerLink) -> None:
        try:
            answer = await worker.requests.call({"op": "run", "function": function})
        except (CommClosedError, RequestFailed) as exc:
            results[address] = {"error": f"{type(exc).__name__}: {exc}"}
            return
        results[address] = {k: v for k, v in answer.items() if k in ("result", "failure")}

    async with trio.open_nursery() as nursery:
        for address, worker in list(scheduler.workers.items()):
            nursery.start_soon(run_on, address, worker)
    reply(link.conn, request, results=results)


async def answer_when_replicated(
    scheduler: Scheduler, link: ClientLink, request: dict, keys: tuple[str, ...], n: int
) -> None:
    """Answer a `replicate` request once every key has its copies."""
    tasks = scheduler.state.tasks

    def in_memory(key: str) -> bool:
        return key in tasks and tasks[key].state.value == "memory"

    def settled() -> bool:
        wanted = min(n, len(scheduler.state.workers))
        return all(not in_memory(k) or len(tasks[k].who_has) >= wanted for k in keys)

    timeout = scheduler.config.restart_timeout
    with trio.move_on_after(timeout):
        await scheduler._wait_for_state(settled)
        bad = [k for k in keys if not in_memory(k)]
        if bad:
            reply(link.conn, request, error=f"not in memory, cannot replicate: {bad[:5]}")
        else:
            reply(link.conn, request, who_has={k: list(tasks[k].who_has) for k in keys})
        return
    reply(link.conn, request, error=f"replication not done within {timeout:g} s")


async def restart_workers(
    scheduler: Scheduler, link: ClientLink, request: dict, old: dict[str, WorkerLink], timeout: float
) -> None:
    """Ask each old worker's nanny for a new worker; reply once they are back."""
    with_nanny = [w for w in old.values() if w.nanny]

    async def restart_one(worker: WorkerLink) -> None:
        assert scheduler._pool is not None and worker.nanny is not None
        try:
            await scheduler._pool.call(worker.nanny, {"op": "restart_worker"})
        except (CommClosedError, RequestFailed) as exc:
            logger.warning("could not restart worker %s through its nanny: %s", worker.address, exc)

    def fresh() -> int:
        return sum(old.get(w.address) is not w for w in scheduler.workers.values())

    with trio.move_on_after(timeout):
        async with trio.open_nursery() as nursery:
            for worker in with_nanny:
                nursery.start_soon(restart_one, worker)
        await scheduler._wait_for_state(lambda: fresh() >= len(with_nanny))
        reply(link.conn, request, n_workers=len(scheduler.workers))
        return
    reply(
        link.conn,
        request,
        error=f"only {fresh()} of {len(with_nanny)} workers came back within {timeout:g} s",
    )
