// Workflows: a JSON editor, validation (every problem with its node and field), runs as one
// job with per-node status from job.result.nodes, and saved workflows.

import { api } from "../api.js";
import { $, alertBox, clearError, el, field, progressRow, renderGrid, runJob, showError } from "../ui.js";

const EXAMPLE = {
  name: "kite",
  description: "A prompt, two images, one output.",
  nodes: [
    { id: "idea", type: "prompt", params: { text: "a red kite over the sea" } },
    { id: "img", type: "text_to_image", params: { n: 2, seed: 1 } },
    { id: "out", type: "output", params: { name: "images" } },
  ],
  edges: [
    { source: "idea", source_port: "text", target: "img", target_port: "prompt" },
    { source: "img", source_port: "images", target: "out", target_port: "value" },
  ],
};

let catalogueLoaded = false;

export function init(section) {
  const editor = el("div", { class: "panel form" },
    field("Workflow (JSON)", el("textarea", { id: "wf-editor", rows: "22", spellcheck: "false", class: "code" },
      JSON.stringify(EXAMPLE, null, 2)), "Nodes with typed ports, joined by edges; see Node types for every type's ports and params."),
    el("div", { class: "actions" },
      el("button", { id: "wf-validate", type: "button", onclick: validate }, "Validate"),
      el("button", { id: "wf-run", type: "button", class: "primary", onclick: run }, "Run"),
      el("button", { id: "wf-cancel", type: "button", hidden: true }, "Cancel"),
      el("button", { id: "wf-reset", type: "button", onclick: reset }, "Reset to example")),
    el("div", { id: "wf-errors", role: "alert", hidden: true }),
    alertBox("wf-error"),
    el("form", { novalidate: true, class: "row save-row", onsubmit: save },
      field("Save as", el("input", { id: "wf-name", type: "text", required: true, maxlength: "200", placeholder: "my workflow" })),
      el("div", { class: "field" }, el("span", { class: "label-spacer", "aria-hidden": "true" }, "\u00a0"),
        el("button", { id: "wf-save", type: "submit" }, "Save"))));
  const results = el("div", { class: "stack" },
    el("div", { class: "panel" },
      el("h2", {}, "Run"),
      progressRow("wf"),
      el("div", { class: "table-wrap" }, el("table", { id: "wf-nodes" },
        el("caption", { class: "muted" }, "Node status appears here when a run starts."))),
      el("div", { id: "wf-outputs", class: "grid cols-1", "data-count": "0" })),
    el("div", { class: "panel" },
      el("div", { class: "panel-head" }, el("h2", {}, "Saved workflows"),
        el("button", { type: "button", onclick: loadSaved }, "Refresh")),
      el("ul", { id: "wf-saved", class: "saved" })),
    el("details", { id: "wf-catalogue", class: "panel", ontoggle: loadCatalogue },
      el("summary", {}, "Node types"), el("div", { id: "wf-types" })));
  section.append(el("div", { class: "layout" }, editor, results));
}

export function show() {
  loadSaved();
}

function reset() {
  $("#wf-editor").value = JSON.stringify(EXAMPLE, null, 2);
  $("#wf-errors").hidden = true;
}

/** The editor's document, or null after saying why it is not JSON. */
function documentOf() {
  try {
    return JSON.parse($("#wf-editor").value);
  } catch (err) {
    showIssues([{ node: null, field: null, message: `The editor does not hold valid JSON: ${err.message}` }]);
    return null;
  }
}

function showIssues(issues, order = null) {
  const box = $("#wf-errors");
  box.hidden = false;
  if (!issues.length) {
    box.className = "ok";
    box.replaceChildren(el("strong", {}, "valid"), order?.length ? ` — runs in this order: ${order.join(" → ")}` : "");
    return;
  }
  box.className = "error";
  box.replaceChildren(el("p", {}, `${issues.length} problem${issues.length === 1 ? "" : "s"}:`),
    el("ul", {}, ...issues.map((i) => el("li", {},
      i.node ? el("code", {}, `node ${i.node}`) : el("code", {}, "workflow"),
      i.field ? [" · ", el("code", {}, i.field)] : "", `: ${i.message}`))));
}

async function validate() {
  clearError($("#wf-error"));
  const doc = documentOf();
  if (!doc) return;
  try {
    const report = await api("POST", "/v1/workflows/validate", { json: doc });
    showIssues(report.valid ? [] : report.errors, report.order);
  } catch (err) {
    showError($("#wf-error"), err);
  }
}

