"""performance_report and the Perfetto export of a real cluster's task stream."""

import json
import re

import pytest

import trioflow
from trioflow.sim.trace import Trace


def inc(x):
    return x + 1


def boom(x):
    raise KeyError(x)


def report_data(path):
    """The data a report file embeds (what its page draws)."""
    html = path.read_text()
    match = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', html, re.S)
    assert match, "no embedded data"
    return html, json.loads(match.group(1))


def assert_self_contained(html):
    """Nothing is loaded from elsewhere: no external script, style sheet, image or font."""
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=", html)
    assert "http://" not in html and "https://" not in html.replace("https://ui.perfetto.dev", "")


async def test_an_async_report_holds_the_blocks_runs_and_counter_changes(client, tmp_path):
    """Only the block's runs, and the change of each counter over the block, in one self-contained file."""
    before = client.map(inc, range(3))
    await client.gather(before)
    path, trace = tmp_path / "report.html", tmp_path / "trace.json"
    async with trioflow.performance_report(path, client=client, perfetto=trace):
        futures = client.map(inc, range(10, 20))
        await client.gather(futures)
        failed = client.submit(boom, 1)
        with pytest.raises(KeyError):
            await failed
    html, data = report_data(path)
    assert_self_contained(html)
    assert "<title>trioflow performance report: report.html</title>" in html
    assert sorted(run[0] for run in data["runs"]) == sorted([f.key for f in futures] + [failed.key])
    assert data["counters"]["runs_ok"] == 10 and data["counters"]["runs_erred"] == 1
    assert data["counters"]["task_duration_seconds_count"] == 11
    functions = {f["name"]: f for f in data["functions"]}
    assert (functions["inc"]["runs"], functions["inc"]["errors"]) == (10, 0)
    assert (functions["boom"]["runs"], functions["boom"]["errors"]) == (1, 1)
    assert data["workers"] == 2 and data["tasks"]["erred"] == 1
    assert data["start"] <= min(run[3] for run in data["runs"]) and data["stop"] >= max(run[4] for run in data["runs"])
    (erred,) = [run for run in data["runs"] if run[5]]
    assert erred[5] == "KeyError: 1"
    rows = {e["args"]["name"] for e in json.loads(trace.read_text())["traceEvents"] if e["name"] == "thread_name"}
    assert rows == {w for w in {run[2] for run in data["runs"]}}


def test_a_blocking_report_uses_the_client_opened_last(tmp_path):
    """`with performance_report(path):` needs no client argument with a trioflow.Client open."""
    path = tmp_path / "sync-report.html"
    with trioflow.Client(n_workers=1, processes=False) as client:
        with trioflow.performance_report(path):
            assert client.gather(client.map(inc, range(5))) == list(range(1, 6))
    _, data = report_data(path)
    assert len(data["runs"]) == 5 and data["counters"]["runs_ok"] == 5
    with pytest.raises(ValueError, match="no trioflow.Client is open"):
        with trioflow.performance_report(tmp_path / "never.html"):
            pass
    assert not (tmp_path / "never.html").exists()


async def test_an_async_report_needs_its_client(tmp_path):
    """`async with performance_report(...)` without client= says what it needs."""
    with pytest.raises(ValueError, match="needs client=<an AsyncClient>"):
        async with trioflow.performance_report(tmp_path / "r.html"):
            pass


async def test_a_task_stream_exports_as_the_chaos_labs_trace_format(client, tmp_path):
    """write_perfetto_trace gives the same trace-event shapes as `trioflow chaos --trace`:
    named rows, `ran <key>` bars, ticks for events."""
    futures = client.map(inc, range(4))
    await client.gather(futures)
    failed = client.submit(boom, 2)
    with pytest.raises(KeyError):
        await failed
    stream = await client.get_task_stream()
    events = (await client.get_cluster_metrics())["events"]
    path = tmp_path / "run.json"
    trioflow.write_perfetto_trace(stream, path, events)
    real = json.loads(path.read_text())

    simulated = Trace()
    simulated.span("worker-0", "ran chain-1", 1.0, 0.5)
    simulated.at(2.0, "scheduler", "worker-0 left")
    lab = simulated.chrome_trace()
    assert set(real) == set(lab) == {"traceEvents", "displayTimeUnit"}
    for phase in ("M", "X", "i"):
        real_keys = {frozenset(e) for e in real["traceEvents"] if e["ph"] == phase}
        lab_keys = {frozenset(e) for e in lab["traceEvents"] if e["ph"] == phase}
        assert real_keys == lab_keys, phase

    bars = [e for e in real["traceEvents"] if e["ph"] == "X"]
    assert sorted(e["name"] for e in bars) == sorted(
        [f"ran {f.key}" for f in futures] + [f"ran {failed.key} (erred)"]
    )
    assert min(e["ts"] for e in real["traceEvents"] if e["ph"] != "M") == 0  # the first event starts the clock
    assert all(e["dur"] >= 0 for e in bars)
    rows = {e["args"]["name"] for e in real["traceEvents"] if e["name"] == "thread_name"}
    assert rows == {"scheduler"} | {run["worker"] for run in stream}
    ticks = [e["name"] for e in real["traceEvents"] if e["ph"] == "i"]
    assert ticks and all(t.startswith("worker-joined: ") for t in ticks)
    assert real["traceEvents"][0]["args"]["name"] == "trioflow cluster"


def test_a_stream_with_no_runs_makes_an_empty_trace(tmp_path):
    """Nothing ran: a valid trace with only its title."""
    path = tmp_path / "empty.json"
    trioflow.write_perfetto_trace([], path)
    assert json.loads(path.read_text())["traceEvents"] == [
        {"name": "process_name", "ph": "M", "pid": 1, "args": {"name": "trioflow cluster"}}
    ]
