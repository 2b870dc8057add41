"""A worker's memory: values kept in memory or spilled to disk, and when to pause.

A worker holds every value it computed, fetched or was sent until the
scheduler frees it. Without a limit, that is all there is (`Worker.data` is
a plain dict). With a memory limit (a nanny's ``--memory-limit``, passed on
to its worker), four fractions of the limit, `Config` fields with
dask.distributed's defaults, decide what happens as memory fills:

=====================  =======  ===================================================
Config field           default  past this much of the limit...
=====================  =======  ===================================================
memory_target_fraction   0.6    ...in *values held* (their estimated sizes), the
                                least recently used values are written to disk
memory_spill_fraction    0.7    ...in *process memory* (RSS), values are written
                                to disk until it is back under the target
memory_pause_fraction    0.8    ...in process memory, the worker starts no new task
                                and fetches nothing; the scheduler sends it nothing
                                new (its waiting tasks may be stolen) until it is
                                back under it
memory_terminate_...     0.95   ...in process memory, its nanny kills it (nanny.py)
=====================  =======  ===================================================

Two measures, because each misses what the other sees. The sizes of values
(`trioflow.protocol.sizeof`) are known the moment a value is stored, so the
target is kept without waiting; but they are estimates, and memory that is
not a value (a task's temporaries, a leak, the allocator's slack) is
invisible to them. Process memory sees everything, but only when measured
(every `Config.memory_check_interval`), and it falls late: freed memory
may not go back to the system. So sizes keep values under the target, and
process memory catches the rest, from spilling to pausing to being killed.

`SpillBuffer` is the store: a mapping whose values live in memory (oldest
use first) or in files of a spill directory, and which reads a spilled value
back, into memory, whenever it is asked for (by a task that needs it, or
to answer a ``get_data``: then the bytes on disk are sent as they are,
without unpickling them). A value read back keeps its file: values are
never changed in place (a task that mutates its input breaks that rule for
every copy, not just this one), so when it is pushed out again nothing is
written, it is only dropped from memory. A workload that reads spilled
values back in turn (W12) writes each once instead of once per reading.
`MemoryManager` measures and decides.

Why our own small store rather than zict (the one dask uses): the worker
needs the pickled bytes of a spilled value to answer a peer without
unpickling them, the sizes and the disk bytes for its heartbeat, and to
know when a value cannot be pickled at all (it then stays in memory); with
zict that is a subclass of its Buffer and File anyway, plus a dependency.
What this store does not do: compress, spill in a thread (a large value is
written on the worker's event loop, a few milliseconds for tens of MB; in
production, dask's worker moved that off its loop), or spill values that a
running task still references (writing them frees nothing until it ends).

Everything here runs in the worker's driver task: nothing else touches the
store, so it needs no lock.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

from trioflow.comm.buffers import WARM
from trioflow.comm.serialize import Serialized, dumps, loads
from trioflow.config import Config
from trioflow.errors import SerializationError
from trioflow.protocol import sizeof

logger = logging.getLogger("trioflow.memory")

__all__ = ["MemoryManager", "SpillBuffer", "remove_spill_directories", "too_big_message"]

# A spill directory is <base>/trioflow-spill-<pid>-<random>: its nanny can
# find and remove those of a worker it saw die (it knows the pid).
SPILL_PREFIX = "trioflow-spill-"
# A spill file: the header's length and the buffers' lengths, then the bytes.
_COUNT = struct.Struct("<Q")


def spill_directory_base(config: Config) -> str:
    return config.spill_directory or tempfile.gettempdir()


def remove_spill_directories(config: Config, pid: int) -> None:
    """Remove the spill directories worker process `pid` left behind (it was
    killed before it could remove them itself)."""
    for path in glob.glob(os.path.join(spill_directory_base(config), f"{SPILL_PREFIX}{pid}-*")):
        shutil.rmtree(path, ignore_errors=True)


def too_big_message(key: str, nbytes: int, limit: int) -> str:
    """Why a value bigger than its worker's whole memory limit is refused."""
    return (
        f"the value of task {key!r} is {nbytes} bytes ({nbytes / 2**20:.1f} MiB), more than this "
        f"worker's whole memory limit of {limit} bytes ({limit / 2**20:.1f} MiB): it cannot be kept "
        f"in memory, and spilled it could never be read back"
    )


