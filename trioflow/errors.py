"""The exceptions trioflow raises, in one place.

They fall into two families, as in h11:

* errors a *task* ends with, which a client sees when it asks for a result
  (`KilledWorker`, `LostData`, `CancelledError`, `SerializationError`, and
  the user's own exceptions, which travel with a `RemoteTraceback`);
* errors of the *plumbing*, which a process sees about a peer
  (`CommClosedError`, `ProtocolError`, `AuthenticationError`).

This module is imported by `trioflow.core`, so it must stay pure: no trio,
no sockets.
"""

from __future__ import annotations

import concurrent.futures

__all__ = [
    "AuthenticationError",
    "CancelledError",
    "CommClosedError",
    "KilledWorker",
    "LostData",
    "ProtocolError",
    "RemoteTraceback",
    "SerializationError",
    "TrioflowError",
]


class TrioflowError(Exception):
    """Base class of trioflow's own errors (not of cancellation)."""


class KilledWorker(TrioflowError):
    """A task was running on too many workers when they died.

    After `Config.allowed_failures` such deaths the scheduler marks the task
    as bad and never runs it again: it is likely the task itself (a segfault,
    `os._exit`, a memory blow-up) that kills its workers.
    """

    def __init__(self, key: str, deaths: int, last_worker: str):
        self.key = key
        self.deaths = deaths
        self.last_worker = last_worker
        super().__init__(
            f"task {key!r} was running on {deaths} workers when they died "
            f"(the last was {last_worker}); it is marked as bad and will not "
            f"be retried"
        )

    def __reduce__(self):
        return (type(self), (self.key, self.deaths, self.last_worker))


class LostData(TrioflowError):
    """Data with no lineage (from `Client.scatter`) lost its last copy.

    Scattered data cannot be recomputed, so when the last worker holding it
    dies the future and every future that depends on it raise this. A task
    whose input the scheduler does not know at all (it never had it, or
    forgot it) fails with it too: the scheduler has neither a copy nor a
    lineage for that input.
    """

    def __init__(self, key: str):
        self.key = key
        super().__init__(
            f"the data of {key!r} is lost: no worker holds a copy and the scheduler has no lineage "
            f"to recompute it from (scattered data whose last holder is gone, or a key it no longer knows)"
        )

    def __reduce__(self):
        return (type(self), (self.key,))


class CancelledError(concurrent.futures.CancelledError):
    """A future was cancelled, or the cluster was restarted under it."""


class SerializationError(TrioflowError):
    """A function, an argument or a result could not be (de)serialized."""


class CommClosedError(TrioflowError, ConnectionError):
    """The connection to a peer is closed (or was never opened)."""


class ProtocolError(TrioflowError):
    """A peer sent bytes that break the wire protocol (docs/protocol.md)."""


class AuthenticationError(ProtocolError):
    """A peer did not prove that it holds the cluster's shared secret."""


class DriverStopped(TrioflowError):
    """A server's driver met a bug and stopped the server (crash-only).

    Raised out of `Scheduler.serve` or `Worker.serve` when handling one
    event raised: from the core (part of the event's transitions may be
    applied, and its messages are lost) or from the shell's own code around
    it. The message names the event and the exception. Whoever started the
    server restarts it (a nanny does so for its worker; a scheduler is
    restarted by its supervisor or its user), and trioflow recovers from
    that restart as from any other (docs/architecture.md, "When the core
    raises").
    """


class RemoteTraceback(Exception):
    """The formatted traceback of an exception raised in another process.

    A user's exception is re-raised in the client with its original type and
    message; this object is attached as its ``__cause__`` so that the remote
    frames print beneath the local ones.
    """

    def __init__(self, text: str):
        self.text = text
        super().__init__(text)

    def __str__(self) -> str:
        return "\n\nTraceback in the worker:\n" + self.text
