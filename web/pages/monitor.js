// Monitor: GET /v1/stats as charts (Chart.js, bundled into ../vendor/charts.js by `make web` and
// imported when the page is first shown) and tables: jobs by kind and status, generation time by
// model (mean and p95), failures by kind, queue depth and replicas by deployment, recent failures
// with their causes. It refreshes every few seconds while shown, and stops when the page is hidden
// (another route, or a background tab).
//
// Each chart is a <figure> with a caption; its canvas is role="img" with a one-line summary, and
// the numbers it draws are in a table after it (visually hidden unless "Show the numbers" is on).

import { api } from "../api.js";
import { $, alertBox, clearError, el, field, formatTime, showError } from "../ui.js";

const REFRESH_MS = 5000;
// Statuses in the order a job goes through them, each with its colour; any other status is grey.
const STATUS_COLOURS = {
  queued: "#91a7ff", in_progress: "#3b5bdb", completed: "#2f9e44", failed: "#e03131", cancelled: "#868e96",
};
const PALETTE = ["#e8590c", "#7048e8", "#0b7285", "#c2255c", "#5c940d", "#1c7ed6", "#f08c00", "#495057"];
const TIMING = [["mean_s", "Mean", "#4c6ef5"], ["p95_s", "p95", "#f76707"]];

let section = null;
const charts = {}; // by figure id: the Chart instance
let Chart = null; // Chart.js, loaded the first time the page is shown (no other page needs it)
let loop = 0; // the refresh loop's generation: a stopped loop's pending tick sees it changed and ends
let timer = null;
let inFlight = null; // the AbortController of the request under way

export function init(root) {
  section = root;
  const toolbar = el("div", { class: "panel toolbar mon-toolbar" },
    field("Jobs read", el("select", { id: "mon-window", onchange: restart },
      ...[100, 1000, 5000].map((n) => el("option", { value: String(n), selected: n === 1000 }, `latest ${n}`)))),
    el("div", { class: "actions" },
      el("button", { id: "mon-refresh", type: "button", onclick: restart }, "Refresh now"),
      el("span", { class: "check" }, el("input", { id: "mon-numbers", type: "checkbox", onchange: showNumbers }),
        el("label", { for: "mon-numbers" }, "Show the numbers")),
      el("span", { id: "mon-updated", class: "muted" })), // not a live region: it changes every few seconds
    alertBox("mon-error"));
  const summary = el("dl", { id: "mon-summary", class: "panel mon-summary" },
    ...[["mon-queue", "Queued or running"], ["mon-total", "Jobs read"], ["mon-failed", "Failed"],
      ["mon-replicas-total", "Replicas running"]].map(([id, label]) =>
      el("div", {}, el("dt", {}, label), el("dd", { id }, "–"))));
  const grid = el("div", { class: "mon-grid" },
    chartFigure("mon-jobs", "Jobs by kind and status"),
    chartFigure("mon-timing", "Generation time by model, in seconds (mean and p95 of completed jobs)"),
    chartFigure("mon-errors", "Failures by kind and error type"),
    el("div", { class: "panel" },
      el("h2", { id: "mon-replicas-title" }, "Replicas by deployment"),
      el("div", { class: "table-wrap" },
        el("table", { id: "mon-replicas", "aria-labelledby": "mon-replicas-title" }))));
  const failures = el("div", { class: "panel" },
    el("h2", { id: "mon-failures-title" }, "Recent failures"),
    el("div", { class: "table-wrap" }, el("table", { id: "mon-failures", "aria-labelledby": "mon-failures-title" })));
  section.append(toolbar, summary, grid, failures);
  // Stop at once when the page is hidden; a hidden tab stops too, and starts again when seen.
  new MutationObserver(() => (section.hidden ? stop() : null)).observe(section, { attributeFilter: ["hidden"] });
  document.addEventListener("visibilitychange", () => (document.hidden ? stop() : !section.hidden && restart()));
}

export function show() {
  restart();
}

function chartFigure(id, caption) {
  return el("figure", { id, class: "panel mon-chart" },
    el("figcaption", { id: `${id}-caption` }, el("h2", {}, caption)),
    el("div", { class: "mon-canvas" },
      el("canvas", { id: `${id}-canvas`, role: "img", "aria-label": `${caption}: no data yet` })),
    el("p", { class: "muted empty", id: `${id}-empty`, hidden: true }),
    el("div", { class: "table-wrap mon-numbers visually-hidden" },
      el("table", { id: `${id}-table`, "aria-labelledby": `${id}-caption` })));
}

