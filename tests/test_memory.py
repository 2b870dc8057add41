"""The worker's memory manager (trioflow/memory.py): the spilling store and
the fractions, without a worker around them."""

import os

import numpy as np
import pytest

from trioflow import memory
from trioflow.comm.buffers import FrameBuffer, WarmBuffers
from trioflow.comm.serialize import dumps, loads
from trioflow.config import Config
from trioflow.memory import SPILL_PREFIX, MemoryManager, SpillBuffer, remove_spill_directories


def sizes(table):
    """A `size_of` reading sizes from a table: value -> bytes."""
    return lambda value: table[value]


@pytest.fixture
def buffer(tmp_path):
    # Values are strings whose "size" is given; target: 100 bytes.
    store = SpillBuffer(100, str(tmp_path), size_of=lambda value: int(value.split(":")[1]))
    yield store
    store.close()


def test_the_least_recently_used_values_go_to_disk_past_the_target(buffer):
    """Storing past the target spills the oldest values, in order of last use."""
    buffer["a"] = "a:40"
    buffer["b"] = "b:40"
    assert buffer["a"] == "a:40"  # a is now the most recently used
    buffer["c"] = "c:40"  # 120 > 100: b (least recently used) goes
    assert (list(buffer.fast), list(buffer.slow)) == (["a", "c"], ["b"])
    assert buffer.fast_bytes == 80 and buffer.spills == 1


def test_a_spilled_value_is_read_back_when_asked_for(buffer):
    """Reading a spilled value brings it back into memory (and spills another);
    its file stays, so pushing it out again writes nothing."""
    buffer["a"] = "a:60"
    buffer["b"] = "b:60"
    assert list(buffer.slow) == ["a"] and buffer.spills == 1
    [(a_file, a_bytes)] = buffer.slow.values()
    assert buffer["a"] == "a:60"
    assert (list(buffer.fast), sorted(buffer.slow)) == (["a"], ["a", "b"])
    assert buffer.unspills == 1 and len(buffer) == 2 and "b" in buffer and set(buffer) == {"a", "b"}
    assert buffer.spills == 2  # b was written; a's file is still there
    assert buffer["b"] == "b:60"  # pushes a out: a clean copy, nothing written
    assert (list(buffer.fast), sorted(buffer.slow)) == (["b"], ["a", "b"])
    assert buffer.spills == 2 and buffer.slow["a"] == (a_file, a_bytes) and os.path.exists(a_file)
    assert buffer.fast_bytes == 60 and buffer["a"] == "a:60"
    del buffer["a"]  # in memory and on disk: both go
    assert "a" not in buffer and not os.path.exists(a_file) and list(buffer.slow) == ["b"]
    assert buffer.spilled_bytes == buffer.slow["b"][1]


def test_a_value_bigger_than_the_target_goes_straight_to_disk_and_stays_there(buffer):
    """A value that alone passes the target is written at once; read, it is
    not kept in memory (it would push the others out for nothing)."""
    buffer["small"] = "small:10"
    buffer["big"] = "big:150"
    assert (list(buffer.fast), list(buffer.slow)) == (["small"], ["big"])
    assert buffer["big"] == "big:150"
    assert list(buffer.slow) == ["big"]


def test_arrays_round_trip_through_disk_and_are_sent_as_stored(tmp_path):
    """A NumPy array spilled (pickle protocol 5, its buffer written as it is)
    comes back equal; `serialized` hands a peer the bytes on disk unopened."""
    store = SpillBuffer(1000, str(tmp_path))
    array = np.arange(1000, dtype=np.float64)
    store["x"] = array  # 8000 bytes: straight to disk
    assert list(store.slow) == ["x"]
    assert store.spilled_bytes > array.nbytes
    sent = store.serialized("x")
    assert len(sent.buffers) == 1 and np.array_equal(loads(sent), array)
    assert np.array_equal(store["x"], array)
    store.close()


def test_a_value_that_does_not_pickle_stays_in_memory(buffer, caplog):
    """Spilling cannot write it: it is kept in memory and never tried again."""

    class Unpicklable(str):
        def __reduce__(self):
            raise TypeError("no pickling here")

    buffer["u"] = Unpicklable("u:60")
    buffer["b"] = "b:60"  # u is the least recently used, but cannot go
    assert list(buffer.unspillable) == ["u"]
    assert list(buffer.slow) == []
    assert "cannot spill 'u' to disk" in caplog.text


