// edgedeploy console: what moves on the server-rendered pages. No library, no build step.
//  - a rollout page (#rollout) polls /api/v1/rollouts/{id} every second and updates its counts and bars;
//  - a .plots section draws its telemetry (data-telemetry, a /api/v1/telemetry URL) as inline SVG charts.
"use strict";
(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const TERMINAL = new Set(["succeeded", "failed", "rolled-back", "superseded"]);
  const COUNTS = ["succeeded", "failed", "pending"];

  async function getJSON(url) {
    const response = await fetch(url, {credentials: "same-origin", headers: {Accept: "application/json"}});
    if (!response.ok) throw new Error(url + " answered " + response.status);
    return response.json();
  }

  function svg(name, attrs, text) {
    const node = document.createElementNS(SVG, name);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function html(name, attrs, text) {
    const node = document.createElement(name);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // --- rollout progress ---------------------------------------------------------------------------------

  function setBar(bar, succeeded, failed, total) {
    if (!bar) return;
    const whole = Math.max(total, 1), ok = 100 * succeeded / whole, bad = 100 * failed / whole;
    bar.querySelector(".ok").setAttribute("width", ok.toFixed(2));
    bar.querySelector(".bad").setAttribute("x", ok.toFixed(2));
    bar.querySelector(".bad").setAttribute("width", bad.toFixed(2));
    bar.setAttribute("aria-label", succeeded + " succeeded, " + failed + " failed of " + total);
  }

  function waveTotal(wave) {
    return ["succeeded", "failed", "pending", "rolled_back"].reduce((sum, key) => sum + (wave[key] || 0), 0);
  }

  function waveRow(tbody, wave, template) {
    let row = tbody.querySelector('tr[data-wave="' + wave.index + '"]');
    if (!row && template) {  // a wave that appeared after the page was rendered (devices joined)
      row = template.cloneNode(true);
      row.setAttribute("data-wave", wave.index);
      tbody.appendChild(row);
    }
    return row;
  }

  function updateRollout(section, doc) {
    section.querySelector('[data-field="state"]').textContent = doc.state;
    section.querySelector('[data-field="reason"]').textContent = doc.reason || "";
    for (const key of COUNTS) section.querySelector('[data-field="' + key + '"]').textContent = doc[key] || 0;
    section.dataset.state = doc.state;
    const waves = doc.waves || [];
    const total = waves.reduce((sum, w) => sum + waveTotal(w), 0) || COUNTS.reduce((s, k) => s + (doc[k] || 0), 0);
    setBar(section.querySelector('[data-bar="total"]'), doc.succeeded || 0, doc.failed || 0, total);
    const tbody = document.querySelector("#waves tbody");
    const template = tbody.querySelector("tr");
    for (const wave of waves) {
      const row = waveRow(tbody, wave, template);
      if (!row) continue;
      row.querySelector('[data-field="label"]').textContent = wave.index + (wave.canary ? " (canary)" : "");
      row.querySelector('[data-field="total"]').textContent = waveTotal(wave);
      for (const key of COUNTS) row.querySelector('[data-field="' + key + '"]').textContent = wave[key] || 0;
      setBar(row.querySelector('[data-bar="wave"]'), wave.succeeded || 0, wave.failed || 0, waveTotal(wave));
    }
    section.dataset.polls = String(Number(section.dataset.polls || 0) + 1);
  }

  function followRollout(section) {
    const url = "/api/v1/rollouts/" + encodeURIComponent(section.dataset.rollout);
    const tick = async () => {
      let delay = 1000;
      try {
        const doc = await getJSON(url);
        updateRollout(section, doc);
        delete section.dataset.error;
        if (TERMINAL.has(doc.state)) delay = 5000;  // a finished rollout may still take in late devices
      } catch (error) {
        section.dataset.error = error.message;
        delay = 3000;
      }
      setTimeout(tick, delay);
    };
    setTimeout(tick, 1000);
  }

  // --- plots --------------------------------------------------------------------------------------------

  const CHARTS = [
    {key: "latency", title: "Latency", unit: "ms", series: ["p50_ms", "p95_ms", "p99_ms"], names: ["p50", "p95", "p99"]},
    {key: "throughput", title: "Throughput", unit: "requests/s", series: ["throughput_rps"], names: ["requests/s"]},
    {key: "errors", title: "Errors", unit: "errors/s", series: ["error_rps"], names: ["errors/s"]},
    {key: "cpu", title: "CPU", unit: "%", series: ["cpu_percent"], names: ["CPU %"]},
    {key: "memory", title: "Memory", unit: "MB RSS", series: ["memory_rss_mb"], names: ["RSS MB"]},
  ];

  // How samples of several devices (and models) in one time bucket combine: rates add up, the rest averages.
  const COMBINE = {p50_ms: "mean", p95_ms: "mean", p99_ms: "mean", throughput_rps: "sum", error_rps: "sum",
                   cpu_percent: "mean", memory_rss_mb: "mean"};
  const MAX_POINTS = 120;

  const mean = (values) => values.reduce((a, b) => a + b, 0) / values.length;

  // Telemetry rows (one per device and model and sample) -> {field: [[ts, value], ...]}, oldest first.
  function seriesFrom(rows) {
    const usable = (rows || []).filter((r) => typeof r.ts === "number");
    const out = Object.fromEntries(Object.keys(COMBINE).map((field) => [field, []]));
    if (usable.length === 0) return out;
    const t0 = Math.min(...usable.map((r) => r.ts)), t1 = Math.max(...usable.map((r) => r.ts));
    const step = Math.max(1, (t1 - t0) / MAX_POINTS);
    const buckets = new Map();
    for (const row of usable) {
      const index = Math.floor((row.ts - t0) / step);
      if (!buckets.has(index)) buckets.set(index, {times: [], fields: {}});
      const bucket = buckets.get(index), key = row.device_id + "\u0000" + (row.model || "");
      bucket.times.push(row.ts);
      for (const field of Object.keys(COMBINE)) {
        const value = row[field];
        if (typeof value !== "number" || !Number.isFinite(value)) continue;
        const perKey = (bucket.fields[field] ||= {});
        (perKey[key] ||= []).push(value);
      }
    }
    for (const index of [...buckets.keys()].sort((a, b) => a - b)) {
      const bucket = buckets.get(index), ts = mean(bucket.times);
      for (const [field, how] of Object.entries(COMBINE)) {
        const perKey = Object.values(bucket.fields[field] || {}).map(mean);
        if (perKey.length === 0) continue;
        out[field].push([ts, how === "sum" ? perKey.reduce((a, b) => a + b, 0) : mean(perKey)]);
      }
    }
    return out;
  }

  function clock(ts) {
    return new Date(ts * 1000).toISOString().slice(11, 19);
  }

  function number(value) {
    if (value === 0) return "0";
    if (Math.abs(value) >= 100) return value.toFixed(0);
    if (Math.abs(value) >= 1) return value.toFixed(1);
    return value.toPrecision(2);
  }

  function drawChart(spec, lines) {
    const W = 640, H = 190, L = 52, R = 12, T = 10, B = 24;
    const figure = html("figure", {class: "chart", "data-metric": spec.key});
    figure.appendChild(html("figcaption", {}, spec.title + " (" + spec.unit + ")"));
    const all = lines.flatMap((line) => line.points);
    if (all.length === 0) {
      figure.appendChild(html("p", {class: "note"}, "no samples in this period"));
      return figure;
    }
    let t0 = Math.min(...all.map((p) => p[0])), t1 = Math.max(...all.map((p) => p[0]));
    if (t1 <= t0) t1 = t0 + 1;
    const v0 = Math.min(0, ...all.map((p) => p[1]));
    let v1 = Math.max(...all.map((p) => p[1]));
    if (v1 <= v0) v1 = v0 + 1;
    const x = (t) => L + (t - t0) / (t1 - t0) * (W - L - R);
    const y = (v) => H - B - (v - v0) / (v1 - v0) * (H - T - B);
    const chart = svg("svg", {viewBox: "0 0 " + W + " " + H, role: "img", "aria-label": spec.title});
    chart.appendChild(svg("line", {class: "grid", x1: L, x2: W - R, y1: y(v1), y2: y(v1)}));
    chart.appendChild(svg("line", {class: "axis", x1: L, x2: W - R, y1: y(v0), y2: y(v0)}));
    chart.appendChild(svg("line", {class: "axis", x1: L, x2: L, y1: T, y2: H - B}));
    chart.appendChild(svg("text", {x: L - 4, y: y(v1) + 4, "text-anchor": "end"}, number(v1)));
    chart.appendChild(svg("text", {x: L - 4, y: y(v0), "text-anchor": "end"}, number(v0)));
    chart.appendChild(svg("text", {x: L, y: H - 6}, clock(t0)));
    chart.appendChild(svg("text", {x: W - R, y: H - 6, "text-anchor": "end"}, clock(t1)));
    const legend = html("div", {class: "legend"});
    lines.forEach((line, i) => {
      if (line.points.length === 0) return;
      const d = line.points.map((p, j) => (j ? "L" : "M") + x(p[0]).toFixed(1) + " " + y(p[1]).toFixed(1)).join(" ");
      chart.appendChild(svg("path", {class: "line s" + i, d: d, "data-series": line.name,
                                     "data-points": line.points.length}));
      legend.appendChild(html("span", {class: "s" + i}, line.name));
    });
    figure.appendChild(chart);
    figure.appendChild(legend);
    return figure;
  }

  async function drawPlots(section) {
    let doc;
    try {
      doc = await getJSON(section.dataset.telemetry);
    } catch (error) {
      section.dataset.error = error.message;
      return;
    }
    for (const old of section.querySelectorAll("figure.chart, .note")) old.remove();
    const series = seriesFrom(doc.rows);
    for (const spec of CHARTS) {
      const lines = spec.series.map((field, i) => ({name: spec.names[i], points: series[field]}));
      section.appendChild(drawChart(spec, lines));
    }
    section.dataset.drawn = String(Number(section.dataset.drawn || 0) + 1);
  }

  function start() {
    const rollout = document.getElementById("rollout");
    if (rollout) followRollout(rollout);
    for (const section of document.querySelectorAll(".plots[data-telemetry]")) {
      drawPlots(section);
      setInterval(() => drawPlots(section), 10000);
    }
  }

  start();
})();