function showNumbers() {
  const on = $("#mon-numbers").checked;
  for (const wrap of section.querySelectorAll(".mon-numbers")) wrap.classList.toggle("visually-hidden", !on);
}

// --- the refresh loop ------------------------------------------------------------------------------

function visible() {
  return section && !section.hidden && !document.hidden;
}

function stop() {
  loop++;
  clearTimeout(timer);
  timer = null;
  inFlight?.abort();
  inFlight = null;
}

function restart() {
  stop();
  tick(loop);
}

async function tick(run) {
  if (run !== loop || !visible()) return;
  inFlight = new AbortController();
  try {
    const stats = await api("GET", "/v1/stats", { query: { window: $("#mon-window").value }, signal: inFlight.signal });
    Chart ??= (await import("../vendor/charts.js")).Chart;
    if (run !== loop) return;
    render(stats);
    clearError($("#mon-error"));
    $("#mon-updated").textContent = `Updated ${new Date().toLocaleTimeString()}; refreshes every ${REFRESH_MS / 1000} s.`;
  } catch (err) {
    if (err.name === "AbortError" || run !== loop) return;
    showError($("#mon-error"), err); // and keep trying: the server may come back
  }
  if (run === loop && visible()) timer = setTimeout(() => tick(run), REFRESH_MS);
}

// --- rendering --------------------------------------------------------------------------------------

function render(stats) {
  const jobs = stats.jobs || {};
  const kinds = Object.keys(jobs).sort();
  const statuses = ordered(kinds.flatMap((k) => Object.keys(jobs[k])), Object.keys(STATUS_COLOURS));
  const sum = (counts) => Object.values(counts).reduce((a, b) => a + b, 0);
  const failed = kinds.reduce((n, k) => n + (jobs[k].failed || 0), 0);
  const replicas = stats.replicas;
  $("#mon-queue").textContent = String(stats.queue_depth);
  $("#mon-total").textContent = String(stats.window);
  $("#mon-failed").textContent = String(failed);
  $("#mon-replicas-total").textContent = replicas
    ? String(Object.values(replicas).reduce((n, states) => n + (states.RUNNING || 0), 0)) : "unknown";

  drawBars("mon-jobs", {
    labels: kinds,
    series: statuses.map((s, i) => ({ label: s.replace("_", " "),
      colour: STATUS_COLOURS[s] || PALETTE[i % PALETTE.length], values: kinds.map((k) => jobs[k][s] || 0) })),
    stacked: true, unit: "jobs", empty: "No jobs yet.",
    table: { head: ["Kind", ...statuses, "total"],
      rows: kinds.map((k) => [k, ...statuses.map((s) => jobs[k][s] || 0), sum(jobs[k])]) },
  });

  const timing = stats.generation_s || {};
  const models = Object.keys(timing).sort();
  drawBars("mon-timing", {
    labels: models,
    series: TIMING.map(([key, label, colour]) => ({ label, colour, values: models.map((m) => timing[m][key]) })),
    stacked: false, unit: "s", empty: "No completed jobs yet.",
    table: { head: ["Model", "jobs", "mean (s)", "p95 (s)"],
      rows: models.map((m) => [m, timing[m].count, seconds(timing[m].mean_s), seconds(timing[m].p95_s)]) },
  });

  const errors = stats.errors || {};
  const failedKinds = Object.keys(errors).sort();
  const types = ordered(failedKinds.flatMap((k) => Object.keys(errors[k])), []);
  drawBars("mon-errors", {
    labels: failedKinds,
    series: types.map((t, i) => ({ label: t, colour: PALETTE[i % PALETTE.length],
      values: failedKinds.map((k) => errors[k][t] || 0) })),
    stacked: true, unit: "failures", empty: "No failures.",
    table: { head: ["Kind", ...types, "total"],
      rows: failedKinds.map((k) => [k, ...types.map((t) => errors[k][t] || 0), sum(errors[k])]) },
  });

  renderReplicas(replicas);
  renderFailures(stats.recent_failures || []);
}