def test_dropping_a_spilled_value_removes_its_file_without_reading_it(buffer, tmp_path):
    """pop (the worker's DropData) deletes the file; close removes the directory."""
    buffer["a"] = "a:60"
    buffer["b"] = "b:60"
    [(path, _)] = buffer.slow.values()
    assert buffer.pop("a") is None and not os.path.exists(path)
    assert buffer.unspills == 0 and buffer.spilled_bytes == 0
    directory = os.path.dirname(path)
    buffer.close()
    assert not os.path.exists(directory)


def test_a_nanny_removes_what_a_killed_worker_left_on_disk(tmp_path):
    """remove_spill_directories: only that pid's spill directories go."""
    config = Config(spill_directory=str(tmp_path))
    mine, other = tmp_path / f"{SPILL_PREFIX}4242-abc", tmp_path / f"{SPILL_PREFIX}4243-abc"
    mine.mkdir()
    other.mkdir()
    (mine / "1.pickle").write_bytes(bytes(dumps(1).header))
    remove_spill_directories(config, 4242)
    assert not mine.exists() and other.exists()


def test_the_fractions_spill_pause_and_resume_by_process_memory(tmp_path):
    """With a limit of 1000: past 700 (spill) values go to disk until the
    process is under 600 (target); past 800 even then, it pauses; at 800 or
    under it resumes."""
    config = Config(spill_directory=str(tmp_path))
    rss = {"now": 0}
    manager = MemoryManager(1000, config, lambda: rss["now"])
    manager.data.size_of = lambda value: 100
    for key in "abcde":
        manager.data[key] = key  # 500 bytes of values: under the target (600)
    # Each value written to disk frees 100 bytes of the process.
    real_evict = manager.data.evict

    def evict():
        done = real_evict()
        rss["now"] -= 100 * done
        return done

    manager.data.evict = evict
    rss["now"] = 750
    assert manager.check() is None  # past spill: a, b written; 550 now
    assert (list(manager.data.slow), rss["now"]) == (["a", "b"], 550)
    rss["now"] = 1200
    # Spilling c, d, e is not enough (900, past 800: memory that is not
    # values): it pauses. Spilling comes first: pausing is the last resort.
    assert manager.check() is True and manager.paused
    assert list(manager.data.slow) == ["a", "b", "c", "d", "e"] and rss["now"] == 900
    assert manager.check() is None and manager.paused  # still past 800
    rss["now"] = 800
    assert manager.check() is False and not manager.paused
    assert manager.metrics() == {
        "memory_limit": 1000.0, "managed_bytes": 0.0, "spilled_bytes": float(manager.data.spilled_bytes),
        "spilled_keys": 5.0, "paused": 0.0,
    }
    manager.close()


def test_workers_with_a_limit_are_started_to_give_freed_memory_back():
    """A nanny starts a worker that has a memory limit with glibc's trim
    threshold set (freed values then leave the process, so spilling lowers
    its memory), unless the user chose a value of their own."""
    from trioflow.nanny import MALLOC_TRIM_THRESHOLD_BYTES, _returning_freed_memory

    assert _returning_freed_memory({"PATH": "/bin"}) == {
        "PATH": "/bin", "MALLOC_TRIM_THRESHOLD_": str(MALLOC_TRIM_THRESHOLD_BYTES)
    }
    assert _returning_freed_memory({"MALLOC_TRIM_THRESHOLD_": "0"}) == {"MALLOC_TRIM_THRESHOLD_": "0"}


def test_kept_receive_buffers_are_given_back_before_any_value_is_spilled(tmp_path, monkeypatch):
    """A worker's warm receive buffers (comm/buffers.py) are memory it holds
    beyond its values: past the spill fraction they go first, and a value
    goes to disk only if that was not enough."""
    pool = WarmBuffers()
    pool.configure(64 << 20, 30.0, lambda: 0.0)
    monkeypatch.setattr(memory, "WARM", pool)
    received = FrameBuffer(2 << 20, warm=pool)
    received.write(b"w" * (2 << 20))
    frame = received.frame()
    del received, frame  # the value in it was dropped: a free, kept buffer
    assert pool.free_bytes() == 2 << 20
    # The process is past its spill fraction (700 of 1000) while it keeps the
    # buffer, and under the target (600) once it gives it back.
    manager = MemoryManager(1000, Config(spill_directory=str(tmp_path)), lambda: 750 if pool.kept_bytes else 550)
    manager.data.size_of = lambda value: 100
    manager.data["a"] = "a"
    assert manager.check() is None
    assert pool.kept_bytes == 0
    assert list(manager.data.slow) == [] and "a" in manager.data