class SpillBuffer(MutableMapping[str, Any]):
    """Values in memory, least recently used first, or in files on disk.

    Args:
        target: bytes of values (by their estimated sizes) to keep in memory
            at most; storing or reading back a value past it spills the least
            recently used others (`Config.memory_target_fraction` × limit).
        directory: where to make the spill directory, on first use.
        size_of: the estimated size of a value.
    """

    def __init__(self, target: float, directory: str, size_of: Callable[[Any], int] = sizeof):
        self.target = target
        self.size_of = size_of
        # In memory, least recently used first (a read moves a value last).
        self.fast: dict[str, Any] = {}
        # The estimated size of every value, in memory or not.
        self.sizes: dict[str, int] = {}
        # Invariant: the sum of `sizes` over `fast`.
        self.fast_bytes = 0
        # On disk: key -> (its file, bytes in that file). A key may be in
        # `fast` too (read back: its file is kept, a clean copy).
        self.slow: dict[str, tuple[str, int]] = {}
        # Invariant: the sum of the file bytes of `slow`.
        self.slow_bytes = 0
        # Values that do not pickle: they stay in memory whatever happens.
        self.unspillable: dict[str, None] = {}
        # How many values were written to disk, and read back, so far.
        self.spills = 0
        self.unspills = 0
        self._base = directory
        self._directory: str | None = None
        self._files = 0
        self._disk_failed = False

    # ------------------------------------------------------------ mapping --

    def __len__(self) -> int:
        return len(self.sizes)

    def __iter__(self) -> Iterator[str]:
        yield from list(self.sizes)

    def __contains__(self, key: object) -> bool:
        return key in self.sizes

    def __getitem__(self, key: str) -> Any:
        if key in self.fast:
            value = self.fast.pop(key)
            self.fast[key] = value  # now the most recently used
            return value
        if key not in self.slow:
            raise KeyError(key)
        value = loads(self._read(key))
        self.unspills += 1
        if self.sizes[key] > self.target:
            return value  # too big to keep in memory: it stays on disk only
        self.fast[key] = value  # its file stays: pushed out again, nothing is written
        self.fast_bytes += self.sizes[key]
        self._keep_target(but=key)
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        if key in self:
            self._discard(key)
        size = self.sizes[key] = self.size_of(value)
        self.fast[key] = value
        self.fast_bytes += size
        if size > self.target and self._spill(key):
            return  # bigger than the target alone: straight to disk
        self._keep_target(but=key)

    def __delitem__(self, key: str) -> None:
        if key not in self:
            raise KeyError(key)
        self._discard(key)

    def pop(self, key: str, *default: Any) -> Any:  # type: ignore[override]
        """Remove `key` without reading it back from disk (its value is
        returned only if it was in memory; else None)."""
        if key not in self:
            if default:
                return default[0]
            raise KeyError(key)
        value = self.fast.get(key)
        self._discard(key)
        return value

    # ----------------------------------------------------------- spilling --

    def serialized(self, key: str) -> Serialized:
        """The pickled value of `key`, for a peer: from disk as it is, or pickled now.

        Raises:
            KeyError: not held. SerializationError: the value does not pickle.
        """
        if key in self.fast:
            return dumps(self.fast[key])
        return self._read(key)

    def evict(self) -> bool:
        """Write the least recently used value to disk; False if none could be."""
        for key in self.fast:
            if key not in self.unspillable:
                if self._spill(key):
                    return True
                if self._disk_failed:
                    return False
        return False

    def close(self) -> None:
        """Forget everything and remove the spill directory."""
        self.fast.clear()
        self.sizes.clear()
        self.slow.clear()
        self.fast_bytes = self.slow_bytes = 0
        directory, self._directory = self._directory, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)

    @property
    def spilled_bytes(self) -> int:
        """Bytes on disk (including the files of values read back since)."""
        return self.slow_bytes

    # ----------------------------------------------------------- internal --

    def _keep_target(self, but: str) -> None:
        """Spill the least recently used values while memory is past the target
        (never `but`, the value just stored or read: it is about to be used)."""
        while self.fast_bytes > self.target:
            victim = next((k for k in self.fast if k != but and k not in self.unspillable), None)
            if victim is None or not self._spill(victim):
                return

    def _spill(self, key: str) -> bool:
        if key in self.slow:  # read back earlier: its file is still there
            del self.fast[key]
            self.fast_bytes -= self.sizes[key]
            return True
        value = self.fast[key]
        try:
            serialized = dumps(value)
        except SerializationError as exc:
            logger.warning("cannot spill %r to disk, it stays in memory: %s", key, exc)
            self.unspillable[key] = None
            return False
        try:
            path, nbytes = self._write(serialized)
        except OSError as exc:
            if not self._disk_failed:
                logger.error("spilling to disk failed, values stay in memory from now on: %s", exc)
            self._disk_failed = True
            return False
        del self.fast[key]
        self.fast_bytes -= self.sizes[key]
        self.slow[key] = (path, nbytes)
        self.slow_bytes += nbytes
        self.spills += 1
        return True

    def _write(self, serialized: Serialized) -> tuple[str, int]:
        if self._directory is None:
            os.makedirs(self._base, exist_ok=True)
            self._directory = tempfile.mkdtemp(prefix=f"{SPILL_PREFIX}{os.getpid()}-", dir=self._base)
        self._files += 1
        path = os.path.join(self._directory, f"{self._files}.pickle")
        parts = [serialized.header, *serialized.buffers]
        lengths = [memoryview(p).nbytes for p in parts]
        head = _COUNT.pack(len(parts)) + b"".join(_COUNT.pack(n) for n in lengths)
        with open(path, "wb") as file:
            file.write(head)
            for part in parts:
                file.write(part)  # out-of-band buffers are written in place, not copied
        return path, len(head) + sum(lengths)

    def _read(self, key: str) -> Serialized:
        path, nbytes = self.slow[key]
        data = bytearray(nbytes)
        with open(path, "rb") as file:
            file.readinto(data)
        view = memoryview(data)
        (count,) = _COUNT.unpack_from(view, 0)
        lengths = [_COUNT.unpack_from(view, 8 * (1 + i))[0] for i in range(count)]
        offset = 8 * (1 + count)
        parts = []
        for length in lengths:
            parts.append(view[offset : offset + length])
            offset += length
        return Serialized(parts[0], parts[1:])

    def _forget_file(self, key: str) -> None:
        path, nbytes = self.slow.pop(key)
        self.slow_bytes -= nbytes
        try:
            os.remove(path)
        except OSError:
            pass

    def _discard(self, key: str) -> None:
        if key in self.fast:
            del self.fast[key]
            self.fast_bytes -= self.sizes[key]
        if key in self.slow:
            self._forget_file(key)
        del self.sizes[key]
        self.unspillable.pop(key, None)


