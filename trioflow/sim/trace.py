"""The trace of a simulated run: what happened, when, where; and its fingerprint.

A trace is a list of events ``(time, node, text)``, one line each when
rendered::

    12.345678 worker-1 ran chain-017 [12.225678+0.120000]
    12.346001 net send #42 worker-1->scheduler 131 bytes, latency 0.0031...

Rules, so that the same seed and plan give the same bytes (design.md §3):
times are virtual (`trio.current_time()` under `MockClock`) and printed
with six decimals; texts never contain object ids, OS ports, pids, wall
times or anything iterated out of a set. The SHA-256 of the rendered text
is the run's fingerprint.

`logs_into` also copies the shells' own log records into the trace (node
``log:<component>``), so a reader sees why a worker left next to when.
`chrome_trace` renders the same events in the Chrome trace-event JSON
format, which https://ui.perfetto.dev and chrome://tracing open: one row
per node, task executions and fault windows as bars, the rest as ticks
(`trioflow.trace_events`, which real clusters' task streams use too).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import trio

from trioflow.trace_events import chrome_trace


class Trace:
    """Collects the events of one run, in the order they happen."""

    def __init__(self) -> None:
        # (time, node, text, duration or None); a span ends at `time`.
        self.events: list[tuple[float, str, str, float | None]] = []
        # Subtracted from Trio's clock by `add` (a real run's trace starts
        # at 0, as a simulated one does).
        self.origin = 0.0

    def add(self, node: str, text: str) -> None:
        """Record `text` about `node` now."""
        self.events.append((trio.current_time() - self.origin, node, text, None))

    def at(self, time: float, node: str, text: str) -> None:
        """Record `text` at a given virtual time (the network's callback)."""
        self.events.append((time, node, text, None))

    def span(self, node: str, text: str, start: float, duration: float) -> None:
        """Record something that lasted from `start` for `duration` seconds, now that it ended."""
        self.events.append((start + duration, node, f"{text} [{start:.6f}+{duration:.6f}]", duration))

    def lines(self) -> list[str]:
        return [f"{t:.6f} {node} {text}" for t, node, text, _ in self.events]

    def text(self) -> str:
        return "\n".join(self.lines()) + "\n"

    def sha256(self) -> str:
        return hashlib.sha256(self.text().encode()).hexdigest()

    def chrome_trace(self) -> dict[str, Any]:
        """The events as a Chrome/Perfetto trace-event JSON object."""
        return chrome_trace(
            ((t, node, text if duration is None else text.rsplit(" [", 1)[0], duration)
             for t, node, text, duration in self.events),
            "trioflow chaos lab",
        )

    def write_chrome_trace(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as out:
            json.dump(self.chrome_trace(), out)


# ------------------------------------------------------------------ logging --

# Object addresses would make a trace differ between runs; they never should
# appear in a log message, but if one does, it must not break replay.
_ADDRESS_RE = re.compile(r"0x[0-9a-fA-F]{6,}")


class _TraceLogHandler(logging.Handler):
    """Copies trioflow's log records into the trace; ERRORs are violations."""

    def __init__(self, trace: Trace, violations: list[str]):
        super().__init__(logging.INFO)
        self.trace = trace
        self.violations = violations

    def emit(self, record: logging.LogRecord) -> None:
        try:
            now = trio.current_time()
        except RuntimeError:  # outside the run (never expected)
            return
        message = _ADDRESS_RE.sub("0x?", record.getMessage())
        component = record.name.rsplit(".", 1)[-1]
        self.trace.at(now - self.trace.origin, f"log:{component}", f"{record.levelname} {message}")
        if record.levelno >= logging.ERROR:
            details = ""
            if record.exc_info:
                details = "\n" + "".join(traceback.format_exception(*record.exc_info))
            self.violations.append(f"internal error logged by {record.name}: {message}{details}")


@contextmanager
def logs_into(trace: Trace, violations: list[str]) -> Iterator[None]:
    """Copy trioflow's log records (INFO and up) into `trace` for the block;
    an ERROR (an internal error of a shell) is also added to `violations`."""
    logger = logging.getLogger("trioflow")
    handler = _TraceLogHandler(trace, violations)
    saved = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
