"""Exchanges the scheduler conducts with workers and nannies for a client.

A few client requests cannot be answered from the scheduler's state alone:
`scatter` puts data on workers, `run` calls every worker, `replicate` waits
for copies to be made, `restart` asks every nanny for a new worker. Each is
a task of its own (spawned by the driver in `trioflow/scheduler.py`) that
talks to other processes and then hands the result back to the driver with
`ExchangeHost.post`, so the core is still touched by the driver alone.

An exchange sees the scheduler only through `ExchangeHost`: the handful of
questions and calls it needs, nothing of the scheduler's own fields. Each
ends with a reply, an error reply, or (when its client left) nothing; none
raises, because an exception here would end the scheduler.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import trio

from trioflow.comm import RequestFailed, clip, messages as m
from trioflow.comm.serialize import Serialized
from trioflow.errors import CommClosedError, ProtocolError

logger = logging.getLogger("trioflow.scheduler")

# What a call to a worker or nanny may fail with: it is gone, it said no,
# or it answered nonsense (its connection is then closed as well).
CALL_FAILED = (CommClosedError, RequestFailed, ProtocolError)


class ExchangeHost(Protocol):
    """What an exchange may ask of the scheduler (it implements this)."""

    restart_timeout: float

    def live_workers(self) -> list[str]:
        """Addresses of the registered workers, in registration order."""

    def scatter_targets(self, keys: list[str], broadcast: bool) -> dict[str, tuple[str, ...]]:
        """Where each scattered key should go."""

    def registrations_since(self, serial: int) -> int:
        """How many live workers registered after registration number `serial`."""

    def copies(self, keys: tuple[str, ...]) -> dict[str, int | None]:
        """How many workers hold each key (None: not in memory)."""

    async def ask_worker(self, address: str, message: m.Message) -> Any:
        """A request to a registered worker; its checked reply."""

    async def ask_nanny(self, address: str, message: m.Message) -> Any:
        """A request to a nanny's control port; its checked reply."""

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        """Return once `condition()` holds (re-checked after state changes)."""

    def post(self, handler: Callable[..., None], *args: Any) -> None:
        """Run `handler(*args)` in the driver."""


async def scatter(host: ExchangeHost, data: dict[str, Serialized], broadcast: bool, done: Callable) -> None:
    """Put scattered values on workers; `done(placed, failed)` in the driver.

    The values go straight from here to the chosen workers; the core learns
    of them only once a worker has confirmed, so `who_has` never names a
    worker that does not hold the value.
    """
    await host.wait_for(lambda: bool(host.live_workers()))
    targets = host.scatter_targets(list(data), broadcast)
    by_worker: dict[str, dict[str, Serialized]] = {}
    for key, addresses in targets.items():
        for address in addresses:
            by_worker.setdefault(address, {})[key] = data[key]
    placed: dict[str, tuple[int, list[str]]] = {}

    async def put(address: str, values: dict[str, Serialized]) -> None:
        try:
            answer = await host.ask_worker(address, m.PutData(data=values))
        except CALL_FAILED as exc:
            logger.warning("could not scatter to %s: %s", address, clip(str(exc), 300))
            return
        for key, nbytes in answer.nbytes.items():
            if key in values:  # a worker cannot claim keys it was not given
                entry = placed.setdefault(key, (nbytes, []))
                entry[1].append(address)

    async with trio.open_nursery() as nursery:
        for address, values in by_worker.items():
            nursery.start_soon(put, address, values)
    host.post(done, placed, [key for key in data if key not in placed])


async def run_everywhere(
    host: ExchangeHost, function: Serialized, done: Callable, workers: list[str] | None = None
) -> None:
    """`Client.run`: call `function` on every worker (or on `workers`); `done(results)`."""
    results: dict[str, m.RunOutcome] = {}

    async def run_on(address: str) -> None:
        try:
            answer = await host.ask_worker(address, m.RunEverywhere(function=function))
        except CALL_FAILED as exc:
            results[address] = m.RunOutcome(error=clip(f"{type(exc).__name__}: {exc}", m.MAX_REASON_CHARS - 20))
            return
        results[address] = m.RunOutcome(result=answer.result, failure=answer.failure)

    async with trio.open_nursery() as nursery:
        for address in host.live_workers():
            if workers is None or address in workers:
                nursery.start_soon(run_on, address)
    host.post(done, results)


async def upload_everywhere(host: ExchangeHost, filename: str, data: Serialized, done: Callable) -> None:
    """`Client.upload_file`: store the file on every worker; `done(results)`,
    ``{address: ""}`` for each worker that stored it, else why not."""
    results: dict[str, str] = {}

    async def upload_to(address: str) -> None:
        try:
            await host.ask_worker(address, m.UploadFile(filename=filename, data=data))
        except CALL_FAILED as exc:
            results[address] = clip(f"{type(exc).__name__}: {exc}", m.MAX_REASON_CHARS - 20)
            return
        results[address] = ""

    async with trio.open_nursery() as nursery:
        for address in host.live_workers():
            nursery.start_soon(upload_to, address)
    host.post(done, results)


async def answer_when_replicated(host: ExchangeHost, keys: tuple[str, ...], n: int, done: Callable) -> None:
    """`done(who_has or None, error)` once every key has its copies (or not in time)."""

    def settled() -> bool:
        wanted = min(n, len(host.live_workers()))
        return all(c is None or c >= wanted for c in host.copies(keys).values())

    timeout = host.restart_timeout
    with trio.move_on_after(timeout):
        await host.wait_for(settled)
        bad = [k for k, c in host.copies(keys).items() if c is None]
        if bad:
            host.post(done, None, f"not in memory, cannot replicate: {clip(bad[:5])}")
        else:
            host.post(done, keys, None)
        return
    host.post(done, None, f"replication not done within {timeout:g} s")


async def restart_workers(
    host: ExchangeHost, nannies: list[str], since: int, timeout: float, done: Callable
) -> None:
    """Ask each nanny for a new worker; `done(n_workers, error)` once as many
    workers as there are nannies registered after registration `since`."""

    async def restart_one(nanny: str) -> None:
        try:
            await host.ask_nanny(nanny, m.RestartWorker())
        except CALL_FAILED as exc:
            logger.warning("could not restart a worker through its nanny %s: %s", nanny, clip(str(exc), 300))

    def fresh() -> int:
        return host.registrations_since(since)

    with trio.move_on_after(timeout):
        async with trio.open_nursery() as nursery:
            for nanny in nannies:
                nursery.start_soon(restart_one, nanny)
        await host.wait_for(lambda: fresh() >= len(nannies))
        host.post(done, len(host.live_workers()), None)
        return
    host.post(done, None, f"only {fresh()} of {len(nannies)} workers came back within {timeout:g} s")
