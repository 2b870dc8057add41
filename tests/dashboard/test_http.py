"""The dashboard over HTTP: its JSON, its Prometheus metrics, its checks and its errors
(a scheduler serving it in this process, workers as Trio tasks, real sockets)."""

import socket
import sys
import time

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

import trioflow
from tests.dashboard.helpers import get, get_json
from trioflow.dashboard import DashboardError, serve_dashboard
from trioflow.dashboard.auth import DashboardRequest, Refusal, default_checks, loopback_host_check, token_check


def inc(x):
    return x + 1


def boom(x):
    raise ValueError(f"bad {x}")


@pytest.fixture
async def dashboard():
    """A cluster of two in-process workers whose scheduler serves a dashboard on a free port."""
    async with trioflow.AsyncLocalCluster(2, processes=False, dashboard_port=0) as cluster:
        async with trioflow.AsyncClient(cluster) as client:
            yield cluster, client, cluster.scheduler.dashboard_address


async def test_the_page_and_its_state_show_the_cluster(dashboard):
    """/ is the page (its script allowed by hash only); /api/state has the workers, tasks, runs and events."""
    cluster, client, url = dashboard
    assert url.startswith("http://127.0.0.1:") and url.endswith("/")
    assert (await client.scheduler_info())["dashboard"] == url
    futures = client.map(inc, range(5))
    await client.gather(futures)
    status, headers, body = await get(url)
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'id="workers"' in body and b"TF.drawStream" in body
    assert "script-src 'sha256-" in headers["Content-Security-Policy"] and headers["Cache-Control"] == "no-store"
    status, state = await get_json(url + "api/state")
    assert status == 200
    assert {w["address"] for w in state["workers"]} == set(cluster.scheduler.state.workers)
    assert all(w["nthreads"] == 1 and w["processing"] == 0 and w["pid"] is None for w in state["workers"])
    assert all(w["seen_age"] >= 0 and (w["heartbeat_age"] is None or w["heartbeat_age"] >= 0) for w in state["workers"])
    # No memory limit here: nothing spilled, nobody paused.
    assert all(w["spilled"] is None and w["paused"] is False for w in state["workers"])
    assert state["tasks"]["memory"] == 5 and set(state["tasks"]) >= {"waiting", "processing", "erred"}
    assert [run[2] for run in state["runs"]] == ["inc"] * 5 and state["runs_newest"] == 5
    assert [e["kind"] for e in state["events"]] == ["worker-joined", "worker-joined"]
    assert state["counters"]["runs_ok"] == 5 and state["scheduler"]["address"] == cluster.scheduler_address
    # Polling on: only what is new.
    status, again = await get_json(url + f"api/state?runs_after={state['runs_newest']}&events_after=2")
    assert again["runs"] == [] and again["events"] == [] and again["runs_newest"] == 5


