// The task stream, drawn on a canvas: one row per worker thread ("lane"),
// one bar per run, coloured by function, errors in red; a worker that died
// gets a red line at the moment it died. Shared by the live page and the
// performance report, with a few helpers for formatting numbers.
"use strict";

const TF = (() => {
  // Categorical colours; red is kept for errors.
  const PALETTE = [
    "#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#edc948",
    "#9c755f", "#a0cbe8", "#ffbe7d", "#8cd17d", "#d4a6c8", "#86bcb6",
  ];
  const ERROR_FILL = "#e15759";
  const ERROR_EDGE = "#8e1b1b";
  const LANE_PX = 14;
  const WORKER_GAP_PX = 7;
  const LABEL_PX = 190;
  const AXIS_PX = 22;
  const MAX_LANES = 16;

  // Functions get the palette's colours in the order they first appear, so
  // the first twelve are all distinct (a hash would make some alike).
  const colours = new Map();
  function colour(name) {
    if (!colours.has(name)) colours.set(name, PALETTE[colours.size % PALETTE.length]);
    return colours.get(name);
  }

  function shortAddress(address) {
    return String(address).replace(/^[a-z]+:\/\//, "");
  }

  function fmtBytes(n) {
    if (n === null || n === undefined) return "—";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + units[i];
  }

  function fmtSeconds(s) {
    if (s === null || s === undefined) return "—";
    if (s === 0) return "0 s";
    if (s < 0.001) return (s * 1e6).toFixed(0) + " µs";
    if (s < 1) return (s * 1000).toFixed(s < 0.01 ? 2 : 1) + " ms";
    if (s < 120) return s.toFixed(s < 10 ? 2 : 1) + " s";
    if (s < 7200) return Math.floor(s / 60) + " min " + Math.floor(s % 60) + " s";
    return (s / 3600).toFixed(1) + " h";
  }

  function fmtCount(n) {
    return n === null || n === undefined ? "—" : Math.round(n).toLocaleString("en-US");
  }

  function fmtClock(epoch) {
    const d = new Date(epoch * 1000);
    return d.toTimeString().slice(0, 8);
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined) continue;
      if (k === "class") node.className = v;
      else if (k === "style") node.setAttribute("style", v);
      else node.setAttribute(k, v);
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  // Runs -> per worker, lanes of non-overlapping runs (like threads).
  function layout(runs, workerOrder) {
    const byWorker = new Map(workerOrder.map((w) => [w, []]));
    for (const run of runs) {
      if (!byWorker.has(run.worker)) byWorker.set(run.worker, []);
      byWorker.get(run.worker).push(run);
    }
    const rows = [];
    for (const [worker, list] of byWorker) {
      list.sort((a, b) => a.start - b.start);
      const ends = [];
      for (const run of list) {
        let lane = ends.findIndex((end) => end <= run.start + 1e-6);
        if (lane < 0) {
          lane = ends.length < MAX_LANES ? ends.length : MAX_LANES - 1;
          if (lane === ends.length) ends.push(0);
        }
        ends[lane] = Math.max(ends[lane], run.stop);
        run.lane = lane;
      }
      rows.push({ worker, runs: list, lanes: Math.max(1, ends.length) });
    }
    return rows;
  }

  // Draw `runs` ({key, name, worker, start, stop, error}) between t0 and t1.
  // opts.workers: [{address, gone}] in display order; opts.deaths: [{worker, time}].
  // Returns a hit-test function (x, y) -> run or null, for tooltips.
  function drawStream(canvas, runs, t0, t1, opts) {
    const workers = opts.workers || [];
    const gone = new Map(workers.map((w) => [w.address, !!w.gone]));
    const deathsIn = (opts.deaths || []).filter((d) => d.time >= t0 && d.time <= t1);
    for (const d of deathsIn) if (!gone.has(d.worker)) gone.set(d.worker, true);
    const order = [...gone.keys()];
    const rows = layout(runs, order);
    const width = canvas.clientWidth || canvas.parentElement.clientWidth || 1000;
    let height = AXIS_PX + 4;
    for (const row of rows) height += row.lanes * LANE_PX + WORKER_GAP_PX;
    height = Math.max(height, 90);
    const dpr = window.devicePixelRatio || 1;
    canvas.width = Math.round(width * dpr);
    canvas.height = Math.round(height * dpr);
    canvas.style.height = height + "px";
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, width, height);
    ctx.font = "12px system-ui, sans-serif";
    ctx.textBaseline = "middle";

    const plotX = LABEL_PX;
    const plotW = Math.max(50, width - LABEL_PX - 8);
    const span = Math.max(t1 - t0, 1e-3);
    const xOf = (t) => plotX + ((t - t0) / span) * plotW;
    const boxes = [];

    // Time axis: about 8 ticks at round intervals.
    const steps = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600];
    const step = steps.find((s) => span / s <= 8) || 3600;
    ctx.strokeStyle = "#eef1f4";
    ctx.fillStyle = "#6b7785";
    ctx.textAlign = "center";
    const axisY = height - AXIS_PX / 2;
    // Round times of day on the live page; round offsets from t0 in a report.
    const first = opts.relative ? t0 : Math.ceil(t0 / step) * step;
    for (let t = first; t <= t1 + 1e-9; t += step) {
      const x = xOf(t);
      ctx.beginPath();
      ctx.moveTo(x, 0);
      ctx.lineTo(x, height - AXIS_PX);
      ctx.stroke();
      const label = opts.relative ? TF.fmtSeconds(t - t0) : (step >= 1 ? fmtClock(t) : fmtClock(t) + "." + String(Math.round((t % 1) * 1000)).padStart(3, "0"));
      ctx.fillText(label, x, axisY);
    }

    let y = 2;
    ctx.textAlign = "left";
    for (const row of rows) {
      const rowH = row.lanes * LANE_PX;
      const isGone = gone.get(row.worker);
      ctx.fillStyle = "#f7f9fb";
      ctx.fillRect(plotX, y, plotW, rowH);
      ctx.fillStyle = isGone ? "#9aa5b1" : "#1f2933";
      const label = shortAddress(row.worker) + (isGone ? "  (gone)" : "");
      ctx.fillText(label, 8, y + Math.min(rowH, LANE_PX) / 2 + 1, LABEL_PX - 14);
      if (row.lanes > 1) {
        ctx.fillStyle = "#9aa5b1";
        ctx.fillText(row.lanes + " lanes", 8, y + LANE_PX * 1.5 + 1, LABEL_PX - 14);
      }
      for (const run of row.runs) {
        if (run.stop < t0 || run.start > t1) continue;
        const x0 = Math.max(plotX, xOf(run.start));
        const x1 = Math.min(plotX + plotW, xOf(run.stop));
        const w = Math.max(run.error ? 3 : 1.5, x1 - x0);  // a failure must stay visible
        const top = y + run.lane * LANE_PX + 1;
        ctx.fillStyle = run.error ? ERROR_FILL : colour(run.name);
        ctx.fillRect(x0, top, w, LANE_PX - 2);
        if (run.error) {
          ctx.strokeStyle = ERROR_EDGE;
          ctx.lineWidth = 1;
          ctx.strokeRect(x0 + 0.5, top + 0.5, Math.max(0.5, w - 1), LANE_PX - 3);
        }
        boxes.push([x0, top, w, LANE_PX - 2, run]);
      }
      for (const d of deathsIn) {
        if (d.worker !== row.worker) continue;
        const x = xOf(d.time);
        ctx.strokeStyle = "#c0392b";
        ctx.lineWidth = 2;
        ctx.beginPath();
        ctx.moveTo(x, y - 2);
        ctx.lineTo(x, y + rowH + 2);
        ctx.stroke();
        ctx.fillStyle = "#c0392b";
        ctx.font = "bold 11px system-ui, sans-serif";
        ctx.fillText("✕ died", x + 4, y + LANE_PX / 2 + 1);
        ctx.font = "12px system-ui, sans-serif";
        ctx.lineWidth = 1;
      }
      y += rowH + WORKER_GAP_PX;
    }
    if (!rows.length) {
      ctx.fillStyle = "#6b7785";
      ctx.fillText("no task has run in this window", plotX, 30);
    }
    return (px, py) => {
      for (let i = boxes.length - 1; i >= 0; i--) {
        const [bx, by, bw, bh, run] = boxes[i];
        if (px >= bx - 1 && px <= bx + bw + 1 && py >= by && py <= by + bh) return run;
      }
      return null;
    };
  }

  // The legend: each function's colour, runs and errors; then errors in all.
  function legend(list, runs) {
    const byName = new Map();
    let errors = 0;
    for (const run of runs) {
      const entry = byName.get(run.name) || { runs: 0, errors: 0 };
      entry.runs++;
      if (run.error) { entry.errors++; errors++; }
      byName.set(run.name, entry);
    }
    const items = [...byName.entries()].sort((a, b) => b[1].runs - a[1].runs).slice(0, 24);
    list.replaceChildren(
      ...items.map(([name, e]) =>
        el("li", { "data-name": name, "data-runs": e.runs, "data-errors": e.errors },
          el("span", { class: "swatch", style: "background:" + colour(name) }),
          el("span", { class: "mono" }, name),
          el("span", { class: "count" }, fmtCount(e.runs) + (e.errors ? ", " + fmtCount(e.errors) + " failed" : "")))),
      el("li", { class: errors ? "errors" : "", "data-errors-total": errors },
        el("span", { class: "swatch", style: "background:" + ERROR_FILL + ";outline:1px solid " + ERROR_EDGE }),
        el("span", {}, "error"),
        el("span", { class: "count" }, fmtCount(errors))),
    );
  }

  // Show a run's details while the pointer is over its bar.
  function tooltips(canvas, tip, hitTest) {
    canvas.onmousemove = (event) => {
      const rect = canvas.getBoundingClientRect();
      const run = hitTest() && hitTest()(event.clientX - rect.left, event.clientY - rect.top);
      if (!run) { tip.style.display = "none"; return; }
      tip.replaceChildren(
        el("div", { class: "mono" }, run.key),
        el("div", {}, shortAddress(run.worker) + " · " + fmtSeconds(run.stop - run.start) + " · " + fmtClock(run.start)),
        run.error ? el("div", { style: "color:#ffb4a8" }, run.error) : null,
      );
      tip.style.left = event.clientX + 12 + "px";
      tip.style.top = event.clientY + 12 + "px";
      tip.style.display = "block";
    };
    canvas.onmouseleave = () => { tip.style.display = "none"; };
  }

  return { colour, shortAddress, fmtBytes, fmtSeconds, fmtCount, fmtClock, el, drawStream, legend, tooltips };
})();
