"""The live page in a real browser.

Headless Chromium (Debian's ``chromium``) loads the page of a scheduler
process while its worker processes run a workload and one of them has just
been SIGKILLed; the test reads the DOM the page's script rendered, keeps a
screenshot in its temporary directory, and opens the performance report of
the same run the same way. It skips only where no Chromium is installed
(``.ci/run`` installs it).
"""

import html.parser
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import time
import urllib.parse
import uuid

import pytest

import trioflow
from tests.cluster.conftest import free_port
from tests.dashboard.helpers import fetch, session_client_token

pytestmark = pytest.mark.processes

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
BROWSER_FLAGS = [
    "--headless",
    "--no-sandbox",  # tests run as root in CI
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--mute-audio",
]
# Virtual milliseconds the page runs before the DOM is dumped: several polls.
PAGE_TIME_MS = 3000
BROWSER_TIMEOUT_S = 90


def slow(x):
    time.sleep(0.02)
    return x + 1


def fails(x):
    raise ValueError(f"bad input {x}")


def browser_or_skip() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium on this machine: install it with `apt-get install -y chromium` (.ci/run does)")


def run_browser(browser: str, tmp_path, *args: str) -> str:
    """Run one headless Chromium to the end and return what it printed.

    Chromium starts helper processes; its whole process group is killed
    afterwards, whatever happened.
    """
    profile = tmp_path / f"profile-{uuid.uuid4().hex[:8]}"
    process = subprocess.Popen(
        [browser, *BROWSER_FLAGS, f"--user-data-dir={profile}", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=BROWSER_TIMEOUT_S)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
    assert process.returncode == 0, f"chromium exited with {process.returncode}:\n{err[-3000:]}"
    return out


class Element:
    def __init__(self, tag: str, attrs: dict[str, str]):
        self.tag, self.attrs, self.text = tag, attrs, ""

    def __repr__(self) -> str:
        return f"<{self.tag} {self.attrs}>{self.text[:80]!r}"


class Dom(html.parser.HTMLParser):
    """The elements of a dumped DOM, each with its attributes and all the text inside it."""

    VOID = {"meta", "link", "br", "img", "input", "hr", "col", "source", "wbr"}

    def __init__(self, text: str):
        super().__init__()
        self.elements: list[Element] = []
        self._open: list[Element] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        element = Element(tag, {name: value or "" for name, value in attrs})
        self.elements.append(element)
        if tag not in self.VOID:
            self._open.append(element)

    def handle_endtag(self, tag):
        for i in range(len(self._open) - 1, -1, -1):
            if self._open[i].tag == tag:
                del self._open[i:]
                break

    def handle_data(self, data):
        for element in self._open:
            element.text += data

    def find(self, tag: str | None = None, **attrs: str) -> list[Element]:
        """Elements with this tag whose attributes (data_x means data-x) have these values ("" for any)."""
        wanted = {name.replace("_", "-"): value for name, value in attrs.items()}
        return [
            e for e in self.elements
            if (tag is None or e.tag == tag)
            and all(name in e.attrs and (value == "" or e.attrs[name] == value) for name, value in wanted.items())
        ]

    def one(self, tag: str | None = None, **attrs: str) -> Element:
        found = self.find(tag, **attrs)
        assert len(found) == 1, f"expected one <{tag} {attrs}>, found {found}"
        return found[0]


def number(text: str) -> int:
    return int(text.strip().replace(",", ""))


def poll(predicate, timeout=30.0, message="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {message}")


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_the_live_page_shows_the_workers_the_kill_and_the_task_counts(spawn, tmp_path):
    """While a live cluster works and one worker was just SIGKILLed, Chromium renders
    the workers (threads, pids), the death with its reason, the tasks by state, the
    counters and the task stream's legend; the report of the run renders too."""
    browser = browser_or_skip()
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = spawn("scheduler", "--port", port, "--dashboard-port", 0)
    url = re.search(r"http://127\.0\.0\.1:\d+/", scheduler.wait_for_line("trioflow dashboard at")).group(0)
    for _ in range(2):
        spawn("worker", address, "--nthreads", 2)  # each under its nanny, which restarts it

    def events(kind):
        state = json.loads(fetch(url + "api/state")[2])
        return [e for e in state["events"] if e["kind"] == kind]

    report = tmp_path / "report.html"
    with trioflow.Client(address) as client:
        client.wait_for_workers(2, timeout=30)
        with trioflow.performance_report(report):
            failed = client.map(fails, range(3))
            poll(lambda: all(f.done() for f in failed), message="the failing tasks to fail")
            work = client.map(slow, range(300))
            poll(lambda: sum(f.done() for f in work) >= 60, message="a fifth of the work")
            workers = client.scheduler_info()["workers"]
            victim = max(workers, key=lambda a: workers[a]["processing"])
            os.kill(workers[victim]["pid"], signal.SIGKILL)
            poll(lambda: [e for e in events("worker-died") if e["worker"] == victim], message="the death on /api/state")
            live = poll(
                lambda: (w := client.scheduler_info()["workers"]) and len(w) == 2 and victim not in w and w,
                message="the nanny's new worker",
            )
            busy = client.map(slow, range(1000, 1200))  # the cluster is at work while the page loads
            done = sum(f.done() for f in work)  # runs the page must count, at least
            # As a person opens it: the clients' token in the URL.
            page_url = f"{url}?token={urllib.parse.quote(session_client_token())}"
            page = Dom(run_browser(browser, tmp_path, f"--virtual-time-budget={PAGE_TIME_MS}", "--dump-dom", page_url))
            screenshot = tmp_path / "page.png"
            run_browser(
                browser, tmp_path, f"--virtual-time-budget={PAGE_TIME_MS}", "--window-size=1400,1000",
                f"--screenshot={screenshot}", page_url,
            )
            assert client.gather(work) == [x + 1 for x in range(300)]
            assert client.gather(busy) == [x + 1 for x in range(1000, 1200)]
            with pytest.raises(ValueError, match="bad input 0"):
                failed[0].result(timeout=30)

    # The page is live and shows every worker, with its threads and process.
    assert page.one(id="status-text").text.startswith("live")
    rows = page.find("tr", data_address="")
    assert {row.attrs["data-address"] for row in rows} == set(live)
    for row in rows:
        cells = {e.attrs["data-field"]: e.text for e in page.elements if e in _inside(page, row, "td")}
        assert cells["nthreads"] == "2" and number(cells["pid"]) == live[row.attrs["data-address"]]["pid"]
    # The kill, with its reason, and the runs it sent elsewhere.
    (died,) = page.find("li", data_kind="worker-died", data_worker=victim)
    assert "died: connection closed" in died.text
    assert page.find("li", data_kind="rescheduled", data_worker=victim)
    assert len(page.find("li", data_kind="worker-joined")) == 3
    # Task counts: by state (every task held is in one state; the counts add
    # up whatever the workload was doing), and the counters.
    counts = {e.attrs["data-state"]: number(e.text) for e in page.find(data_state="")}
    assert set(counts) == {"released", "waiting", "queued", "no-worker", "processing", "memory", "erred", "lost"}
    assert sum(counts.values()) == 3 + 300 + 200 and counts["erred"] == 3 and counts["memory"] > 0
    assert number(page.one("div", data_counter="worker_deaths").attrs["data-value"]) == 1
    assert number(page.one("div", data_counter="runs").attrs["data-value"]) >= done + 3
    assert number(page.one("div", data_counter="workers").attrs["data-value"]) == 2
    # The task stream's legend: each function with its runs; the errors.
    assert number(page.one("li", data_name="slow").attrs["data-runs"]) >= done
    assert page.one("li", data_name="fails").attrs["data-errors"] == "3"
    assert page.one("li", data_errors_total="").attrs["data-errors-total"] == "3"
    assert png_size(screenshot) == (1400, 1000) and screenshot.stat().st_size > 20_000

    # The performance report of the same block, rendered by the same browser.
    rendered = Dom(run_browser(browser, tmp_path, "--dump-dom", report.as_uri()))
    assert number(rendered.one("tr", data_name="slow").attrs["data-runs"]) >= 300
    assert rendered.one("tr", data_name="fails").attrs["data-errors"] == "3"
    assert rendered.one("div", data_counter="worker_deaths").attrs["data-value"] == "1"
    assert rendered.find("li", data_kind="worker-died")


def _inside(page: Dom, parent: Element, tag: str) -> list[Element]:
    """The `tag` elements that come after `parent` and before the next element of its kind."""
    start = page.elements.index(parent)
    out = []
    for element in page.elements[start + 1 :]:
        if element.tag == parent.tag:
            break
        if element.tag == tag:
            out.append(element)
    return out
