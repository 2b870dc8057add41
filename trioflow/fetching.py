"""Fetching: a client gets the values of its finished futures from the workers.

Values never travel through the scheduler (but the small ones that come
with the report of their completion). The scheduler says which workers hold
a value (`key_finished` carries ``who_has``); the `Fetcher` asks the first
holder of each key with ``get_data``, one request per worker, all workers
at once, over the client's pool of worker connections.

A fetch can miss, for two different reasons, and they are told apart:

* the holder *answered* without the value (it dropped it): that holder is
  named to the scheduler in ``missing_data``, which stops counting it;
* the holder did *not answer* (refused, broken, hung): nothing is said.
  That is no proof that it lacks the value; the scheduler judges a
  worker's liveness itself (``worker_ttl``, its closed connection) and
  drops a dead worker's copies when it leaves. Naming an unreachable
  holder made the scheduler forget a live copy, and declare scattered data
  lost while a hung worker still held it (the rule the workers follow,
  trioflow/core/worker_state.py; for the client it is decided in its core,
  `ClientState` on `FetchFailed`).

Either way the fetcher then asks the scheduler who holds the value now
(``who_has``) and tries again; a holder that did not answer is not asked
again before `Config.heartbeat_interval` has passed, so a dead worker the
scheduler has not yet noticed is not hammered in a tight loop. An empty
answer means the value is being recomputed: the fetcher waits for its
report.
"""

from __future__ import annotations

from typing import Any, Protocol

import trio

from trioflow.comm import RequestFailed, loads
from trioflow.comm import messages as m
from trioflow.comm.serialize import Serialized
from trioflow.core.client_events import ClientEvent, FetchFailed, HoldersLearned
from trioflow.core.client_state import FINISHED, FutureRecord
from trioflow.errors import CommClosedError, ProtocolError, SerializationError
from trioflow.future import exception_of, wait_done

# Keys per `get_data` request.
GET_DATA_SLICE = 1_000
# Keys per `who_has` request (a message body must stay within `max_body_bytes`).
KEYS_SLICE = m.MAX_KEYS
# States `gather` waits for, and values it unpickles, between two yields.
GATHER_SLICE = 10_000


def unpickled(value: Any) -> Any:
    """A fetched value, or one that came with its report, as the user's
    object (a scattered value may be held as it is, not pickled)."""
    return loads(value) if isinstance(value, Serialized) else value


class FetchingClient(Protocol):
    """What the fetcher needs of its client (`AsyncClient`)."""

    _pool: Any  # the worker connection pool (`open_connection_pool`)

    def _apply(self, event: ClientEvent) -> None: ...
    def _stimulus(self, what: str) -> str: ...
    async def _connection(self, timeout: float | None) -> Any: ...
    async def _call_scheduler(self, message: m.Message) -> Any: ...