class MemoryManager:
    """A worker's memory limit, its fractions, and the store they act on.

    Args:
        limit: the worker's memory limit in bytes.
        config: the fractions and the spill directory.
        rss: the process's resident memory now, in bytes.
    """

    def __init__(self, limit: int, config: Config, rss: Callable[[], int]):
        self.limit = limit
        self.target_bytes = config.memory_target_fraction * limit
        self.spill_bytes = config.memory_spill_fraction * limit
        self.pause_bytes = config.memory_pause_fraction * limit
        self.rss = rss
        self.data = SpillBuffer(self.target_bytes, spill_directory_base(config))
        self.paused = False
        self.last_rss = 0

    def too_big(self, nbytes: int) -> bool:
        """Whether one value of `nbytes` is more than the whole limit."""
        return nbytes > self.limit

    def check(self) -> bool | None:
        """Measure; spill while past the spill fraction; pause or resume.

        Returns True if the worker must pause now, False if it may resume
        now, None if nothing changes.
        """
        rss = self.last_rss = self.rss()
        if rss > self.spill_bytes and WARM.release():
            # Kept receive buffers are the cheapest memory to give back.
            rss = self.last_rss = self.rss()
        if rss > self.spill_bytes:
            # Down to the target, not just under the spill fraction: a margin,
            # so that the next few values do not spill again at once. A
            # value received into a kept buffer leaves its memory there when
            # it goes: give such buffers back before measuring again.
            while rss > self.target_bytes and self.data.evict():
                WARM.release()
                rss = self.last_rss = self.rss()
        if not self.paused and rss > self.pause_bytes:
            self.paused = True
            return True
        if self.paused and rss <= self.pause_bytes:
            self.paused = False
            return False
        return None

    def metrics(self) -> dict[str, float]:
        """What a heartbeat says of memory (the dashboard and scheduler_info show it)."""
        return {
            "memory_limit": float(self.limit),
            "managed_bytes": float(self.data.fast_bytes),
            "spilled_bytes": float(self.data.spilled_bytes),
            "spilled_keys": float(len(self.data.slow)),
            "paused": 1.0 if self.paused else 0.0,
        }

    def close(self) -> None:
        self.data.close()