async def test_metrics_are_prometheus_text_with_every_family(dashboard):
    """/metrics parses as Prometheus text and counts what happened: runs by status, durations, tasks, workers."""
    cluster, client, url = dashboard
    futures = client.map(inc, range(4))
    await client.gather(futures)
    failed = client.submit(boom, 1)
    with pytest.raises(ValueError):
        await failed
    status, headers, body = await get(url + "metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    for name in (
        "trioflow_tasks", "trioflow_workers", "trioflow_worker_threads", "trioflow_worker_processing_tasks",
        "trioflow_worker_memory_bytes", "trioflow_clients", "trioflow_task_runs", "trioflow_task_duration_seconds",
        "trioflow_result_bytes", "trioflow_transfer_bytes", "trioflow_workers_joined", "trioflow_worker_deaths",
        "trioflow_workers_retired", "trioflow_killed_worker", "trioflow_lost_data", "trioflow_recomputations",
        "trioflow_rescheduled_runs", "trioflow_restarts", "trioflow_event_loop_lag_seconds",
        "trioflow_event_loop_last_lag_seconds", "trioflow_worker_spilled_bytes", "trioflow_steal_requests",
        "trioflow_stolen",
    ):
        assert name in families, name

    def value(family, sample_name, **labels):
        (sample,) = [s for s in families[family].samples if s.name == sample_name and s.labels == labels]
        return sample.value

    assert value("trioflow_task_runs", "trioflow_task_runs_total", status="ok") == 4
    assert value("trioflow_task_runs", "trioflow_task_runs_total", status="error") == 1
    assert value("trioflow_task_duration_seconds", "trioflow_task_duration_seconds_count") == 5
    assert value("trioflow_task_duration_seconds", "trioflow_task_duration_seconds_bucket", le="+Inf") == 5
    assert value("trioflow_tasks", "trioflow_tasks", state="memory") == 4
    assert value("trioflow_tasks", "trioflow_tasks", state="erred") == 1
    assert value("trioflow_workers", "trioflow_workers") == 2
    assert value("trioflow_workers_joined", "trioflow_workers_joined_total") == 2
    assert value("trioflow_event_loop_lag_seconds", "trioflow_event_loop_lag_seconds_count") >= 0


async def test_the_event_loop_lag_is_measured(dashboard):
    """A loop blocked for 1 s shows in the lag histogram: a wake-up at least
    half a second late (the ticks after it are on time again)."""
    cluster, client, url = dashboard
    recorder = cluster.scheduler.recorder
    seen, total = recorder.loop_lag.count, recorder.loop_lag.sum
    time.sleep(1.0)  # this test runs in the scheduler's own loop: block it
    with trio.fail_after(5):
        while recorder.loop_lag.count == seen:
            await trio.sleep(0.05)
    assert recorder.loop_lag.sum - total >= 0.45


@pytest.mark.parametrize(
    "path, method, status, problem",
    [
        ("nowhere", "GET", 404, "no such page: /nowhere"),
        ("api/state", "POST", 405, "POST is not allowed: the dashboard is read-only"),
        ("api/state?runs_after=abc", "GET", 400, "query parameter 'runs_after' must be an integer"),
        ("api/state?runs_after=-1", "GET", 400, "query parameter 'runs_after' must be an integer"),
        ("api/state?frobnicate=1", "GET", 400, "unknown query parameter 'frobnicate'"),
        ("api/state?events_after=1&events_after=2", "GET", 400, "query parameter 'events_after' given twice"),
    ],
)
async def test_bad_requests_get_a_clear_error(dashboard, path, method, status, problem):
    """An unknown path, another method, a bad query: a JSON error saying what was wrong; the server serves on."""
    cluster, client, url = dashboard
    got, body = await get_json(url + path, method=method)
    assert got == status and body["error"].startswith(problem), body
    assert (await get(url + "health"))[0] == 200


async def test_a_token_guards_every_route():
    """With dashboard_token set, no route answers without it; the header or the query parameter opens them."""
    config = trioflow.Config(dashboard_port=0, dashboard_token="s3cret")
    async with trioflow.AsyncLocalCluster(1, processes=False, config=config) as cluster:
        url = cluster.dashboard_link
        assert "?token=" not in url  # (a token of its own: the link does not carry it)
        for path in ("", "api/state", "metrics", "health", "nowhere"):
            status, headers, body = await get(url + path, authorize=False)
            assert status == 401 and b"needs a token" in body, path
            assert headers["WWW-Authenticate"].startswith("Bearer")
        assert (await get(url + "api/state?token=wrong", authorize=False))[0] == 401
        assert (await get(url + "metrics", headers={"Authorization": "Bearer s3cret"}))[0] == 200
        assert (await get(url + "?token=s3cret", authorize=False))[0] == 200
        assert (await get(url + "api/state?token=s3cret&runs_after=0", authorize=False))[0] == 200