/** The per-node table from the job (node states live in job.result.nodes). */
function showNodes(doc, job) {
  const states = job?.result?.nodes || {};
  const types = Object.fromEntries((doc.nodes || []).map((n) => [n.id, n.type]));
  const ids = [...new Set([...(doc.nodes || []).map((n) => n.id), ...Object.keys(states)])];
  const seconds = (s) => (s.started_at && s.finished_at ? `${(s.finished_at - s.started_at).toFixed(1)} s` : "");
  $("#wf-nodes").replaceChildren(
    el("thead", {}, el("tr", {}, ...["Node", "Type", "Status", "Progress", "Time", "Detail"].map((h) => el("th", { scope: "col" }, h)))),
    el("tbody", {}, ...ids.map((id) => {
      const s = states[id] || { status: "pending", progress: 0 };
      const pct = ["completed", "cached"].includes(s.status) ? 100 : Math.round(s.progress || 0);
      return el("tr", { dataset: { node: id, status: s.status } },
        el("th", { scope: "row" }, el("code", {}, id)),
        el("td", {}, types[id] || ""),
        el("td", {}, el("span", { class: `badge ${s.status}` }, s.status)),
        el("td", { class: "nowrap" }, el("progress", { max: "100", value: String(pct), "aria-label": `${id} progress` }), ` ${pct}%`),
        el("td", {}, seconds(s)),
        el("td", { class: s.error ? "error-text" : "muted" }, s.error || (s.status === "cached" ? "reused a stored result" : "")));
    })));
}

async function run() {
  clearError($("#wf-error"));
  const doc = documentOf();
  if (!doc) return;
  $("#wf-errors").hidden = true;
  $("#wf-outputs").replaceChildren();
  const start = async () => {
    try {
      return await api("POST", "/v1/workflows/runs", { json: { workflow: doc } });
    } catch (err) {
      if (!err.errors) throw err;
      showIssues(err.errors); // a refused workflow lists every problem; the alert just points there
      throw new Error(`The workflow was refused: ${err.errors.length} problem(s), listed above.`);
    }
  };
  const job = await runJob("wf", start, { submit: $("#wf-run"), onUpdate: (j) => showNodes(doc, j) });
  if (job && job.outputs.length) {
    const outputs = job.outputs.filter((o) => o.extra?.role !== "thumbnail");
    renderGrid($("#wf-outputs"), outputs);
    // Say which output node each file came from.
    [...$("#wf-outputs").children].forEach((figure, i) => {
      figure.querySelector("figcaption .muted").prepend(`${outputs[i].extra?.name || ""} `);
    });
  }
}

async function loadSaved() {
  const list = $("#wf-saved");
  try {
    const { data } = await api("GET", "/v1/workflows");
    list.replaceChildren(...(data.length ? data.map((w) => el("li", {},
      el("span", {}, el("strong", {}, w.name), ` v${w.version} `, el("code", { class: "muted" }, w.id)),
      el("button", { type: "button", onclick: () => {
        $("#wf-editor").value = JSON.stringify(w.workflow, null, 2);
        $("#wf-name").value = w.name;
        $("#wf-errors").hidden = true;
        $("#wf-editor").focus();
      } }, "Load"))) : [el("li", { class: "muted" }, "None saved yet.")]));
  } catch (err) {
    showError($("#wf-error"), err);
  }
}

async function save(event) {
  event.preventDefault();
  clearError($("#wf-error"));
  const doc = documentOf();
  if (!doc) return;
  try {
    const saved = await api("POST", "/v1/workflows", { json: { name: $("#wf-name").value.trim(), workflow: doc } });
    showIssues([], null);
    $("#wf-errors").replaceChildren(`Saved as ${saved.name} (${saved.id}, version ${saved.version}).`);
    loadSaved();
  } catch (err) {
    if (err.errors) showIssues(err.errors);
    showError($("#wf-error"), err);
  }
}

async function loadCatalogue() {
  if (catalogueLoaded || !$("#wf-catalogue").open) return;
  try {
    const schema = await api("GET", "/v1/workflows/schema");
    const ports = (obj) => Object.entries(obj || {}).map(([name, spec]) =>
      `${name}: ${typeof spec === "string" ? spec : spec.type}${spec.required === false ? "?" : ""}`).join(", ");
    $("#wf-types").replaceChildren(el("dl", { class: "catalogue" },
      ...Object.entries(schema.node_types).flatMap(([name, t]) => [
        el("dt", {}, el("code", {}, name), ` — ${t.description}`),
        el("dd", {}, [t.inputs && Object.keys(t.inputs).length ? `in: ${ports(t.inputs)}` : "",
          Object.keys(t.outputs || {}).length ? `out: ${ports(t.outputs)}` : "",
          `params: ${Object.keys(t.params.properties || {}).join(", ") || "none"}`].filter(Boolean).join(" · ")),
      ])));
    catalogueLoaded = true;
  } catch (err) {
    showError($("#wf-error"), err);
  }
}