class Fetcher:
    """Gets the values of a client's finished futures from the workers.

    Args:
        client: the client whose pool, scheduler connection and core it uses.
        retry_pause_s: how long a holder that did not answer is left alone
            (`Config.heartbeat_interval`: by then the scheduler may know).
    """

    def __init__(self, client: FetchingClient, retry_pause_s: float):
        self._client = client
        self._retry_pause_s = retry_pause_s
        # worker -> when it last failed to answer (trio time); forgotten
        # once it is older than the pause.
        self._unanswered: dict[str, float] = {}

    async def gather(self, records: list[FutureRecord]) -> dict[str, Any]:
        """Wait for every record, then fetch the values straight from workers.

        Raises:
            Exception: the failure of the first record, in order, that failed.
            SerializationError: a holder could not send a value.

        Cancellation: at any await; what was fetched is dropped.
        """
        values: dict[str, Any] = {}
        todo = records
        while todo:
            for i, record in enumerate(todo):
                if not record.done():
                    await wait_done(record)
                elif i % GATHER_SLICE == GATHER_SLICE - 1:
                    await trio.lowlevel.checkpoint()
            for record in todo:
                if record.status is not FINISHED:
                    raise exception_of(record)
            todo = await self._fetch(todo, values)
        return values

    async def _fetch(self, records: list[FutureRecord], values: dict[str, Any]) -> list[FutureRecord]:
        """Fetch what the holders have; return the records to wait on again."""
        by_worker: dict[str, list[FutureRecord]] = {}
        retry: list[FutureRecord] = []
        lacking: dict[str, str] = {}  # key -> a holder that answered it lacks it
        unreachable: dict[str, str] = {}  # key -> a holder that did not answer
        for record in records:
            if record.value is not None:
                values[record.key] = record.value  # came with the report
            elif record.who_has:
                by_worker.setdefault(record.who_has[0], []).append(record)
            else:
                retry.append(record)

        unsendable: list[str] = []

        async def fetch_from(worker: str, group: list[FutureRecord]) -> None:
            data: dict[str, Serialized] = {}
            errors: dict[str, str] = {}
            missing: set[str] = set()
            answered = await self._get_data(worker, [r.key for r in group], data, errors, missing)
            for record in group:
                key = record.key
                if key in errors:
                    unsendable.append(errors[key])
                elif key in data:
                    values[key] = data[key]
                else:
                    retry.append(record)
                    if answered and key in missing:
                        lacking[key] = worker
                    else:
                        unreachable[key] = worker

        if by_worker:
            async with trio.open_nursery() as nursery:
                for worker, group in by_worker.items():
                    nursery.start_soon(fetch_from, worker, group)
        else:
            # Every value came with its report (a small result: the common
            # `submit(...).result()`). A bare checkpoint keeps this a place
            # where other tasks run, at a third of an empty nursery's cost.
            await trio.lowlevel.checkpoint()
        if unsendable:
            raise SerializationError(unsendable[0])
        for i, (key, value) in enumerate(values.items()):
            values[key] = unpickled(value)
            if i % GATHER_SLICE == GATHER_SLICE - 1:
                await trio.lowlevel.checkpoint()
        if retry:
            await self._refresh_holders(retry, lacking, unreachable)
        return retry

    async def _get_data(
        self, worker: str, keys: list[str], data: dict[str, Serialized], errors: dict[str, str], missing: set[str]
    ) -> bool:
        """Ask `worker` for `keys`; return whether it answered every request.

        Values too big to come with the others are asked for again (the
        first value of an answer always comes or errs: progress).
        """
        failed_at = self._unanswered.get(worker)
        if failed_at is not None:
            await trio.sleep_until(failed_at + self._retry_pause_s)
        todo = keys
        try:
            while todo:
                later: list[str] = []
                for start in range(0, len(todo), GET_DATA_SLICE):
                    answer = await self._client._pool.call(worker, m.GetData(keys=todo[start : start + GET_DATA_SLICE]))
                    data.update(answer.data)
                    errors.update(answer.errors)
                    missing.update(answer.missing)
                    later.extend(answer.later or ())
                todo = [key for key in later if key not in data]
        except (CommClosedError, RequestFailed, ProtocolError):
            now = trio.current_time()
            for other, at in list(self._unanswered.items()):
                if at + self._retry_pause_s <= now:
                    del self._unanswered[other]  # long past: forget it
            self._unanswered[worker] = now
            return False
        self._unanswered.pop(worker, None)
        return True

    async def _refresh_holders(
        self, records: list[FutureRecord], lacking: dict[str, str], unreachable: dict[str, str]
    ) -> None:
        """Tell the scheduler which holders lack a value, and learn the current ones.

        Waits through a scheduler outage (the caller's timeout still
        applies). The answer goes to the core (`HoldersLearned`) with the
        version each record had when the question was asked: a report that
        overtook the answer wins.
        """
        client = self._client
        keys = [record.key for record in records]
        while True:
            await client._connection(None)
            asked = {record.key: record.version for record in records}
            client._apply(FetchFailed(client._stimulus("fetch-failed"), lacking, unreachable))
            who_has: dict[str, list[str]] = {}
            try:
                for start in range(0, len(keys), KEYS_SLICE):
                    answer = await client._call_scheduler(m.WhoHas(keys=keys[start : start + KEYS_SLICE]))
                    who_has.update(answer.who_has)
                break
            except CommClosedError:
                # The scheduler went away meanwhile: wait for the next one
                # (`_connection` does not return the broken one).
                continue
        answers = {key: (version, tuple(who_has.get(key) or ())) for key, version in asked.items()}
        client._apply(HoldersLearned(client._stimulus("holders"), answers))

