"""What goes into `ClientState.handle` and what comes out.

Events are facts: the user made or dropped handles, submitted or cancelled
tasks; the scheduler reported a result; the fetcher learned something; the
connection came or went. Outputs are what the client shell must do: send a
message to the scheduler, ask for copies again, wake whoever waits on a
future. Each carries the `stimulus_id` of the event that caused it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from trioflow.core.failures import TaskFailure
from trioflow.core.frozen import frozen


class LineageTask(Protocol):
    """What the lineage needs to know of a kept task (the rest is the shell's)."""

    dependencies: Iterable[str]
    function_id: str | None


# ------------------------------------------------------------------ events --


@frozen
class ClientEvent:
    stimulus_id: str


@frozen
class HandlesMade(ClientEvent):
    """The user got a new `Future` handle for each of `keys` (a key listed
    twice got two). A key cancelled before is pending again."""

    keys: tuple[str, ...]


@frozen
class HandlesDropped(ClientEvent):
    """These handles were dropped (garbage collected or released)."""

    keys: tuple[str, ...]


@frozen
class CallsSubmitted(ClientEvent):
    """The user submitted these tasks (their handles are already made).

    `tasks[i]` is the kept form of the task of `keys[i]`; `functions` maps
    the function ids they call to their pickled payloads.
    """

    keys: tuple[str, ...]
    tasks: tuple[LineageTask, ...]
    functions: Mapping[str, Any]


@frozen
class CallsRefused(ClientEvent):
    """Tasks the client could not take after their handles were handed out.

    A blocking client's `submit` does not wait for the client's loop: the
    handles exist before the loop checks whether the tasks can be taken
    (the `refusal` of a client that began closing, or that waits for its
    scheduler with too many tasks queued already). Each of `keys` not done
    fails with `error`, on this client only; nothing was sent for them.
    """

    keys: tuple[str, ...]
    error: BaseException


@frozen
class ValuesScattered(ClientEvent):
    """The user scattered data under these keys (handles already made);
    `tasks[i]` is the lineage-less marker kept for `keys[i]`."""

    keys: tuple[str, ...]
    tasks: tuple[LineageTask, ...]


@frozen
class FuturesCancelled(ClientEvent):
    """The user cancelled these keys."""

    keys: tuple[str, ...]
    reason: str


@frozen
class FiredAndForgotten(ClientEvent):
    """The user wants these keys computed even once no handle is left."""

    keys: tuple[str, ...]


@frozen
class CopiesRequested(ClientEvent):
    """The user asked for `n` copies of each of `keys` (``n == 1`` ends it)."""

    keys: tuple[str, ...]
    n: int


@frozen
class FinishReported(ClientEvent):
    """The scheduler reports `key`'s value: where it is, or the value itself."""

    key: str
    who_has: tuple[str, ...]
    value: Any = None


@frozen
class FailureReported(ClientEvent):
    """The scheduler reports these keys failed, all with `failure`."""

    keys: tuple[str, ...]
    failure: TaskFailure


@frozen
class LossReported(ClientEvent):
    """The scheduler reports `key`'s value gone; it is being recomputed."""

    key: str


@frozen
class RestartReported(ClientEvent):
    """The scheduler reports a `Client.restart()`: every task was flushed."""


@frozen
class RefusalReported(ClientEvent):
    """The scheduler refused these tasks (they break its rules)."""

    keys: tuple[str, ...]
    reason: str


@frozen
class HoldersLearned(ClientEvent):
    """The fetcher asked the scheduler who holds these keys.

    `answers[key]` is ``(version, holders)``: the record's version when the
    question was asked, and the workers named in the answer (none: the
    value is gone and being recomputed).
    """

    answers: Mapping[str, tuple[int, tuple[str, ...]]]


@frozen
class FetchFailed(ClientEvent):
    """The fetcher did not get these values from the holders it asked.

    `lacking[key]` is a holder that *answered* that it does not have the
    value; `unreachable[key]` one that did not answer (refused, broke, hung).
    """

    lacking: Mapping[str, str]
    unreachable: Mapping[str, str]


@frozen
class SchedulerConnected(ClientEvent):
    """Registered with a scheduler; `recovering` if it is not the first."""

    recovering: bool


@frozen
class SchedulerDisconnected(ClientEvent):
    """The scheduler connection ended (or a new one could not be made)."""


@frozen
class GaveUp(ClientEvent):
    """No scheduler for too long (or one that will never take us): every
    future not done fails with `error`."""

    error: BaseException


@frozen
class ClosingRequested(ClientEvent):
    """The user closes the client."""


@frozen
class ConnectionEnded(ClientEvent):
    """The shell's connection task ended: nothing will be sent again."""


# ----------------------------------------------------------------- outputs --


@frozen
class ClientOutput:
    stimulus_id: str


@frozen
class SendTasks(ClientOutput):
    """Submit the lineage's tasks for `keys` (in this order) to the scheduler;
    `wanted`: those the client holds a handle for."""

    keys: tuple[str, ...]
    wanted: tuple[str, ...]


@frozen
class SendReleaseKeys(ClientOutput):
    """Tell the scheduler this client no longer wants these keys."""

    keys: tuple[str, ...]


@frozen
class SendCancelKeys(ClientOutput):
    keys: tuple[str, ...]
    reason: str


@frozen
class SendFireAndForget(ClientOutput):
    keys: tuple[str, ...]


@frozen
class SendMissingData(ClientOutput):
    """Tell the scheduler these holders answered that they lack `key`."""

    key: str
    holders: tuple[str, ...]


@frozen
class RequestReplicas(ClientOutput):
    """Ask the (new) scheduler again for `n` copies of `keys`; nobody waits for the answer."""

    keys: tuple[str, ...]
    n: int


@frozen
class FutureDone(ClientOutput):
    """`key`'s record became done: wake whoever waits on it."""

    key: str
