"""run, run_on_scheduler, upload_file, as_completed(...).batches() and progress."""

import io
import textwrap

import pytest
import trio

import trioflow
from trioflow.comm import messages as m


def inc(x):
    return x + 1


def add(a, b=0):
    return a + b


def worker_address(dask_worker):
    return dask_worker.address


def scheduler_workers(dask_scheduler, extra):
    return sorted(dask_scheduler.state.workers), extra


async def test_run_passes_arguments_and_can_target_workers(client, cluster):
    """run(fn, *args, workers=[...], **kwargs): the arguments reach fn; only those workers run it."""
    a, b = sorted(cluster.scheduler.state.workers)
    assert await client.run(add, 1, b=2) == {a: 3, b: 3}
    assert await client.run(add, 5, workers=[b]) == {b: 5}
    assert await client.run(worker_address) == {a: a, b: b}


async def test_run_refuses_an_unknown_worker(client):
    """workers= naming no worker of the cluster is refused, naming it."""
    with pytest.raises(RuntimeError, match="no worker at 'tcp://127.0.0.1:9'"):
        await client.run(add, 1, workers=["tcp://127.0.0.1:9"])


async def test_run_on_scheduler_runs_there_with_the_scheduler_object(client, cluster):
    """run_on_scheduler(fn, *args): dask_scheduler= is the Scheduler; errors travel back."""
    workers, extra = await client.run_on_scheduler(scheduler_workers, extra="x")
    assert workers == sorted(cluster.scheduler.state.workers) and extra == "x"
    assert await client.run_on_scheduler(add, 2, 3) == 5
    with pytest.raises(ZeroDivisionError):
        await client.run_on_scheduler(lambda: 1 / 0)


def import_helper():
    import importlib

    # (By name: the module exists only where it was uploaded.)
    return importlib.import_module("trioflow_upload_helper").VALUE


@pytest.mark.processes
def test_upload_file_reaches_present_and_future_workers(tmp_path):
    """A module uploaded to the cluster is importable by tasks on every worker,
    including a worker process started afterwards; uploading it again replaces it."""
    module = tmp_path / "trioflow_upload_helper.py"
    module.write_text("VALUE = 1\n")
    with trioflow.LocalCluster(1, processes=True, nanny=False) as cluster, trioflow.Client(cluster) as client:
        with pytest.raises(ModuleNotFoundError):
            client.submit(import_helper, pure=False).result(timeout=30)
        client.upload_file(str(module))
        [first] = client.nthreads()
        assert client.submit(import_helper, pure=False).result(timeout=30) == 1
        cluster.add_worker()
        client.wait_for_workers(2, timeout=30)
        [second] = set(client.nthreads()) - {first}
        assert client.submit(import_helper, pure=False, workers=[second]).result(timeout=30) == 1
        module.write_text("VALUE = 2\n")
        client.upload_file(str(module))
        values = client.run(import_helper)
        assert values == {first: 2, second: 2}


@pytest.mark.parametrize("name", ["notes.txt", ".hidden.py", "a..b.py", "mod.pyc"])
async def test_upload_file_refuses_other_files(client, tmp_path, name):
    """Only plain .py, .zip and .egg names are sent; the error names the file."""
    path = tmp_path / name
    path.write_text("x = 1\n")
    with pytest.raises(ValueError, match="takes a .py, .zip or .egg file"):
        await client.upload_file(str(path))


async def test_upload_file_refuses_a_file_too_large(client, tmp_path, monkeypatch):
    """A file over MAX_UPLOAD_BYTES is refused before anything is sent."""
    monkeypatch.setattr(m, "MAX_UPLOAD_BYTES", 10)
    path = tmp_path / "big.py"
    path.write_text("x = '0123456789'\n")
    with pytest.raises(ValueError, match="big.py has 17 bytes; upload_file takes at most 10"):
        await client.upload_file(str(path))


async def test_a_worker_refuses_a_name_with_a_directory(cluster):
    """Even from its scheduler, a worker stores no file whose name has a path in it."""
    [worker, _] = cluster.workers.values()
    with pytest.raises(ValueError, match="refusing to store"):
        worker._store_upload("../evil.py", b"x = 1")
    assert worker.local_directory is None


def test_as_completed_batches_blocking():
    """batches() yields lists of done futures until all are yielded."""
    with trioflow.LocalCluster(2, processes=False) as cluster, trioflow.Client(cluster) as client:
        futures = client.map(inc, range(20))
        batches = list(trioflow.as_completed(futures).batches())
        assert all(batches) and sorted(f.key for b in batches for f in b) == sorted(f.key for f in futures)
        pairs = [p for b in trioflow.as_completed(client.map(inc, range(3)), with_results=True).batches() for p in b]
        assert sorted(result for _, result in pairs) == [1, 2, 3]


async def test_as_completed_batches_async(client):
    """With AsyncClient, batches() is an async iterator of lists."""
    futures = client.map(inc, range(10))
    seen = [f async for batch in trioflow.as_completed(futures).batches() for f in batch]
    assert sorted(f.key for f in seen) == sorted(f.key for f in futures)


def test_progress_draws_a_bar_to_the_end():
    """progress(futures) blocks until done and leaves a full bar (tqdm text bar)."""
    with trioflow.LocalCluster(2, processes=False) as cluster, trioflow.Client(cluster) as client:
        out = io.StringIO()
        futures = client.map(inc, range(5))
        failed = client.submit(add, "a", 1)
        trioflow.progress(futures, [failed], notebook=False, file=out)
        assert all(f.done() for f in futures) and failed.done()
        assert "6/6" in out.getvalue()


async def test_progress_uses_tqdm_auto_by_default(client, monkeypatch):
    """By default the bar comes from tqdm.auto (a widget in Jupyter, text elsewhere)."""
    import tqdm.auto

    made = []

    class Recorder(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            made.append(kwargs["total"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorder)
    await trioflow.progress(client.map(inc, range(3)), file=io.StringIO())
    assert made == [3]
