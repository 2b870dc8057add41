// The live page: poll /api/state twice a second, keep the runs and events
// it has not seen yet, and redraw. A token in the page's URL (?token=...)
// is sent with every poll as an Authorization header.
"use strict";

(() => {
  const POLL_MS = 500;
  const KEEP_S = 300;
  const MAX_RUNS = 50000;
  const MAX_EVENTS = 500;
  const SHOWN_EVENTS = 200;
  const STATE_COLOURS = {
    released: "#bab0ac", waiting: "#edc948", queued: "#b07aa1", "no-worker": "#ff9da7",
    processing: "#4e79a7", memory: "#59a14f", erred: "#e15759", lost: "#8e1b1b",
  };

  const token = new URLSearchParams(location.search).get("token");
  const headers = token ? { Authorization: "Bearer " + token } : {};
  const $ = (id) => document.getElementById(id);
  const { el, fmtBytes, fmtSeconds, fmtCount, fmtClock, shortAddress } = TF;

  let runsAfter = 0;
  let eventsAfter = 0;
  let runs = [];
  let events = [];
  let state = null;
  let lastOk = 0;
  let hitTest = null;

  async function poll() {
    try {
      const response = await fetch(`api/state?runs_after=${runsAfter}&events_after=${eventsAfter}`, {
        headers, cache: "no-store",
      });
      const body = await response.json().catch(() => ({}));
      if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
      absorb(body);
      lastOk = Date.now();
      render();
    } catch (error) {
      setStatus("down", "no answer from the scheduler: " + error.message);
    } finally {
      setTimeout(poll, POLL_MS);
    }
  }

  function absorb(s) {
    if (s.runs_newest < runsAfter || s.events_newest < eventsAfter) {
      // A new scheduler numbers from 1 again: start over.
      runs = []; events = []; runsAfter = 0; eventsAfter = 0;
      return;
    }
    for (const [seq, key, name, worker, start, stop, error] of s.runs) {
      runs.push({ seq, key, name, worker, start, stop, error });
    }
    runsAfter = s.runs_newest;
    events.push(...s.events);
    eventsAfter = s.events_newest;
    const oldest = s.now - KEEP_S;
    if (runs.length && (runs[0].stop < oldest || runs.length > MAX_RUNS)) {
      runs = runs.filter((r) => r.stop >= oldest).slice(-MAX_RUNS);
    }
    if (events.length > MAX_EVENTS) events = events.slice(-MAX_EVENTS);
    state = s;
  }

  function setStatus(kind, text) {
    $("status").className = "meta " + kind;
    $("status-text").textContent = text;
  }

  function card(name, value, sub, alert) {
    const node = document.querySelector(`.card[data-counter="${name}"]`);
    node.querySelector(".value").textContent = value;
    if (sub !== undefined) node.querySelector(".sub").textContent = sub;
    node.classList.toggle("alert", !!alert);
    node.dataset.value = String(value).replace(/,/g, "");
  }

  function render() {
    const s = state;
    if (!s) return;
    setStatus("live", "live · " + fmtClock(s.now));
    $("address").textContent = s.scheduler.address;
    $("uptime").textContent = fmtSeconds(s.scheduler.uptime);
    $("clients").textContent = s.scheduler.clients;
    $("loop-lag").textContent = fmtSeconds(s.scheduler.loop_lag);

    const c = s.counters;
    const threads = s.workers.reduce((n, w) => n + w.nthreads, 0);
    card("workers", s.workers.length, `${threads} threads`);
    card("processing", fmtCount(s.tasks.processing), `${fmtCount(s.tasks.queued + s.tasks.waiting)} waiting or queued`);
    card("memory", fmtCount(s.tasks.memory), "results held");
    card("runs", fmtCount(c.runs_ok + c.runs_erred), `${fmtCount(c.runs_erred)} raised`);
    card("erred", fmtCount(s.tasks.erred), "failed, kept for clients", s.tasks.erred > 0);
    card("worker_deaths", fmtCount(c.worker_deaths), `${fmtCount(c.workers_retired)} left on purpose`, c.worker_deaths > 0);
    card("killed_worker", fmtCount(c.killed_worker), "tasks marked bad", c.killed_worker > 0);
    card("lost_data", fmtCount(c.lost_data), "scattered values lost", c.lost_data > 0);
    card("recomputed", fmtCount(c.recomputed), `${fmtCount(c.rescheduled)} runs rescheduled`);

    renderWorkers(s);
    renderStates(s);
    renderStream();
    renderEvents();
  }

  function renderWorkers(s) {
    const body = $("workers").querySelector("tbody");
    if (!s.workers.length) {
      body.replaceChildren(el("tr", {}, el("td", { colspan: 10, class: "empty" }, "no worker is registered")));
    } else {
      body.replaceChildren(...s.workers.map((w) => el("tr", { "data-address": w.address },
        el("td", { class: "mono", "data-field": "address" }, shortAddress(w.address)),
        el("td", { "data-field": "pid" }, w.pid === null ? "—" : w.pid),
        el("td", { "data-field": "nthreads" }, w.nthreads),
        el("td", { "data-field": "processing" }, fmtCount(w.processing)),
        el("td", { "data-field": "executing" }, w.executing === null ? "—" : fmtCount(w.executing)),
        el("td", { "data-field": "keys" }, fmtCount(w.keys)),
        el("td", { "data-field": "memory" }, fmtBytes(w.memory) + (w.paused ? " (paused)" : "")),
        el("td", { "data-field": "spilled" }, w.spilled === null ? "—" : fmtBytes(w.spilled)),
        age(w.heartbeat_age, "heartbeat_age"),
        age(w.seen_age, "seen_age"))));
    }
    const nanny = s.workers.filter((w) => w.nanny).length;
    $("workers-hint").textContent = s.workers.length ? `${nanny} of ${s.workers.length} under a nanny` : "";
  }

  function age(seconds, field) {
    const text = seconds === null ? "never" : fmtSeconds(seconds) + " ago";
    return el("td", { "data-field": field, class: seconds !== null && seconds > 2 ? "stale-age" : "" }, text);
  }

  function renderStates(s) {
    const max = Math.max(1, ...Object.values(s.tasks));
    $("task-states").replaceChildren(...Object.entries(s.tasks).flatMap(([name, n]) => [
      el("div", { class: "name" }, name),
      el("div", { class: "bar" }, el("span", { style: `width:${(100 * n) / max}%;background:${STATE_COLOURS[name] || "#888"}` })),
      el("div", { class: "count", "data-state": name }, fmtCount(n)),
    ]));
  }

  function renderStream() {
    const s = state;
    const windowS = Number($("window").value);
    const t1 = s.now;
    // A scheduler younger than the window: show its whole life, not empty space.
    const t0 = Math.max(t1 - windowS, Math.min(t1 - s.scheduler.uptime - 0.5, t1 - 5));
    const shown = runs.filter((r) => r.stop >= t0);
    const live = s.workers.map((w) => ({ address: w.address, gone: false }));
    const liveSet = new Set(live.map((w) => w.address));
    const goneSet = new Set(shown.map((r) => r.worker).filter((a) => !liveSet.has(a)));
    const deaths = events.filter((e) => e.kind === "worker-died" && e.worker).map((e) => ({ worker: e.worker, time: e.time }));
    for (const d of deaths) if (d.time >= t0 && !liveSet.has(d.worker)) goneSet.add(d.worker);
    const workers = [...live, ...[...goneSet].sort().map((address) => ({ address, gone: true }))];
    const draw = TF.drawStream($("stream"), shown, t0, t1, { workers, deaths });
    hitTest = draw;
    TF.legend($("stream-legend"), shown);
  }

  function renderEvents() {
    const list = $("events");
    if (!events.length) {
      list.replaceChildren(el("li", { class: "empty" }, "nothing has happened yet"));
      return;
    }
    list.replaceChildren(...events.slice(-SHOWN_EVENTS).reverse().map((e) => el("li", { "data-kind": e.kind, "data-worker": e.worker },
      el("time", {}, fmtClock(e.time)),
      el("span", { class: "badge " + e.kind }, e.kind),
      el("span", { class: "text" }, e.text))));
  }

  setInterval(() => {
    if (lastOk && Date.now() - lastOk > 3000 && $("status").classList.contains("live")) {
      setStatus("stale", "last update " + Math.round((Date.now() - lastOk) / 1000) + " s ago");
    }
  }, 1000);
  $("window").onchange = () => state && renderStream();
  window.onresize = () => state && renderStream();
  TF.tooltips($("stream"), $("tooltip"), () => hitTest);
  poll();
})();