/** The names in `names`, once each: those in `first` in its order, then the rest sorted. */
function ordered(names, first) {
  const seen = new Set(names);
  return [...first.filter((n) => seen.has(n)), ...[...seen].filter((n) => !first.includes(n)).sort()];
}

function seconds(value) {
  return value.toFixed(2);
}

/**
 * A horizontal bar chart (one bar per label; `stacked` stacks the series, else they sit side by
 * side), its aria-label summary and its numbers table. The chart is made once and updated after.
 */
function drawBars(id, { labels, series, stacked, unit, empty, table }) {
  const canvas = $(`#${id}-canvas`);
  const caption = $(`#${id}-caption`).textContent;
  const none = labels.length === 0;
  $(`#${id}-empty`).textContent = empty;
  $(`#${id}-empty`).hidden = !none;
  canvas.parentElement.hidden = none;
  fillTable($(`#${id}-table`), table.head, table.rows, empty);
  canvas.setAttribute("aria-label", none ? `${caption}: ${empty}` : `${caption}: ${summaryOf(labels, series, unit)}. ` +
    "The numbers are in the table that follows.");
  // Room for each bar (a group of bars when side by side), plus the axis and the legend.
  canvas.parentElement.style.height = `${80 + labels.length * (stacked ? 28 : 16 * series.length + 12)}px`;
  const data = {
    labels,
    datasets: series.map((s) => ({ label: s.label, data: s.values, backgroundColor: s.colour, borderWidth: 0,
      maxBarThickness: 22 })),
  };
  const chart = charts[id];
  if (chart) {
    chart.data = data;
    chart.update();
    return;
  }
  charts[id] = new Chart(canvas, {
    type: "bar",
    data,
    options: {
      indexAxis: "y",
      responsive: true,
      maintainAspectRatio: false,
      animation: false, // it redraws every few seconds; motion would only distract
      scales: {
        x: { stacked, beginAtZero: true, ticks: { precision: unit === "s" ? undefined : 0 },
          title: { display: true, text: unit } },
        y: { stacked, ticks: { autoSkip: false } },
      },
      plugins: { legend: { position: "bottom", labels: { boxWidth: 12 } } },
    },
  });
}

/** "images.generations: completed 3, failed 1; videos.image_to_video: completed 1" */
function summaryOf(labels, series, unit) {
  return labels.map((label, i) => `${label}: ${series.filter((s) => s.values[i])
    .map((s) => `${s.label} ${unit === "s" ? seconds(s.values[i]) : s.values[i]}`).join(", ") || "none"}`).join("; ");
}

function fillTable(table, head, rows, empty) {
  table.replaceChildren(
    el("thead", {}, el("tr", {}, ...head.map((h, i) => el("th", { scope: "col", class: i ? "num" : null }, h)))),
    el("tbody", {}, rows.length
      ? rows.map(([name, ...cells]) => el("tr", {}, el("th", { scope: "row" }, name),
        ...cells.map((c) => el("td", { class: "num" }, String(c)))))
      : el("tr", {}, el("td", { colspan: String(head.length), class: "muted" }, empty))));
}

function renderReplicas(replicas) {
  const table = $("#mon-replicas");
  if (!replicas) {
    table.replaceChildren(el("caption", { class: "muted" }, "Serve's status is not available here."));
    return;
  }
  const deployments = Object.keys(replicas).sort();
  const states = ordered(deployments.flatMap((d) => Object.keys(replicas[d])), ["RUNNING", "STARTING", "UPDATING",
    "RECOVERING", "STOPPING"]);
  fillTable(table, ["Deployment", ...states.map((s) => s.toLowerCase())],
    deployments.map((d) => [d, ...states.map((s) => replicas[d][s] || 0)]), "No deployments.");
}

function renderFailures(failures) {
  $("#mon-failures").replaceChildren(
    el("thead", {}, el("tr", {},
      ...["When", "Kind", "Job", "Error", "Cause"].map((h) => el("th", { scope: "col" }, h)))),
    el("tbody", {}, failures.length
      ? failures.map((f) => el("tr", {},
        el("td", { class: "nowrap" }, formatTime(f.finished_at)), el("td", {}, f.kind),
        el("td", {}, el("code", {}, f.id)), el("td", {}, el("span", { class: "badge failed" }, f.type)),
        el("td", { class: "cause" }, f.message)))
      : el("tr", {}, el("td", { colspan: "5", class: "muted" }, "No failures among the jobs read."))));
}
