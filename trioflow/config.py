"""`Config`: every tunable of trioflow in one frozen dataclass.

A process builds one `Config` when it starts and hands it down; nothing reads
the environment after that. The precedence is the usual one, later wins:

    field defaults  <  TRIOFLOW_* environment variables  <  CLI flags / keywords

Each field's docstring-comment gives its unit. Times are seconds of
`trio.current_time()`, so under a `MockClock` they are virtual seconds.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
from collections.abc import Mapping
from typing import Any

from trioflow.core.frozen import frozen

__all__ = ["Config", "ConfigError", "parse_bytes"]

ENV_PREFIX = "TRIOFLOW_"


class ConfigError(ValueError):
    """A configuration value is missing, malformed or out of range."""


@frozen
class Config:
    """Every tunable of one trioflow process, checked when it is made.

    Each field alone must have its type and be positive (ports: 0..65535;
    strings and booleans are free). Some fields only make sense together;
    a `Config` that breaks one of these rules is refused with a
    `ConfigError` naming both fields and their values:

    - ``heartbeat_interval < worker_ttl``. The scheduler declares a worker
      dead after `worker_ttl` seconds without a message from it, and a quiet
      worker speaks once every `heartbeat_interval`: with a ttl no longer
      than the interval, every idle worker would be declared dead between
      two of its heartbeats.
    - ``heartbeat_interval < scheduler_ttl``. A scheduler never speaks to an
      idle worker unprompted; the worker hears from it through the
      `heartbeat_ack` to each heartbeat. A `scheduler_ttl` no longer than
      the interval would have every idle worker give up on a healthy
      scheduler and reconnect, again and again.
    - ``reconnect_backoff_min <= reconnect_backoff_max``: the cap of the
      reconnect delays cannot be below the first delay.

    Not a rule: `recovery_grace` is best above `reconnect_backoff_max` (see
    its comment), but a shorter grace only costs recomputation, never a
    result, and tests shorten it on purpose.
    """

    # -- liveness -------------------------------------------------------
    heartbeat_interval: float = 0.5
    """Seconds between a worker's heartbeats to the scheduler."""
    worker_ttl: float = 3.0
    """Seconds of silence after which the scheduler declares a worker dead."""
    scheduler_ttl: float = 3.0
    """Seconds of silence after which a worker declares its scheduler gone."""

    # -- failure policy ---------------------------------------------------
    allowed_failures: int = 3
    """Worker deaths a running task may witness before it is marked bad."""

    # -- connections ------------------------------------------------------
    connect_timeout: float = 10.0
    """Seconds to wait for one TCP connection (and handshake) to open."""
    reconnect_backoff_min: float = 0.05
    """First delay, in seconds, before reconnecting to a lost scheduler (and
    before a nanny restarts a worker that died young)."""
    reconnect_backoff_max: float = 2.0
    """Cap, in seconds, of those exponential delays (before jitter)."""
    peer_timeout: float = 6.0
    """Seconds a worker or client waits for a peer that sends nothing back
    while it owes an answer (a data fetch) before giving up on that peer."""
    scheduler_timeout: float = math.inf
    """Seconds a worker keeps trying to reach a lost scheduler before exiting."""
    recovery_grace: float = 2.5
    """Seconds a newly started scheduler holds back lineage that reconnecting
    clients resubmit, so that surviving workers can re-register first and
    their values are reused rather than recomputed. Best above
    reconnect_backoff_max, the longest a worker waits between two attempts
    to reconnect (not enforced: a shorter grace costs recomputation only)."""
    orphan_timeout: float = 60.0
    """Seconds a scheduler keeps values re-registered by workers that no
    client has claimed (after a restart) before freeing them."""

    handshake_timeout: float = 5.0
    """Seconds a new connection has to say hello before it is closed."""
    idle_timeout: float = 60.0
    """Seconds a connection may stay silent after its hello before the
    server closes it. Workers and clients send heartbeats, so only a peer
    that has gone quiet (or stopped talking trioflow) is dropped."""
    min_transfer_rate: float = 65_536.0
    """Bytes per second a batch must keep up once it has begun; a peer that
    trickles bytes slower than this loses its connection."""
    max_connections: int = 1_024
    """Connections one server process holds at once; more are closed on arrival."""

    # -- wire limits (checked before anything is allocated) ---------------
    max_frame_bytes: int = 1 << 30
    """Largest single buffer frame (a value's bytes) accepted from a peer, in bytes."""
    max_body_bytes: int = 4 << 20
    """Largest msgpack body (frame 0: the messages of one batch), in bytes.
    Kept small because decoding it holds the event loop: 4 MiB decode in
    tens of milliseconds, whatever they hold."""
    max_frames_per_batch: int = 65_536
    """Most frames one batch may announce."""
    max_messages_per_batch: int = 1_000_000
    """Most messages (and msgpack array/map entries) one batch may hold."""
    max_connection_bytes: int = 4 << 30
    """Most bytes one batch may announce: a connection's budget of bytes in
    flight, and so the largest value (argument or result) that can travel
    (a value over `max_frame_bytes` travels as several frames). A value
    too big for it fails with an error naming its key and size."""
    max_process_bytes: int = 8 << 30
    """Bytes in flight across all the connections of one process: a batch
    waits for its share before its frames are read."""

    # -- scheduling --------------------------------------------------------
    worker_saturation: float = 64.0
    """Tasks sent ahead to a worker, per thread, before the rest queue on
    the scheduler. Higher hides round trips; lower balances better when a
    worker dies or tasks differ in length. ``inf`` sends everything at once.
    This is the only default: the scheduler's core takes the value from the
    shell that builds it, and core tests choose their own (usually 1)."""
    batch_threads: bool = True
    """Run the threads trioflow starts (event loops, task threads, a
    ``trioflow`` command's main thread) under Linux's ``SCHED_BATCH``: the
    same share of CPU, but a thread that wakes does not preempt the one
    running. With more busy threads than cores that saves a context switch
    and a GIL hand-off on most messages (trioflow/batch_threads.py;
    docs/performance.md, W1 and W3). Task functions inherit it. No effect
    off Linux; the caller's own threads are never changed."""
    work_stealing: bool = True
    """Let a worker with an idle thread take a task that waits on another
    worker (after asking that worker whether it has started it; see
    trioflow/core/stealing.py). False: where a task is placed, it runs."""
    bandwidth: float = 100e6
    """Bytes per second a value is taken to move between workers: what a
    steal's inputs cost to fetch, against what the task costs to run."""

    # -- memory (docs/resilience.md, "A worker's memory fills up") ----------
    # Fractions of a worker's memory limit (a nanny's --memory-limit; a
    # worker without one manages nothing). dask.distributed's defaults.
    memory_target_fraction: float = 0.6
    """Past this much of its limit in values it holds, a worker writes the
    least recently used ones to disk (and reads them back when needed)."""
    memory_spill_fraction: float = 0.7
    """Past this much of its limit in process memory (RSS, what the nanny
    measures), a worker spills values until it is back under the target."""
    memory_pause_fraction: float = 0.8
    """Past this much of its limit in process memory, a worker starts no new
    task and fetches nothing, and the scheduler sends it nothing new, until
    it is back under it."""
    memory_terminate_fraction: float = 0.95
    """Past this much of its limit in process memory, the nanny kills the
    worker (and starts another). Above 1: only past the limit itself."""
    warm_buffers: bool = True
    """Let a worker process keep the memory of big values it received (1 MiB
    or more) once they are dropped, to receive the next ones into: their
    pages are real already, which makes a transfer up to twice as fast
    (docs/performance.md, W4). Given back after `warm_buffer_idle`, and all
    at once when the worker needs memory (spilling)."""
    warm_buffer_bytes: int = 512 << 20
    """Most memory a worker process keeps that way, in bytes."""
    warm_buffer_idle: float = 30.0
    """Seconds a kept buffer may go unused before it is given back."""
    spill_directory: str = ""
    """Where a worker makes its spill directory (``trioflow-spill-<pid>-*``,
    removed when it exits, or by its nanny if it was killed). Empty: the
    system's temporary directory."""

    # -- who may connect (docs/security.md) ---------------------------------
    auth: bool = True
    """Prove a token on every connection (both ends). False is ``--no-auth``:
    anyone who can reach a port can run code on the workers."""
    token_file: str = "~/.config/trioflow/cluster-token"
    """The cluster's token (scheduler, nannies, workers); `trioflow scheduler`
    writes it when it first starts. `TRIOFLOW_TOKEN` overrides it."""
    client_token_file: str = "~/.config/trioflow/client-token"
    """The clients' token, written next to the cluster's."""
    tls_ca_file: str = ""
    """TLS: the cluster's CA certificate (PEM). With the next two, servers
    listen on ``tls://`` and connections are mutual TLS."""
    tls_cert_file: str = ""
    """TLS: this process's certificate (PEM), signed by the CA."""
    tls_key_file: str = ""
    """TLS: this process's private key (PEM)."""

    # -- cluster management -------------------------------------------------
    restart_timeout: float = 30.0
    """Seconds `Client.restart()` waits for the workers to come back."""
    memory_check_interval: float = 0.1
    """Seconds between a nanny's checks of its worker's memory."""

    # -- the dashboard (docs/dashboard.md) ------------------------------------
    dashboard_port: int | None = None
    """TCP port of the scheduler's dashboard (a web page, JSON and
    Prometheus /metrics); 0 for any free port. None, the default: no
    dashboard. Needs ``pip install 'trioflow[dashboard]'``."""
    dashboard_host: str = "127.0.0.1"
    """Interface the dashboard binds. Loopback by default: the page shows
    task keys, addresses and errors to whoever can reach it."""
    dashboard_token: str = ""
    """When set, every dashboard request must carry it, as
    ``Authorization: Bearer <token>`` or ``?token=<token>``. Empty: no check
    (loopback only is then the protection)."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            kind = _base_type(field.type)
            if kind != field.type and value is None:
                continue  # an optional field left unset
            if kind == "bool":
                if not isinstance(value, bool):
                    raise ConfigError(f"Config.{field.name} must be true or false, got {value!r}")
                continue
            if kind == "str":
                if not isinstance(value, str):
                    raise ConfigError(f"Config.{field.name} must be a string, got {value!r}")
                continue
            if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"Config.{field.name} must be an int, got {value!r}")
            if field.name in _PORT_FIELDS:
                if not 0 <= value <= 65535:
                    raise ConfigError(f"Config.{field.name} must be a port number between 0 and 65535, got {value!r}")
                continue
            if kind == "float":
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise ConfigError(f"Config.{field.name} must be a number, got {value!r}")
                if math.isnan(value):
                    raise ConfigError(f"Config.{field.name} must not be NaN")
            if value <= 0:
                raise ConfigError(f"Config.{field.name} must be positive, got {value!r}")
        if not self.dashboard_host.strip():
            raise ConfigError("Config.dashboard_host must name an interface, e.g. 127.0.0.1 or 0.0.0.0")
        self._check_rules_between_fields()

    def _check_rules_between_fields(self) -> None:
        """The rules of the class docstring (each field is already valid alone).

        Raises:
            ConfigError: naming the two fields, their values and why they clash.
        """
        for ttl in ("worker_ttl", "scheduler_ttl"):
            if not self.heartbeat_interval < getattr(self, ttl):
                raise ConfigError(
                    f"Config.heartbeat_interval ({self.heartbeat_interval:g} s) must be less than "
                    f"Config.{ttl} ({getattr(self, ttl):g} s): " + _TTL_REASONS[ttl]
                )
        if self.reconnect_backoff_min > self.reconnect_backoff_max:
            raise ConfigError(
                f"Config.reconnect_backoff_min ({self.reconnect_backoff_min:g} s) must not exceed "
                f"Config.reconnect_backoff_max ({self.reconnect_backoff_max:g} s)"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        """Defaults, then ``TRIOFLOW_<FIELD>`` variables, then `overrides`.

        Raises:
            ConfigError: a variable or override names no field or does not parse.
        """
        environ = os.environ if environ is None else environ
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for name, text in environ.items():
            if not name.startswith(ENV_PREFIX):
                continue
            field_name = name[len(ENV_PREFIX) :].lower()
            if field_name not in fields:
                _warn_if_misspelt(name, field_name, fields)
                continue  # other TRIOFLOW_* variables belong to other parts
            values[field_name] = _parse(name, text, fields[field_name].type, field_name)
        for name, value in overrides.items():
            if name not in fields:
                raise ConfigError(f"Config has no field {name!r}")
            if value is not None:
                values[name] = value
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """``TRIOFLOW_*`` variables that carry this config into a child process."""
        return {f"{ENV_PREFIX}{f.name.upper()}": _format(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> Config:
        """A copy with `changes` applied (and validated)."""
        return dataclasses.replace(self, **changes)


# Why each ttl must outlast a heartbeat, said in the error (see the Config docstring).
_TTL_REASONS = {
    "worker_ttl": "an idle worker speaks once per heartbeat_interval, so the scheduler "
    "would declare it dead between two heartbeats",
    "scheduler_ttl": "an idle worker hears from its scheduler only in answer to a heartbeat, "
    "so it would give up on a healthy scheduler between two heartbeats",
}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
# Fields holding a TCP port: 0..65535, where 0 means any free port.
_PORT_FIELDS = ("dashboard_port",)


def _base_type(type_name: str) -> str:
    """``"int | None"`` -> ``"int"``: the type of an optional field's values."""
    return type_name.removesuffix(" | None")


