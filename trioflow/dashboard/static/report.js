// The performance report: draw the data embedded in this file.
"use strict";

(() => {
  const data = JSON.parse(document.getElementById("report-data").textContent);
  const { el, fmtBytes, fmtSeconds, fmtCount, fmtClock } = TF;
  const $ = (id) => document.getElementById(id);
  const c = data.counters;
  const runs = data.runs.map(([key, name, worker, start, stop, error]) => ({ key, name, worker, start, stop, error }));

  $("version").textContent = data.trioflow;
  $("span").textContent = `${new Date(data.start * 1000).toLocaleString()} · ${fmtSeconds(data.stop - data.start)}`;

  const computeS = runs.reduce((s, r) => s + (r.stop - r.start), 0);
  const cards = [
    ["runs", "Runs", fmtCount(c.runs_ok + c.runs_erred), `${fmtCount(c.runs_erred)} raised`],
    ["compute", "Compute time", fmtSeconds(computeS), `over ${fmtSeconds(data.stop - data.start)} of wall time`],
    ["workers", "Workers", fmtCount(data.workers), `${fmtCount(c.workers_joined)} joined during the block`],
    ["worker_deaths", "Worker deaths", fmtCount(c.worker_deaths), `${fmtCount(c.workers_retired)} left on purpose`, c.worker_deaths > 0],
    ["killed_worker", "KilledWorker", fmtCount(c.killed_worker), "tasks marked bad", c.killed_worker > 0],
    ["lost_data", "LostData", fmtCount(c.lost_data), "scattered values lost", c.lost_data > 0],
    ["recomputed", "Recomputed", fmtCount(c.recomputed), `${fmtCount(c.rescheduled)} runs rescheduled`],
    ["transfer_bytes", "Transferred", fmtBytes(c.transfer_bytes), "between workers"],
  ];
  $("counters").replaceChildren(...cards.map(([name, label, value, sub, alert]) =>
    el("div", { class: "card" + (alert ? " alert" : ""), "data-counter": name, "data-value": value },
      el("div", { class: "label" }, label), el("div", { class: "value" }, value), el("div", { class: "sub" }, sub))));

  const workers = [...new Set(runs.map((r) => r.worker))].sort().map((address) => ({ address, gone: false }));
  const deaths = data.events.filter((e) => e.kind === "worker-died" && e.worker).map((e) => ({ worker: e.worker, time: e.time }));
  const t0 = Math.min(data.start, ...runs.map((r) => r.start));
  const t1 = Math.max(data.stop, ...runs.map((r) => r.stop));
  let hitTest = null;
  const draw = () => {
    hitTest = TF.drawStream($("stream"), runs, t0, t1, { workers, deaths, relative: true });
  };
  draw();
  window.onresize = draw;
  TF.tooltips($("stream"), $("tooltip"), () => hitTest);
  TF.legend($("stream-legend"), runs);

  const body = $("functions").querySelector("tbody");
  body.replaceChildren(...(data.functions.length ? data.functions.map((f) => el("tr", { "data-name": f.name, "data-runs": f.runs, "data-errors": f.errors },
    el("td", { class: "mono" }, el("span", { class: "swatch", style: `display:inline-block;width:10px;height:10px;margin-right:6px;background:${TF.colour(f.name)}` }), f.name),
    el("td", {}, fmtCount(f.runs)),
    el("td", { style: f.errors ? "color:var(--bad);font-weight:600" : "" }, fmtCount(f.errors)),
    el("td", {}, fmtSeconds(f.seconds)),
    el("td", {}, fmtSeconds(f.seconds / f.runs)),
    el("td", {}, fmtSeconds(f.max_s)))) : [el("tr", {}, el("td", { colspan: 6, class: "empty" }, "no task ran during the block"))]));

  $("all-counters").querySelector("tbody").replaceChildren(...Object.entries(data.counters_help).map(([name, help]) =>
    el("tr", { "data-counter": name },
      el("td", { class: "help" }, help),
      el("td", {}, name.endsWith("bytes") ? fmtBytes(c[name]) : fmtCount(c[name])))));

  $("events").replaceChildren(...(data.events.length ? data.events.map((e) => el("li", { "data-kind": e.kind },
    el("time", {}, fmtClock(e.time)),
    el("span", { class: "badge " + e.kind }, e.kind),
    el("span", { class: "text" }, e.text))) : [el("li", { class: "empty" }, "no worker joined or left, nothing was lost")]));
})();
