"""Why a task ended without a value: the failure records the cores pass around.

A failure is decided in one place (a core state machine) and raised in
another (the client, perhaps minutes later and in another process). So the
cores never hold exception *objects*; they hold these small records, and
`trioflow.client` turns each into the exception the failure table promises
(design.md §1):

| record            | raised in the client as           |
|-------------------|-----------------------------------|
| `UserError`       | the user's own exception, with a `RemoteTraceback` cause |
| `WorkerDeaths`    | `trioflow.KilledWorker`           |
| `DataLost`        | `trioflow.LostData`               |
| `Cancelled`       | `trioflow.CancelledError`         |

A dependent of a failed task carries the *same* record, so `y.result()`
raises exactly what `x.result()` raises.
"""

from __future__ import annotations

from typing import Any

from trioflow.core.frozen import frozen


@frozen
class UserError:
    """The task's function raised (or its data could not be serialized).

    Attributes:
        exception: the pickled exception, opaque to the cores (a
            `trioflow.comm.Serialized`, or None when it would not pickle).
        type_name: qualified name of the exception type, for messages and
            for rebuilding an equivalent when `exception` is None.
        message: ``str(exception)``.
        traceback: the formatted remote traceback.
    """

    exception: Any
    type_name: str
    message: str
    traceback: str


@frozen
class WorkerDeaths:
    """The task was running on `deaths` workers when they died; it is bad."""

    key: str
    deaths: int
    last_worker: str


@frozen
class DataLost:
    """Data with no lineage (scattered) lost its last replica."""

    key: str


@frozen
class Cancelled:
    """The task was cancelled by a client or flushed by a restart."""

    reason: str


TaskFailure = UserError | WorkerDeaths | DataLost | Cancelled