def _parse(variable: str, text: str, type_name: str, field_name: str = "") -> int | float | bool | str | None:
    kind = _base_type(type_name)
    if kind == "str":
        return text
    if kind != type_name and text.strip().lower() in ("", "none"):
        return None
    if kind == "bool":
        if text.strip().lower() in _TRUE:
            return True
        if text.strip().lower() in _FALSE:
            return False
        raise ConfigError(f"{variable}={text!r} is not true or false (use 1/0, true/false, yes/no, on/off)")
    try:
        if field_name.endswith("_bytes"):
            return parse_bytes(text)
        if kind == "int":
            return int(text)
        return float(text)
    except ValueError:
        what = "an integer" if kind == "int" else "a number"
        if kind != type_name:
            what += " (or 'none')"
        raise ConfigError(f"{variable}={text!r} is not {what}") from None


def _format(value: Any) -> str:
    """The text of a value in a ``TRIOFLOW_*`` variable; `_parse` reads it back."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, str):
        return value
    return repr(value)


def _warn_if_misspelt(variable: str, field_name: str, fields: Mapping[str, Any]) -> None:
    # Imported here: only a misspelt variable needs it, and every worker
    # process imports this module before it can connect (W9).
    import difflib

    close = difflib.get_close_matches(field_name, list(fields), n=1, cutoff=0.8)
    if close:
        warnings.warn(
            f"{variable} is not a trioflow setting and is ignored; did you mean {ENV_PREFIX}{close[0].upper()}?",
            UserWarning,
            stacklevel=3,
        )


# Units of byte sizes, as dask.utils.parse_bytes has them: decimal (kB, MB...
# and their first letters, k, M...) and binary (KiB, MiB...); any case.
BYTE_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "pb": 10**15,
    "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "pib": 2**50,
}
_SIZE = re.compile(r"\s*([0-9.eE+-]*)\s*([A-Za-z]*)\s*")


def parse_bytes(text: str | int) -> int:
    """Bytes from a size such as ``"4GB"``, ``"512 MiB"``, ``"1e6"`` or ``"4g"``.

    As ``dask.utils.parse_bytes``: ``4GB`` = ``4g`` = 4×10⁹, ``4GiB`` = 2³²;
    units are case-insensitive; a unit alone means one of it (``"MB"``).

    Raises:
        ValueError: not a size, or negative (the message names the text).
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value: float = text
    else:
        match = _SIZE.fullmatch(str(text))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in BYTE_UNITS or not (match.group(1) or unit):
            raise ValueError(f"{text!r} is not a byte size (e.g. 4GB, 512MiB, 1e9)")
        try:
            value = float(match.group(1) or 1) * BYTE_UNITS[unit]
        except ValueError:
            raise ValueError(f"{text!r} is not a byte size (e.g. 4GB, 512MiB, 1e9)") from None
    if not value >= 0 or math.isinf(value):
        raise ValueError(f"byte size {text!r} must be a finite number, at least 0")
    return int(value)