async def test_without_its_own_token_the_dashboard_takes_the_client_token(dashboard):
    """With authentication on and no dashboard_token, the clients' token opens the
    dashboard (it is in the cluster's link) and nothing else does."""
    cluster, client, url = dashboard
    assert (await get(url + "api/state", authorize=False))[0] == 401
    assert (await get(url + "api/state", headers={"Authorization": "Bearer trioflow-client-v1:AAAA"}))[0] == 401
    assert (await get(url + "api/state"))[0] == 200
    link = cluster.dashboard_link
    assert link.startswith(url + "?token=trioflow-client-v1")
    assert (await get(link, authorize=False))[0] == 200


async def test_a_loopback_dashboard_answers_only_loopback_host_names(dashboard):
    """A request naming another host (a DNS-rebinding page) is refused with 403."""
    cluster, client, url = dashboard
    status, body = await get_json(url + "api/state", headers={"Host": "attacker.example:80"})
    assert status == 403 and "answers only requests for a loopback host" in body["error"]
    port = url.rsplit(":", 1)[1].rstrip("/")
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "[::1]:" + port):
        assert (await get(url + "health", headers={"Host": host}))[0] == 200, host


async def test_a_check_hook_plugs_in_in_place_of_the_token(nursery):
    """Scheduler(dashboard_check=...) decides every request (the hook cluster authentication will use)."""
    seen = []

    def team_only(request: DashboardRequest):
        seen.append(request.path)
        return None if request.headers.get("x-team") == "ops" else Refusal(403, "ops only")

    config = trioflow.Config(dashboard_port=0, dashboard_token="ignored-when-a-hook-is-given")
    scheduler = trioflow.Scheduler(config=config, dashboard_check=team_only)
    await nursery.start(scheduler.serve)
    url = scheduler.dashboard_address
    status, body = await get_json(url + "api/state")
    assert (status, body) == (403, {"error": "ops only"})
    assert (await get(url + "api/state", headers={"X-Team": "ops"}))[0] == 200
    assert seen == ["/api/state", "/api/state"]
    nursery.cancel_scope.cancel()


def test_the_checks_in_place_follow_the_config():
    """Loopback binding adds the Host check; a token adds the token check; a given check replaces the token's."""
    request = DashboardRequest(path="/", query={"token": ["t"]}, headers={"host": "localhost:1"})
    assert default_checks("", "0.0.0.0") == []
    assert default_checks("", "127.0.0.1") == [loopback_host_check]
    [host, token] = default_checks("t", "::1")
    assert host is loopback_host_check and token(request) is None
    custom = lambda request: None  # noqa: E731 - the shape of a hook
    assert default_checks("t", "10.0.0.1", check=custom) == [custom]
    with pytest.raises(ValueError, match="must not be empty"):
        token_check("")


async def test_a_taken_port_is_a_clear_error(nursery):
    """A dashboard port already in use raises DashboardError naming the port."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        scheduler = trioflow.Scheduler(config=trioflow.Config(dashboard_port=port))
        with pytest.raises(DashboardError, match=f"cannot serve the dashboard on 127.0.0.1:{port}: address already in use"):
            await nursery.start(serve_dashboard, scheduler)


async def test_without_the_extra_the_error_says_what_to_install(nursery, monkeypatch):
    """If hypercorn is missing, starting the dashboard says: pip install 'trioflow[dashboard]'."""
    monkeypatch.setitem(sys.modules, "hypercorn", None)
    scheduler = trioflow.Scheduler(config=trioflow.Config(dashboard_port=0))
    with pytest.raises(DashboardError, match=r"pip install 'trioflow\[dashboard\]'.*'hypercorn' is missing"):
        await nursery.start(serve_dashboard, scheduler)


def test_a_bad_dashboard_port_is_a_config_error():
    """A port outside 0..65535 is refused by Config, naming the field."""
    with pytest.raises(trioflow.ConfigError, match="dashboard_port must be a port number between 0 and 65535"):
        trioflow.LocalCluster(1, processes=False, dashboard_port=70000)
