// Workflows: a node canvas (React Flow, through ../editor/canvas.js) over the workflow engine, with
// the JSON text as a second view of the same graph. The node catalogue, param forms and templates
// come from the server (GET /v1/workflows/schema and /templates). Runs follow the job's SSE events
// onto the nodes; layouts (positions, groups, comments) are saved in the workflow's `ui` block.
//
// Every canvas action also has a keyboard shortcut or a control beside the canvas (palette
// buttons, node list, connect form, inspector), so the editor is not mouse-only.

import { api, mediaUrl, getKey } from "../api.js";
import { $, alertBox, clearError, el, progressRow, renderGrid, revokeBlobs, runJob, setMedia, showError } from "../ui.js";
import { autoLayout, fits, freeId, NODE_ID, notAWorkflow, parseWorkflow, positionOf } from "../editor/graph.js";
import { paramsForm, showFieldIssues } from "../editor/params.js";

const DEFAULT_SIZE = { width: 220, height: 120 }; // a node's size before React Flow has measured it
const HISTORY_LIMIT = 100;
const SHORTCUTS = [
  ["Drag from the palette, or Enter on a palette button", "add a node (at the centre of the view)"],
  ["Drag from an output port to an input port", "connect (a wrong type is refused, with the reason)"],
  ["Tab / Shift+Tab", "move between nodes on the canvas"],
  ["Enter or Space on a node", "select it"],
  ["Arrow keys", "move the selected nodes"],
  ["Shift + drag on the canvas", "select several nodes (box)"],
  ["Ctrl/⌘ + click", "add a node to the selection"],
  ["Ctrl/⌘ + A", "select all"],
  ["Delete / Backspace", "delete the selection"],
  ["Ctrl/⌘ + C, X, V", "copy, cut, paste (paste also takes a workflow's JSON)"],
  ["Ctrl/⌘ + D", "duplicate the selection"],
  ["Ctrl/⌘ + Z", "undo"],
  ["Ctrl/⌘ + Shift + Z, Ctrl + Y", "redo"],
  ["Ctrl/⌘ + G", "group the selected nodes"],
  ["Ctrl/⌘ + S", "save"],
  ["Ctrl/⌘ + Enter", "run"],
  ["F", "fit the workflow in view"],
  ["+ / −", "zoom in / out"],
  ["?", "this list"],
  ["Escape", "clear the selection, close this list"],
];

const EXAMPLE = {
  name: "kite",
  description: "A prompt, an image, one output.",
  nodes: [
    { id: "idea", type: "prompt", params: { text: "a red kite over the sea" } },
    { id: "img", type: "text_to_image", params: { n: 1, seed: 1 } },
    { id: "out", type: "output", params: { name: "images" } },
  ],
  edges: [
    { source: "idea", source_port: "text", target: "img", target_port: "prompt" },
    { source: "img", source_port: "images", target: "out", target_port: "value" },
  ],
};

// --- state ---------------------------------------------------------------------------------------
// React Flow's node objects are the state (they carry React Flow's measurements): workflow nodes
// (type "atelier", data {nodeType, params, cache} plus run-time status), groups and comments.

let catalogue = null; // node_types from GET /v1/workflows/schema
let canvas = null; // {render}
let flow = null; // React Flow's instance (viewport, fitView, screenToFlowPosition)
let nodes = [];
let edges = [];
let meta = { name: "", description: "", savedId: null, savedVersion: null };
let history = [];
let future = [];
let clipboard = null; // the last copied fragment (a workflow document)
let dragMembers = null; // group id -> ids of the nodes inside it, while a group is dragged
let lastArrowCheckpoint = 0;
let pasteTimer = null; // Ctrl+V's paste from the editor's clipboard, unless a paste event comes
let justCut = null; // what Ctrl+X cut, for the cut event that may follow
let workflowIssues = []; // the last validation's problems
let ready = null; // resolves once the catalogue and canvas are up
let pendingParams = null; // show() params that arrived before `ready`
let pendingView = null; // "fit", or a saved viewport, to apply once the loaded nodes are measured
let editingParams = false; // the param whose field is being edited (one undo step per field)
let section = null;
let applyNodeChanges = null; // React Flow's, from the bundle once it is loaded
let applyEdgeChanges = null;

const RUNTIME_KEYS = ["status", "progress", "error", "issues", "media", "judged"];
const isWorkflowNode = (n) => n.type === "atelier";
const GROUP = "group:";
const COMMENT = "comment:";

// --- page -----------------------------------------------------------------------------------------

export function init(root) {
  section = root;
  const button = (id, text, onclick, extra = {}) => el("button", { id, type: "button", onclick, ...extra }, text);
  const toolbar = el("div", { class: "panel wf-toolbar", role: "toolbar", "aria-label": "Workflow editor" },
    el("div", { class: "actions" },
      button("wf-validate", "Validate", validate),
      button("wf-run", "Run", run, { class: "primary", title: "Ctrl+Enter" }),
      button("wf-cancel", "Cancel", null, { hidden: true }),
      el("span", { class: "wf-sep", "aria-hidden": "true" }),
      button("wf-undo", "Undo", undo, { title: "Ctrl+Z" }),
      button("wf-redo", "Redo", redo, { title: "Ctrl+Shift+Z" }),
      button("wf-copy", "Copy", () => copySelection(false), { title: "Ctrl+C" }),
      button("wf-paste", "Paste", () => clipboard && paste(clipboard), { title: "Ctrl+V" }),
      button("wf-delete", "Delete", deleteSelection, { title: "Delete" }),
      button("wf-group", "Group", groupSelection, { title: "Ctrl+G" }),
      button("wf-comment", "Comment", addComment),
      button("wf-layout", "Auto-layout", relayout),
      el("span", { class: "wf-sep", "aria-hidden": "true" }),
      button("wf-new", "New", () => loadDocument({ nodes: [], edges: [] }, { meta: { name: "", savedId: null } })),
      el("label", { class: "button", for: "wf-import" }, "Import"),
      el("input", { id: "wf-import", type: "file", accept: ".json,application/json", class: "visually-hidden", onchange: importFile }),
      button("wf-export", "Export", exportFile),
      button("wf-help-open", "Shortcuts", openHelp, { title: "?" })),
    el("div", { class: "wf-views", role: "tablist", "aria-label": "View" },
      el("button", { id: "wf-tab-canvas", type: "button", role: "tab", "aria-selected": "true", "aria-controls": "wf-canvas-view", onclick: () => setView("canvas") }, "Canvas"),
      el("button", { id: "wf-tab-json", type: "button", role: "tab", "aria-selected": "false", "aria-controls": "wf-json-view", onclick: () => setView("json") }, "JSON")));

  const canvasView = el("div", { id: "wf-canvas-view", role: "tabpanel", "aria-labelledby": "wf-tab-canvas", class: "wf-canvas-view" },
    el("div", { id: "wf-canvas", class: "wf-canvas", tabindex: "-1" }));
  // What the last action did, or why it was refused: above both views, its space always kept.
  const message = el("div", { id: "wf-message", class: "wf-message idle", role: "status", "aria-live": "polite" });
  const jsonView = el("div", { id: "wf-json-view", role: "tabpanel", "aria-labelledby": "wf-tab-json", class: "panel form", hidden: true },
    el("label", { for: "wf-editor" }, "Workflow (JSON): the same graph as the canvas"),
    el("textarea", { id: "wf-editor", rows: "24", spellcheck: "false", class: "code" }),
    el("div", { class: "actions" },
      button("wf-json-apply", "Apply to canvas", applyJson, { class: "primary" }),
      button("wf-json-reset", "Discard changes", () => { $("#wf-editor").value = JSON.stringify(toDocument(), null, 2); })));

  const side = el("div", { class: "wf-side" },
    el("section", { class: "panel", "aria-labelledby": "wf-palette-title" },
      el("h2", { id: "wf-palette-title" }, "Add a node"),
      el("p", { class: "muted small" }, "Drag onto the canvas, or press Enter."),
      el("div", { id: "wf-palette", class: "wf-palette" }, el("p", { class: "muted" }, "Loading node types…"))),
    el("section", { class: "panel", "aria-labelledby": "wf-inspector-title" },
      el("h2", { id: "wf-inspector-title" }, "Selected"),
      el("div", { id: "wf-inspector" })),
    el("section", { class: "panel", "aria-labelledby": "wf-nodes-title" },
      el("h2", { id: "wf-nodes-title" }, "Nodes"),
      el("ul", { id: "wf-node-list", class: "wf-node-list" })),
    el("section", { class: "panel", "aria-labelledby": "wf-connect-title" },
      el("h2", { id: "wf-connect-title" }, "Connections"),
      el("form", { id: "wf-connect", class: "form", onsubmit: connectFromForm },
        el("div", { class: "field" }, el("label", { for: "wf-connect-from" }, "From output"), el("select", { id: "wf-connect-from" })),
        el("div", { class: "field" }, el("label", { for: "wf-connect-to" }, "To input"), el("select", { id: "wf-connect-to" })),
        el("div", { class: "actions" }, el("button", { id: "wf-connect-submit", type: "submit" }, "Connect"))),
      el("ul", { id: "wf-edge-list", class: "wf-edge-list" })));

  const editor = el("div", { class: "wf-editor" }, el("div", { class: "wf-main" }, message, canvasView, jsonView), side);

  const runPanel = el("div", { class: "panel" },
    el("h2", {}, "Run"),
    el("div", { class: "row save-row" },
      el("div", { class: "field" }, el("label", { for: "wf-name" }, "Name"),
        el("input", { id: "wf-name", type: "text", maxlength: "200", placeholder: "my workflow", oninput: (e) => { meta.name = e.target.value; } })),
      el("div", { class: "field" }, el("span", { class: "label-spacer", "aria-hidden": "true" }, "\u00a0"),
        el("div", { class: "actions" },
          button("wf-save", "Save", () => save(false), { title: "Ctrl+S" }),
          button("wf-save-as", "Save as new", () => save(true))))),
    el("p", { id: "wf-saved-as", class: "muted", "aria-live": "polite" }),
    el("div", { id: "wf-errors", role: "alert", hidden: true }),
    alertBox("wf-error"),
    progressRow("wf"),
    el("div", { id: "wf-outputs", class: "grid cols-1", "data-count": "0" }),
    // What the judging nodes saw: a QA loop's rounds, best-of candidates, a judge's ranking.
    el("div", { id: "wf-judged", class: "wf-judged", "aria-live": "polite", hidden: true }));

  const lists = el("div", { class: "layout wf-lists" },
    el("div", { class: "panel" },
      el("div", { class: "panel-head" }, el("h2", {}, "Saved workflows"), button("wf-saved-refresh", "Refresh", loadSaved)),
      el("ul", { id: "wf-saved", class: "saved" })),
    el("div", { class: "panel" },
      el("h2", {}, "Templates"),
      el("ul", { id: "wf-templates", class: "saved" })));

  const help = el("dialog", { id: "wf-help", "aria-labelledby": "wf-help-title" },
    el("h2", { id: "wf-help-title" }, "Keyboard shortcuts"),
    el("dl", { class: "wf-shortcuts" }, ...SHORTCUTS.flatMap(([keys, what]) => [el("dt", {}, keys), el("dd", {}, what)])),
    el("form", { method: "dialog" }, el("button", { id: "wf-help-close", type: "submit" }, "Close")));

  root.append(toolbar, editor, runPanel, lists, help);
  root.addEventListener("keydown", onKeyDown);
  document.addEventListener("copy", onCopy);
  document.addEventListener("cut", onCut);
  document.addEventListener("paste", onPaste);
  ready = start().catch((err) => showError($("#wf-error"), err));
}

export function show(params) {
  loadSaved();
  if (ready) ready.then(() => openFromParams(params));
  else pendingParams = params;
}

async function start() {
  // React Flow (400 kB) loads with this page only, not with the rest of the UI.
  const [schema, lib] = await Promise.all([api("GET", "/v1/workflows/schema"), import("../editor/canvas.js")]);
  ({ applyNodeChanges, applyEdgeChanges } = lib);
  catalogue = schema.node_types;
  renderPalette();
  canvas = lib.mountCanvas($("#wf-canvas"), {
    nodes: () => nodes.map(decorate),
    edges: () => edges,
    onNodesChange, onEdgesChange, onConnect, onConnectEnd, isValidConnection, onNodeDragStart, onNodeDragStop,
    onDropType: (type, point) => addNode(type, flow ? flow.screenToFlowPosition(point) : null),
    onInit: (instance) => {
      flow = instance;
      requestAnimationFrame(applyPendingView);
    },
    onMoveEnd: () => {},
  });
  loadDocument(EXAMPLE, { remember: false });
  loadTemplates();
  if (pendingParams) openFromParams(pendingParams);
}

function openFromParams(params) {
  const job = params?.get?.("job");
  if (job) openJob(job);
}

// --- the document ------------------------------------------------------------------------------------

function workflowNode(id, type, params = {}, position = { x: 0, y: 0 }, cache = true) {
  return { id, type: "atelier", position, data: { nodeType: type, params: { ...params }, cache } };
}

/** The engine's document, with the layout in its `ui` block. */
function toDocument() {
  const wf = nodes.filter(isWorkflowNode);
  const doc = {
    name: meta.name || undefined,
    description: meta.description || "",
    nodes: wf.map((n) => ({ id: n.id, type: n.data.nodeType, params: n.data.params, ...(n.data.cache === false ? { cache: false } : {}) })),
    edges: edges.map((e) => ({ source: e.source, source_port: e.sourceHandle, target: e.target, target_port: e.targetHandle })),
    ui: {
      positions: Object.fromEntries(wf.map((n) => [n.id, { x: Math.round(n.position.x), y: Math.round(n.position.y) }])),
      groups: nodes.filter((n) => n.type === "group").map((g) => ({
        id: g.id.slice(GROUP.length), title: g.data.title, x: Math.round(g.position.x), y: Math.round(g.position.y),
        width: Math.round(g.width ?? g.measured?.width ?? 300), height: Math.round(g.height ?? g.measured?.height ?? 200),
        nodes: membersOf(g),
      })),
      comments: nodes.filter((n) => n.type === "comment").map((c) => ({
        id: c.id.slice(COMMENT.length), text: c.data.text, x: Math.round(c.position.x), y: Math.round(c.position.y),
      })),
    },
  };
  if (flow) {
    const { x, y, zoom } = flow.getViewport();
    doc.ui.viewport = { x: Math.round(x), y: Math.round(y), zoom: Math.round(zoom * 1000) / 1000 };
  }
  if (!doc.name) delete doc.name;
  return doc;
}

function edgeOf(source, sourcePort, target, targetPort) {
  const type = catalogue?.[nodeById(source)?.data.nodeType]?.outputs?.[sourcePort] || "unknown";
  return { id: `${source}.${sourcePort}>${target}.${targetPort}`, source, sourceHandle: sourcePort, target,
    targetHandle: targetPort, className: `edge-${type}`, ariaLabel: `${source}.${sourcePort} to ${target}.${targetPort}` };
}

/**
 * Show `doc` on the canvas (replacing what is there). Positions come from its `ui` block; nodes
 * without one are laid out in layers. `remember`: an undo step (not for the page's first load).
 */
function loadDocument(doc, { remember = true, meta: newMeta = null } = {}) {
  if (remember) checkpoint();
  const ui = doc.ui && typeof doc.ui === "object" ? doc.ui : {};
  const known = {};
  for (const [id, value] of Object.entries(ui.positions || {})) {
    const p = positionOf(value);
    if (p) known[id] = p;
  }
  const docEdges = doc.edges || [];
  const previous = nodes;
  const positions = autoLayout(doc.nodes, docEdges, known);
  nodes = doc.nodes.map((n) => workflowNode(n.id, n.type, n.params || {}, positions[n.id], n.cache !== false));
  for (const g of Array.isArray(ui.groups) ? ui.groups : []) {
    const p = positionOf(g);
    if (!p || typeof g.id !== "string") continue;
    nodes.unshift({ id: GROUP + g.id, type: "group", position: p, width: Number(g.width) || 300,
      height: Number(g.height) || 200, zIndex: -1, data: { title: String(g.title ?? "group") } });
  }
  for (const c of Array.isArray(ui.comments) ? ui.comments : []) {
    const p = positionOf(c);
    if (!p || typeof c.id !== "string") continue;
    nodes.push({ id: COMMENT + c.id, type: "comment", position: p, data: { text: String(c.text ?? "") } });
  }
  keepMeasurements(previous);
  edges = docEdges.map((e) => edgeOf(e.source, e.source_port, e.target, e.target_port));
  meta = { ...meta, name: doc.name || "", description: doc.description || "", ...(newMeta || {}) };
  $("#wf-name").value = meta.name;
  workflowIssues = [];
  renderIssues();
  $("#wf-outputs").replaceChildren();
  renderJudged({});
  refresh();
  pendingView = ui.viewport && Number.isFinite(Number(ui.viewport.zoom)) ? ui.viewport : "fit";
  requestAnimationFrame(applyPendingView);
  const unknown = doc.nodes.filter((n) => !catalogue?.[n.type]).map((n) => `${n.id} (${n.type})`);
  if (unknown.length) {
    say(`This workflow has node types this server does not know: ${unknown.join(", ")}. They are marked on the canvas.`, "error");
  }
}

/**
 * React Flow measures a node when its element changes size; a node that replaces one with the
 * same id (a reload, an undo) keeps the last measurement, or it would wait hidden for one.
 */
function keepMeasurements(previous) {
  const sizes = new Map(previous.filter((n) => n.measured).map((n) => [n.id, n.measured]));
  nodes = nodes.map((n) => (!n.measured && sizes.has(n.id) ? { ...n, measured: sizes.get(n.id) } : n));
}

/** Fit the view (or restore the saved one) once the nodes are measured. */
function applyPendingView() {
  if (!flow || !pendingView || !nodes.every((n) => n.measured || n.type === "group")) return;
  const view = pendingView;
  pendingView = null;
  if (view === "fit") flow.fitView({ padding: 0.2, maxZoom: 1 });
  else flow.setViewport({ x: Number(view.x) || 0, y: Number(view.y) || 0, zoom: Number(view.zoom) });
}

/** A node with what its component draws: ports, param summary (derived, not stored). */
const decorated = new WeakMap();
function decorate(node) {
  if (!isWorkflowNode(node)) return node;
  const spec = catalogue?.[node.data.nodeType];
  if (spec && decorated.has(node)) return decorated.get(node);
  let inputs;
  let outputs;
  if (spec) {
    inputs = Object.entries(spec.inputs || {}).map(([name, p]) => ({ name, type: p.type, required: p.required }));
    outputs = Object.entries(spec.outputs || {}).map(([name, type]) => ({ name, type }));
  } else {
    // An unknown type: the ports its edges use, so the graph still reads.
    const ins = [...new Set(edges.filter((e) => e.target === node.id).map((e) => e.targetHandle))];
    const outs = [...new Set(edges.filter((e) => e.source === node.id).map((e) => e.sourceHandle))];
    inputs = ins.map((name) => ({ name, type: "?" }));
    outputs = outs.map((name) => ({ name, type: "?" }));
  }
  const summary = Object.entries(node.data.params || {}).map(([k, v]) => {
    const text = typeof v === "string" ? v : JSON.stringify(v);
    return [k, text.length > 42 ? `${text.slice(0, 40)}…` : text];
  });
  const out = { ...node, data: { ...node.data, inputs, outputs, summary, unknown: !spec } };
  if (spec) decorated.set(node, out);
  return out;
}

const nodeById = (id) => nodes.find((n) => n.id === id);
const selectedNodes = () => nodes.filter((n) => n.selected);
const usedIds = () => new Set(nodes.filter(isWorkflowNode).map((n) => n.id));

function setNode(id, update) {
  nodes = nodes.map((n) => (n.id === id ? update(n) : n));
}

function setData(id, changes) {
  setNode(id, (n) => ({ ...n, data: { ...n.data, ...changes } }));
}

/** Re-draw the canvas and everything beside it. */
function refresh() {
  canvas?.render();
  renderNodeList();
  renderConnect();
  renderInspector();
  $("#wf-undo").disabled = !history.length;
  $("#wf-redo").disabled = !future.length;
  $("#wf-paste").disabled = !clipboard;
  const any = nodes.some((n) => n.selected) || edges.some((e) => e.selected);
  $("#wf-delete").disabled = !any;
  $("#wf-copy").disabled = !selectedNodes().some(isWorkflowNode);
  $("#wf-group").disabled = !selectedNodes().some(isWorkflowNode);
  section.dataset.nodes = String(nodes.filter(isWorkflowNode).length);
  section.dataset.edges = String(edges.length);
}

function say(text, kind = "info") {
  const box = $("#wf-message");
  box.textContent = text;
  box.className = `wf-message ${kind}`;
  box.setAttribute("role", kind === "error" ? "alert" : "status");
  if (!text) box.className = "wf-message idle";
}

// --- undo -------------------------------------------------------------------------------------------

function stripped(n) {
  if (!isWorkflowNode(n)) return n;
  const data = { ...n.data };
  for (const key of RUNTIME_KEYS) delete data[key];
  return { ...n, data };
}

function snapshot() {
  return JSON.stringify({ nodes: nodes.map(stripped), edges, meta });
}

function checkpoint() {
  history.push(snapshot());
  if (history.length > HISTORY_LIMIT) history.shift();
  future = [];
}

function restore(state) {
  const parsed = JSON.parse(state);
  const previous = nodes;
  nodes = parsed.nodes.map((n) => ({ ...n, measured: undefined }));
  keepMeasurements(previous);
  edges = parsed.edges;
  meta = parsed.meta;
  $("#wf-name").value = meta.name || "";
  refresh();
}

function undo() {
  if (!history.length) return;
  future.push(snapshot());
  restore(history.pop());
  say("Undone.");
}

function redo() {
  if (!future.length) return;
  history.push(snapshot());
  restore(future.pop());
  say("Redone.");
}

/** One undoable change: checkpoint, mutate, redraw. */
function commit(mutate) {
  checkpoint();
  mutate();
  refresh();
}

// --- React Flow's events ----------------------------------------------------------------------------

function onNodesChange(changes) {
  const extra = [];
  for (const change of changes) {
    if (change.type === "position" && change.position && dragMembers?.[change.id]) {
      const group = nodeById(change.id);
      const dx = change.position.x - group.position.x;
      const dy = change.position.y - group.position.y;
      for (const id of dragMembers[change.id]) {
        const member = nodeById(id);
        if (member) extra.push({ id, type: "position", position: { x: member.position.x + dx, y: member.position.y + dy } });
      }
    }
  }
  nodes = applyNodeChanges([...changes, ...extra], nodes);
  if (changes.some((c) => c.type !== "dimensions")) refresh();
  else canvas.render();
  if (pendingView) requestAnimationFrame(applyPendingView);
}

function onEdgesChange(changes) {
  edges = applyEdgeChanges(changes.filter((c) => c.type !== "remove"), edges);
  refresh();
}

function onNodeDragStart(_event, _node, dragged) {
  checkpoint();
  const moving = new Set((dragged || []).map((n) => n.id));
  dragMembers = {};
  for (const g of dragged || []) {
    if (g.type !== "group") continue;
    dragMembers[g.id] = membersOf(nodeById(g.id)).filter((id) => !moving.has(id));
  }
}

function onNodeDragStop() {
  dragMembers = null;
  refresh();
}

/** The workflow nodes whose centre lies inside a group's frame. */
function membersOf(group) {
  const w = group.width ?? group.measured?.width ?? 300;
  const hgt = group.height ?? group.measured?.height ?? 200;
  return nodes.filter(isWorkflowNode).filter((n) => {
    const cx = n.position.x + (n.measured?.width ?? DEFAULT_SIZE.width) / 2;
    const cy = n.position.y + (n.measured?.height ?? DEFAULT_SIZE.height) / 2;
    return cx >= group.position.x && cx <= group.position.x + w && cy >= group.position.y && cy <= group.position.y + hgt;
  }).map((n) => n.id);
}

function fitOf(source, sourcePort, target, targetPort) {
  if (source === target) return { ok: false, reason: "a node cannot feed itself" };
  const s = nodeById(source);
  const t = nodeById(target);
  if (!s || !t) return { ok: false, reason: "no such node" };
  return fits(catalogue, s.data.nodeType, sourcePort, t.data.nodeType, targetPort);
}

function isValidConnection(conn) {
  return fitOf(conn.source, conn.sourceHandle, conn.target, conn.targetHandle).ok;
}

function connect(source, sourcePort, target, targetPort) {
  const fit = fitOf(source, sourcePort, target, targetPort);
  if (!fit.ok) {
    refuse(source, sourcePort, target, targetPort, fit.reason);
    return false;
  }
  commit(() => {
    // An input takes one edge: a new one replaces the old.
    edges = edges.filter((e) => !(e.target === target && e.targetHandle === targetPort));
    edges = [...edges, edgeOf(source, sourcePort, target, targetPort)];
  });
  say(`Connected ${source}.${sourcePort} → ${target}.${targetPort}.`, "ok");
  return true;
}

function refuse(source, sourcePort, target, targetPort, reason) {
  say(`Connection refused: ${source}.${sourcePort} → ${target}.${targetPort}: ${reason}.`, "error");
  $("#wf-message").dataset.refused = `${source}.${sourcePort}>${target}.${targetPort}`;
}

function onConnect(conn) {
  connect(conn.source, conn.sourceHandle, conn.target, conn.targetHandle);
}

function onConnectEnd(_event, state) {
  if (!state?.toHandle || state.isValid || !state.fromHandle) return;
  const from = state.fromHandle;
  const to = state.toHandle;
  if (from.type === to.type) {
    say(`Connection refused: connect an output (right side) to an input (left side).`, "error");
    return;
  }
  const [src, dst] = from.type === "source" ? [from, to] : [to, from];
  const fit = fitOf(src.nodeId, src.id, dst.nodeId, dst.id);
  refuse(src.nodeId, src.id, dst.nodeId, dst.id, fit.reason || "not allowed");
}

// --- editing ------------------------------------------------------------------------------------------

function viewCentre() {
  const box = $("#wf-canvas").getBoundingClientRect();
  return flow ? flow.screenToFlowPosition({ x: box.left + box.width / 2, y: box.top + box.height / 2 }) : { x: 0, y: 0 };
}

function addNode(type, position = null) {
  if (!catalogue?.[type]) return;
  const id = freeId(type, usedIds());
  const at = position || viewCentre();
  const pos = { x: Math.round(at.x - DEFAULT_SIZE.width / 2), y: Math.round(at.y - 30) };
  commit(() => {
    nodes = [...nodes.map((n) => (n.selected ? { ...n, selected: false } : n)), { ...workflowNode(id, type, {}, pos), selected: true }];
  });
  say(`Added ${type} as ${id}.`, "ok");
  return id;
}

function selectOnly(ids) {
  const set = new Set(ids);
  nodes = nodes.map((n) => (Boolean(n.selected) === set.has(n.id) ? n : { ...n, selected: set.has(n.id) }));
  edges = edges.map((e) => (e.selected ? { ...e, selected: false } : e));
  refresh();
}

function selectAll() {
  nodes = nodes.map((n) => (n.selected ? n : { ...n, selected: true }));
  refresh();
}

function deleteSelection() {
  const gone = new Set(selectedNodes().map((n) => n.id));
  const goneEdges = edges.filter((e) => e.selected || gone.has(e.source) || gone.has(e.target));
  if (!gone.size && !goneEdges.length) return;
  commit(() => {
    nodes = nodes.filter((n) => !gone.has(n.id));
    edges = edges.filter((e) => !goneEdges.includes(e));
  });
  say(`Deleted ${gone.size} node${gone.size === 1 ? "" : "s"} and ${goneEdges.length} connection${goneEdges.length === 1 ? "" : "s"}.`);
}

/** The selected workflow nodes as a workflow fragment (with the edges between them). */
function fragment() {
  const chosen = selectedNodes().filter(isWorkflowNode);
  const ids = new Set(chosen.map((n) => n.id));
  return {
    nodes: chosen.map((n) => ({ id: n.id, type: n.data.nodeType, params: n.data.params, ...(n.data.cache === false ? { cache: false } : {}) })),
    edges: edges.filter((e) => ids.has(e.source) && ids.has(e.target))
      .map((e) => ({ source: e.source, source_port: e.sourceHandle, target: e.target, target_port: e.targetHandle })),
    ui: { positions: Object.fromEntries(chosen.map((n) => [n.id, n.position])) },
  };
}

function copySelection(cut) {
  const frag = fragment();
  if (!frag.nodes.length) return null;
  clipboard = frag;
  if (cut) deleteSelection();
  else refresh();
  say(`${cut ? "Cut" : "Copied"} ${frag.nodes.length} node${frag.nodes.length === 1 ? "" : "s"}.`);
  return frag;
}

/** Add a workflow fragment's nodes (new ids where taken), offset from where they were, selected. */
function paste(doc, { offset = 40 } = {}) {
  const why = notAWorkflow(doc);
  if (why) {
    say(`This is not a workflow: ${why}. Nothing was changed.`, "error");
    return;
  }
  const taken = usedIds();
  const rename = {};
  for (const n of doc.nodes) {
    rename[n.id] = freeId(n.id, taken);
    taken.add(rename[n.id]);
  }
  const known = {};
  for (const [id, p] of Object.entries(doc.ui?.positions || {})) if (positionOf(p)) known[id] = positionOf(p);
  const laid = autoLayout(doc.nodes, doc.edges || [], known);
  const centre = viewCentre();
  const anyKnown = Object.keys(known).length > 0;
  commit(() => {
    nodes = nodes.map((n) => (n.selected ? { ...n, selected: false } : n));
    for (const n of doc.nodes) {
      const p = laid[n.id];
      const pos = anyKnown ? { x: p.x + offset, y: p.y + offset } : { x: centre.x + p.x, y: centre.y + p.y };
      nodes.push({ ...workflowNode(rename[n.id], n.type, n.params || {}, pos, n.cache !== false), selected: true });
    }
    for (const e of doc.edges || []) {
      if (rename[e.source] && rename[e.target]) {
        edges = edges.filter((x) => !(x.target === rename[e.target] && x.targetHandle === e.target_port));
        edges.push(edgeOf(rename[e.source], e.source_port, rename[e.target], e.target_port));
      }
    }
  });
  say(`Pasted ${doc.nodes.length} node${doc.nodes.length === 1 ? "" : "s"}.`, "ok");
}

function groupSelection() {
  const chosen = selectedNodes().filter(isWorkflowNode);
  if (!chosen.length) return;
  const pad = 30;
  const x0 = Math.min(...chosen.map((n) => n.position.x)) - pad;
  const y0 = Math.min(...chosen.map((n) => n.position.y)) - pad - 20;
  const x1 = Math.max(...chosen.map((n) => n.position.x + (n.measured?.width ?? DEFAULT_SIZE.width))) + pad;
  const y1 = Math.max(...chosen.map((n) => n.position.y + (n.measured?.height ?? DEFAULT_SIZE.height))) + pad;
  const taken = new Set(nodes.map((n) => n.id));
  const id = freeId("group", new Set([...taken].filter((t) => t.startsWith(GROUP)).map((t) => t.slice(GROUP.length))));
  commit(() => {
    nodes = [{ id: GROUP + id, type: "group", position: { x: x0, y: y0 }, width: x1 - x0, height: y1 - y0, zIndex: -1,
      data: { title: `group ${id.replace(/^group_?/, "") || 1}` } }, ...nodes];
  });
  say(`Grouped ${chosen.length} node${chosen.length === 1 ? "" : "s"}.`, "ok");
}

function addComment() {
  const taken = new Set(nodes.filter((n) => n.type === "comment").map((n) => n.id.slice(COMMENT.length)));
  const id = freeId("note", taken);
  const at = viewCentre();
  commit(() => {
    nodes = [...nodes.map((n) => (n.selected ? { ...n, selected: false } : n)),
      { id: COMMENT + id, type: "comment", position: { x: at.x - 80, y: at.y - 20 }, selected: true, data: { text: "A note" } }];
  });
}

function relayout() {
  commit(() => {
    const wf = nodes.filter(isWorkflowNode);
    const positions = autoLayout(wf.map((n) => ({ id: n.id })), edges.map((e) => ({ source: e.source, target: e.target })));
    nodes = nodes.map((n) => (isWorkflowNode(n) ? { ...n, position: positions[n.id] } : n));
  });
  requestAnimationFrame(() => flow?.fitView({ padding: 0.2, maxZoom: 1 }));
}

function renameNode(oldId, newId) {
  if (newId === oldId) return true;
  if (!NODE_ID.test(newId)) {
    say(`A node id is 1 to 64 letters, digits, _ or -: ${JSON.stringify(newId)} is not one.`, "error");
    return false;
  }
  if (usedIds().has(newId)) {
    say(`There is already a node ${newId}.`, "error");
    return false;
  }
  commit(() => {
    nodes = nodes.map((n) => (n.id === oldId ? { ...stripped(n), id: newId } : n));
    edges = edges.map((e) => (e.source === oldId || e.target === oldId
      ? edgeOf(e.source === oldId ? newId : e.source, e.sourceHandle, e.target === oldId ? newId : e.target, e.targetHandle) : e));
  });
  return true;
}

// --- keyboard, clipboard ----------------------------------------------------------------------------

const typing = (target) => target instanceof HTMLElement && (target.isContentEditable ||
  ["INPUT", "TEXTAREA", "SELECT"].includes(target.tagName));

function onKeyDown(event) {
  const mod = event.ctrlKey || event.metaKey;
  const key = event.key;
  if (mod && key === "Enter") {
    event.preventDefault();
    run();
    return;
  }
  if (mod && key.toLowerCase() === "s") {
    event.preventDefault();
    save(false);
    return;
  }
  if (typing(event.target)) return;
  if (!$("#wf-canvas-view") || $("#wf-canvas-view").hidden) return;
  if (mod && key.toLowerCase() === "z") {
    event.preventDefault();
    if (event.shiftKey) redo();
    else undo();
  } else if (mod && key.toLowerCase() === "y") {
    event.preventDefault();
    redo();
  } else if (mod && key.toLowerCase() === "a") {
    event.preventDefault();
    selectAll();
  } else if (mod && key.toLowerCase() === "d") {
    event.preventDefault();
    const frag = fragment();
    if (frag.nodes.length) paste(frag);
  } else if (mod && key.toLowerCase() === "g") {
    event.preventDefault();
    groupSelection();
  } else if (mod && key.toLowerCase() === "c") {
    copySelection(false); // the copy event (if the browser fires one) also puts it on the system clipboard
  } else if (mod && key.toLowerCase() === "x") {
    justCut = copySelection(true);
  } else if (mod && key.toLowerCase() === "v") {
    // The paste event, when the browser fires one, comes first and cancels this.
    pasteTimer = setTimeout(() => {
      pasteTimer = null;
      if (clipboard) paste(clipboard);
    }, 0);
  } else if (key === "Delete" || key === "Backspace") {
    event.preventDefault();
    deleteSelection();
  } else if (key === "?") {
    event.preventDefault();
    openHelp();
  } else if (key === "Escape") {
    selectOnly([]);
  } else if (!mod && (key === "f" || key === "F")) {
    flow?.fitView({ padding: 0.2, maxZoom: 1 });
  } else if (!mod && (key === "+" || key === "=")) {
    flow?.zoomIn();
  } else if (!mod && key === "-") {
    flow?.zoomOut();
  } else if (key.startsWith("Arrow") && event.target.closest?.(".react-flow__node") && Date.now() - lastArrowCheckpoint > 800) {
    checkpoint(); // a run of arrow presses is one undo step (React Flow moves the nodes)
    lastArrowCheckpoint = Date.now();
  }
}

const onCanvasPage = (event) => section && !section.hidden && !typing(event.target) && !$("#wf-canvas-view").hidden;

function onCopy(event) {
  if (!onCanvasPage(event)) return;
  const frag = fragment();
  if (frag.nodes.length) {
    clipboard = frag;
    event.clipboardData?.setData("text/plain", JSON.stringify(frag, null, 2));
    event.preventDefault();
  }
}

function onCut(event) {
  if (!onCanvasPage(event)) return;
  const frag = justCut || copySelection(true); // Ctrl+X has cut already; a menu's Cut has not
  justCut = null;
  if (frag) {
    event.clipboardData?.setData("text/plain", JSON.stringify(frag, null, 2));
    event.preventDefault();
  }
}

function onPaste(event) {
  if (!onCanvasPage(event)) return;
  clearTimeout(pasteTimer);
  pasteTimer = null;
  const text = event.clipboardData?.getData("text/plain") || "";
  event.preventDefault();
  if (!text.trim()) {
    if (clipboard) paste(clipboard);
    return;
  }
  const { doc, error } = parseWorkflow(text);
  if (error) say(`Paste: ${error}`, "error");
  else paste(doc);
}

// --- side panels: palette, node list, connect form, inspector ----------------------------------------

function renderPalette() {
  const items = Object.entries(catalogue).map(([type, spec]) => {
    const ports = (o) => Object.entries(o || {}).map(([n, p]) => `${n}: ${typeof p === "string" ? p : p.type}`).join(", ");
    return el("button", {
      type: "button", class: "wf-palette-item", draggable: "true", dataset: { type },
      title: `${spec.description}${Object.keys(spec.inputs || {}).length ? `\nin: ${ports(spec.inputs)}` : ""}${Object.keys(spec.outputs || {}).length ? `\nout: ${ports(spec.outputs)}` : ""}`,
      "aria-label": `Add ${type}: ${spec.description}`,
      ondragstart: (event) => {
        event.dataTransfer.setData("application/x-atelier-node", type);
        event.dataTransfer.effectAllowed = "copy";
      },
      onclick: () => addNode(type),
    }, el("strong", {}, type), el("small", { class: "muted" }, spec.description));
  });
  $("#wf-palette").replaceChildren(...items);
}

function renderNodeList() {
  const list = $("#wf-node-list");
  const wf = nodes.filter(isWorkflowNode);
  if (!wf.length) {
    list.replaceChildren(el("li", { class: "muted" }, "No nodes yet: add one above."));
    return;
  }
  list.replaceChildren(...wf.map((n) => {
    const status = n.data.status || "";
    const pct = status === "completed" || status === "cached" ? 100 : Math.round(n.data.progress || 0);
    const box = el("input", { type: "checkbox", id: `wf-sel-${n.id}`, checked: Boolean(n.selected),
      "aria-label": `Select ${n.id}`, onchange: (e) => {
        nodes = nodes.map((x) => (x.id === n.id ? { ...x, selected: e.target.checked } : x));
        refresh();
      } });
    return el("li", { dataset: { node: n.id, status: status || "idle" }, class: n.data.issues?.length ? "has-issues" : "" },
      box,
      el("button", { type: "button", class: "link", onclick: () => focusNode(n.id) }, el("code", {}, n.id)),
      el("span", { class: "muted" }, n.data.nodeType),
      status ? el("span", { class: `badge ${status}` }, `${status} ${pct}%`) : null,
      n.data.issues?.length ? el("span", { class: "error-text" }, `${n.data.issues.length} problem${n.data.issues.length === 1 ? "" : "s"}`) : null);
  }));
}

function focusNode(id) {
  selectOnly([id]);
  const n = nodeById(id);
  if (n && flow) {
    flow.setCenter(n.position.x + (n.measured?.width ?? DEFAULT_SIZE.width) / 2,
      n.position.y + (n.measured?.height ?? DEFAULT_SIZE.height) / 2, { zoom: Math.max(flow.getZoom(), 0.8) });
  }
  $("#wf-inspector").querySelector("input, textarea, select")?.focus();
}

function renderConnect() {
  const from = $("#wf-connect-from");
  const to = $("#wf-connect-to");
  const keepFrom = from.value;
  const keepTo = to.value;
  const wf = nodes.filter(isWorkflowNode).map(decorate);
  from.replaceChildren(...wf.flatMap((n) => n.data.outputs.map((p) =>
    el("option", { value: `${n.id}.${p.name}` }, `${n.id}.${p.name} (${p.type})`))));
  to.replaceChildren(...wf.flatMap((n) => n.data.inputs.map((p) =>
    el("option", { value: `${n.id}.${p.name}` }, `${n.id}.${p.name} (${p.type})`))));
  if ([...from.options].some((o) => o.value === keepFrom)) from.value = keepFrom;
  if ([...to.options].some((o) => o.value === keepTo)) to.value = keepTo;
  $("#wf-edge-list").replaceChildren(...(edges.length ? edges.map((e) => el("li", { dataset: { edge: e.id } },
    el("code", {}, `${e.source}.${e.sourceHandle} → ${e.target}.${e.targetHandle}`),
    el("button", { type: "button", class: "small", "aria-label": `Remove ${e.source}.${e.sourceHandle} to ${e.target}.${e.targetHandle}`,
      onclick: () => commit(() => { edges = edges.filter((x) => x.id !== e.id); }) }, "Remove")))
    : [el("li", { class: "muted" }, "No connections.")]));
}

function connectFromForm(event) {
  event.preventDefault();
  const [source, sourcePort] = ($("#wf-connect-from").value || "").split(".");
  const [target, targetPort] = ($("#wf-connect-to").value || "").split(".");
  if (!source || !target) {
    say("Choose an output and an input to connect.", "error");
    return;
  }
  connect(source, sourcePort, target, targetPort);
}

function renderInspector() {
  const box = $("#wf-inspector");
  const chosen = selectedNodes();
  if (editingParams && chosen.length === 1 && box.dataset.node === chosen[0].id) {
    showFieldIssues(box, chosen[0].data.issues || []); // keep the fields (and the focus) while typing
    return;
  }
  box.dataset.node = chosen.length === 1 ? chosen[0].id : "";
  if (chosen.length !== 1) {
    box.replaceChildren(el("p", { class: "muted" }, chosen.length
      ? `${chosen.length} items selected: move them together, copy, group or delete them.`
      : "Select a node on the canvas (or in the list below) to edit its params."));
    return;
  }
  const node = chosen[0];
  if (node.type === "group" || node.type === "comment") {
    const key = node.type === "group" ? "title" : "text";
    const input = el(node.type === "group" ? "input" : "textarea", { id: "wf-ui-text", type: "text", rows: "3" });
    input.value = node.data[key] || "";
    input.addEventListener("focus", () => checkpoint());
    input.addEventListener("input", () => {
      setData(node.id, { [key]: input.value });
      canvas.render();
    });
    box.replaceChildren(el("div", { class: "form" },
      el("div", { class: "field" }, el("label", { for: "wf-ui-text" }, node.type === "group" ? "Group title" : "Comment"), input)));
    return;
  }
  const spec = catalogue?.[node.data.nodeType];
  const idInput = el("input", { id: "wf-node-id", type: "text", maxlength: "64", value: node.id, spellcheck: "false" });
  idInput.addEventListener("change", () => {
    if (!renameNode(node.id, idInput.value.trim())) idInput.value = node.id;
  });
  const parts = [
    el("div", { class: "field" }, el("label", { for: "wf-node-id" }, "Node id"), idInput),
    el("p", {}, el("strong", {}, node.data.nodeType), spec ? ` — ${spec.description}` : ""),
  ];
  if (!spec) {
    parts.push(el("p", { class: "error-text" }, `Unknown node type: this server does not know “${node.data.nodeType}”. ` +
      "Its params are kept as they are; replace or remove the node to run the workflow."),
    el("pre", { class: "code" }, JSON.stringify(node.data.params, null, 2)));
  } else {
    const onChange = (name, value) => {
      if (editingParams !== name) checkpoint(); // one undo step per field edited
      editingParams = name;
      const params = { ...nodeById(node.id).data.params };
      if (value === undefined) delete params[name];
      else params[name] = value;
      setData(node.id, { params });
      canvas.render();
    };
    const form = el("div", { class: "form wf-params", onfocusout: (e) => {
      if (!e.currentTarget.contains(e.relatedTarget)) {
        editingParams = false;
        refresh();
      }
    } }, ...paramsForm(spec.params, node.data.params, onChange));
    const cache = el("input", { id: "wf-node-cache", type: "checkbox", checked: node.data.cache !== false,
      onchange: (e) => commit(() => setData(node.id, { cache: e.target.checked })) });
    parts.push(form, el("div", { class: "check" }, cache, el("label", { for: "wf-node-cache" }, "Reuse a cached result when inputs and params match")));
  }
  const rest = el("ul", { id: "wf-node-issues", class: "error-text" });
  parts.push(rest);
  box.replaceChildren(...parts);
  const others = showFieldIssues(box, node.data.issues || []);
  rest.replaceChildren(...others.map((i) => el("li", {}, i.field ? [el("code", {}, i.field), `: ${i.message}`] : i.message)));
}

// --- JSON view, import, export ----------------------------------------------------------------------

function setView(which) {
  const json = which === "json";
  if (json) $("#wf-editor").value = JSON.stringify(toDocument(), null, 2);
  $("#wf-canvas-view").hidden = json;
  $("#wf-json-view").hidden = !json;
  $("#wf-tab-canvas").setAttribute("aria-selected", String(!json));
  $("#wf-tab-json").setAttribute("aria-selected", String(json));
  if (!json) requestAnimationFrame(() => canvas?.render());
}

/** Apply the JSON view's text to the canvas; false (and a message) if it is not a workflow. */
function applyJson() {
  const { doc, error } = parseWorkflow($("#wf-editor").value);
  if (error) {
    say(error, "error");
    showIssues([{ node: null, field: null, message: error }]);
    return false;
  }
  say("The JSON is on the canvas.", "ok");
  loadDocument(doc, { meta: { savedId: meta.savedId, savedVersion: meta.savedVersion } });
  return true;
}

async function importFile(event) {
  const file = event.target.files?.[0];
  event.target.value = "";
  if (!file) return;
  const { doc, error } = parseWorkflow(await file.text());
  if (error) {
    say(`${file.name}: ${error}`, "error");
    return;
  }
  say(`Imported ${file.name}.`, "ok");
  loadDocument(doc, { meta: { savedId: null, savedVersion: null } });
}

function exportFile() {
  const doc = toDocument();
  const blob = new Blob([JSON.stringify(doc, null, 2)], { type: "application/json" });
  const url = URL.createObjectURL(blob);
  const link = el("a", { href: url, download: `${(meta.name || "workflow").replace(/[^\w.-]+/g, "_")}.json` });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

/** Bring the canvas into view (after opening a workflow from the lists below it). */
function showCanvas() {
  $(".wf-main").scrollIntoView({ block: "nearest" });
}

function openHelp() {
  const dialog = $("#wf-help");
  if (!dialog.open) dialog.showModal();
}

// --- validation, runs ---------------------------------------------------------------------------------

/** The document to send: the JSON view's text when it is shown (null if that is not a workflow). */
function currentDocument() {
  if (!$("#wf-json-view").hidden && !applyJson()) return null;
  return toDocument();
}

/** Put the server's problems on the nodes and fields they name; the rest above the run panel. */
function showIssues(issues, order = null) {
  workflowIssues = issues;
  const byNode = {};
  for (const issue of issues) if (issue.node && nodeById(issue.node)) (byNode[issue.node] ||= []).push(issue);
  nodes = nodes.map((n) => (isWorkflowNode(n) && (byNode[n.id] || n.data.issues)
    ? { ...n, data: { ...n.data, issues: byNode[n.id] || undefined } } : n));
  refresh();
  renderIssues(order);
}

function renderIssues(order = null) {
  const box = $("#wf-errors");
  if (!workflowIssues.length && order === null) {
    box.hidden = true;
    return;
  }
  box.hidden = false;
  if (!workflowIssues.length) {
    box.className = "ok";
    box.replaceChildren(el("strong", {}, "valid"), order?.length ? ` — runs in this order: ${order.join(" → ")}` : "");
    return;
  }
  box.className = "error";
  box.replaceChildren(el("p", {}, `${workflowIssues.length} problem${workflowIssues.length === 1 ? "" : "s"}:`),
    el("ul", {}, ...workflowIssues.map((i) => el("li", {},
      i.node && nodeById(i.node)
        ? el("button", { type: "button", class: "link", onclick: () => focusNode(i.node) }, el("code", {}, `node ${i.node}`))
        : el("code", {}, i.node ? `node ${i.node}` : "workflow"),
      i.field ? [" · ", el("code", {}, i.field)] : "", `: ${i.message}`))));
}

async function validate() {
  clearError($("#wf-error"));
  const doc = currentDocument();
  if (!doc) return;
  try {
    const report = await api("POST", "/v1/workflows/validate", { json: doc });
    showIssues(report.valid ? [] : report.errors, report.order);
    say(report.valid ? "The workflow is valid." : `${report.errors.length} problem(s): see the marked nodes.`, report.valid ? "ok" : "error");
  } catch (err) {
    showError($("#wf-error"), err);
  }
}

function clearRuntime() {
  nodes = nodes.map((n) => (isWorkflowNode(n) ? stripped(n) : n));
}

/** Node states from the job (job.result.nodes) onto the canvas, and what judging nodes reported. */
function applyJob(job) {
  const states = job?.result?.nodes || {};
  for (const [id, s] of Object.entries(states)) {
    if (!nodeById(id)) continue;
    const judged = judgedOf(s);
    setData(id, { status: s.status, progress: s.progress, error: s.error || undefined,
      judged: judged ? judged.rows.map((r) => ({ label: r.label, score: r.score, best: r.best })) : undefined });
  }
  section.dataset.job = job.id;
  section.dataset.jobStatus = job.status;
  renderJudged(states);
  refresh();
}

/**
 * What a judging node reported on its state (`info`, written as it runs): a QA loop's rounds
 * (prompt, seed, score, reasons, defects per round), text_to_image's best-of candidates, or a
 * judge's ranking. A node served from the cache has no info: its outputs hold the same lists.
 */
function judgedOf(state) {
  const info = state.info || {};
  const rounds = info.rounds || state.outputs?.rounds;
  if (rounds) {
    return { kind: "rounds", info, rows: rounds.map((r) => ({ ...r, label: `round ${r.round}`,
      best: info.best_round ? r.round === info.best_round : false })) };
  }
  if (info.candidates) {
    return { kind: "candidates", info, rows: info.candidates.map((c) => ({ ...c, label: `candidate ${c.index + 1}`,
      best: c.chosen })) };
  }
  const ranking = info.judged || state.outputs?.scores;
  if (ranking) return { kind: "ranking", info, rows: ranking.map((j) => ({ ...j, label: `#${j.rank + 1}`, best: false })) };
  return null;
}

function judgedTitle(id, { kind, info, rows }) {
  if (kind === "rounds") {
    const goal = info.threshold !== undefined ? ` (goal ${info.threshold} of 10)` : "";
    const end = info.stopped === "threshold" ? `: reached the goal in round ${rows.length}`
      : info.stopped === "max_rounds" ? `: stopped after ${rows.length} rounds, the best kept` : ": running…";
    return `QA loop ${id}${goal}${end}`;
  }
  if (kind === "candidates") return `Best of ${rows.length}, node ${id}: ${rows.filter((r) => r.best).length} kept`;
  return `Judge ${id}: ${rows.length} images ranked`;
}

/** One table per judging node, below the outputs; redrawn only when a row is added. */
function renderJudged(states) {
  const box = $("#wf-judged");
  const parts = Object.entries(states).map(([id, s]) => [id, judgedOf(s)]).filter(([, j]) => j);
  const signature = JSON.stringify(parts.map(([id, j]) => [id, j.rows.length, j.info.stopped || null]));
  if (box.dataset.signature === signature) return;
  box.dataset.signature = signature;
  revokeBlobs(box);
  box.hidden = !parts.length;
  box.replaceChildren(...parts.map(([id, judged]) => {
    const rounds = judged.kind === "rounds";
    const head = ["", "Image", "Seed", "Score", "Reasons", "Defects", ...(rounds ? ["Prompt"] : [])];
    const body = judged.rows.map((r) => {
      const img = el("img", { alt: `${id} ${r.label}`, width: 64, height: 64, loading: "lazy" });
      if (r.image) setMedia(img, new URL(`/v1/files/${r.image}`, location.href).href);
      return el("tr", { class: r.best ? "best" : "", dataset: { score: String(r.score) } },
        el("th", { scope: "row" }, r.label, r.best ? el("strong", {}, rounds ? " (best)" : " (kept)") : null),
        el("td", {}, r.image ? img : "–"),
        el("td", { class: "num" }, r.seed ?? "–"),
        el("td", { class: "num" }, `${r.score}/10`),
        el("td", {}, (r.reasons || []).join("; ")),
        el("td", {}, (r.defects || []).join("; ") || "none"),
        ...(rounds ? [el("td", { class: "cause" }, r.prompt || "", r.refine_warning ? el("small", { class: "muted" }, ` (${r.refine_warning})`) : null)] : []));
    });
    return el("section", { class: "panel", dataset: { node: id, kind: judged.kind } },
      el("h3", {}, judgedTitle(id, judged)),
      el("div", { class: "table-wrap" }, el("table", {},
        el("thead", {}, el("tr", {}, ...head.map((h) => el("th", { scope: "col" }, h)))),
        el("tbody", {}, ...body))));
  }));
}

/** The job's outputs on their output nodes (and in the grid below). */
function applyOutputs(job) {
  const shown = (job.outputs || []).filter((o) => o.extra?.role !== "thumbnail" && /^(image|video)\//.test(o.content_type));
  const byNode = {};
  for (const o of shown) if (o.extra?.node) (byNode[o.extra.node] ||= []).push(o);
  for (const [id, outputs] of Object.entries(byNode)) {
    if (!nodeById(id)) continue;
    const media = outputs.map((o) => ({ url: o.url, video: o.content_type.startsWith("video/"), width: o.width, height: o.height,
      src: getKey() ? null : o.url }));
    setData(id, { media });
    if (getKey()) {
      media.forEach(async (item, i) => {
        try {
          const src = await mediaUrl(item.url);
          const current = nodeById(id)?.data.media;
          if (current?.[i]) {
            setData(id, { media: current.map((m, k) => (k === i ? { ...m, src } : m)) });
            canvas.render();
          }
        } catch { /* the grid below says it in words */ }
      });
    }
  }
  refresh();
  renderGrid($("#wf-outputs"), shown);
  [...$("#wf-outputs").children].forEach((figure, i) => {
    figure.querySelector("figcaption .muted")?.prepend(`${shown[i].extra?.name || ""} `);
  });
}

async function run() {
  clearError($("#wf-error"));
  const doc = currentDocument();
  if (!doc) return;
  clearRuntime();
  workflowIssues = [];
  renderIssues();
  $("#wf-outputs").replaceChildren();
  renderJudged({});
  for (const n of nodes.filter(isWorkflowNode)) setData(n.id, { status: "pending", progress: 0 });
  refresh();
  const start = async () => {
    try {
      return await api("POST", "/v1/workflows/runs", { json: { workflow: doc } });
    } catch (err) {
      clearRuntime();
      if (!err.errors) throw err;
      showIssues(err.errors); // every problem, on its node
      throw new Error(`The workflow was refused: ${err.errors.length} problem(s), marked on the nodes.`);
    }
  };
  const job = await runJob("wf", start, { submit: $("#wf-run"), onUpdate: applyJob });
  if (job) {
    applyJob(job);
    applyOutputs(job);
    say(`The run ${job.status === "completed" ? "finished" : job.status}.`, job.status === "completed" ? "ok" : "error");
  }
}

/** A finished run (from the gallery) back on the canvas, with its node states and outputs. */
async function openJob(jobId) {
  clearError($("#wf-error"));
  try {
    const job = await api("GET", `/v1/jobs/${encodeURIComponent(jobId)}`);
    const doc = job.params?.workflow;
    if (!doc || notAWorkflow(doc)) {
      showError($("#wf-error"), `Job ${jobId} is not a workflow run.`);
      return;
    }
    const saved = job.result?.workflow;
    say(`Opened run ${jobId} (${job.status}).`, "ok");
    loadDocument(doc, { meta: { savedId: saved?.id || null, savedVersion: saved?.version || null, name: saved?.name || doc.name || "" } });
    applyJob(job);
    applyOutputs(job);
  } catch (err) {
    showError($("#wf-error"), err);
  }
}

// --- saved workflows, templates ---------------------------------------------------------------------

async function save(asNew) {
  clearError($("#wf-error"));
  const doc = currentDocument();
  if (!doc) return;
  const name = $("#wf-name").value.trim();
  if (!name) {
    showError($("#wf-error"), "Give the workflow a name to save it.");
    $("#wf-name").focus();
    return;
  }
  meta.name = name;
  doc.name = name;
  const body = { name, description: meta.description || "", workflow: doc };
  try {
    const saved = asNew || !meta.savedId
      ? await api("POST", "/v1/workflows", { json: body })
      : await api("PUT", `/v1/workflows/${encodeURIComponent(meta.savedId)}`, { json: body });
    meta.savedId = saved.id;
    meta.savedVersion = saved.version;
    showIssues([]);
    $("#wf-saved-as").textContent = `Saved as ${saved.name} (${saved.id}, version ${saved.version}).`;
    say(`Saved ${saved.name}, version ${saved.version}.`, "ok");
    loadSaved();
  } catch (err) {
    if (err.errors) showIssues(err.errors);
    showError($("#wf-error"), err);
  }
}

async function openSaved(id, version) {
  clearError($("#wf-error"));
  try {
    const w = await api("GET", `/v1/workflows/${encodeURIComponent(id)}`, { query: { version } });
    $("#wf-saved-as").textContent = `Opened ${w.name} (${w.id}, version ${w.version}).`;
    say(`Opened ${w.name}, version ${w.version}.`, "ok");
    loadDocument(w.workflow, { meta: { savedId: w.id, savedVersion: w.version, name: w.name, description: w.description } });
    showCanvas();
  } catch (err) {
    showError($("#wf-error"), err);
  }
}

async function loadSaved() {
  const list = $("#wf-saved");
  try {
    const { data } = await api("GET", "/v1/workflows");
    list.replaceChildren(...(data.length ? data.map((w) => {
      const versions = el("select", { "aria-label": `Version of ${w.name}`, class: "small" },
        ...Array.from({ length: w.version }, (_, i) => w.version - i).map((v) => el("option", { value: String(v) }, `v${v}`)));
      return el("li", { dataset: { workflow: w.id } },
        el("span", {}, el("strong", {}, w.name), " ", el("code", { class: "muted" }, w.id)),
        el("span", { class: "actions" }, versions,
          el("button", { type: "button", class: "wf-open", onclick: () => openSaved(w.id, versions.value) }, "Open")));
    }) : [el("li", { class: "muted" }, "None saved yet.")]));
  } catch (err) {
    showError($("#wf-error"), err);
  }
}

async function loadTemplates() {
  const list = $("#wf-templates");
  try {
    const { data } = await api("GET", "/v1/workflows/templates");
    list.replaceChildren(...data.map((t) => el("li", { dataset: { template: t.id } },
      el("span", {}, el("strong", {}, t.name), el("br"), el("small", { class: "muted" },
        t.available ? t.description : `needs ${t.requires.join(", ")}, which this server does not deploy`)),
      el("button", { type: "button", class: "wf-open", onclick: () => {
        say(`Opened the template ${t.name}.`, "ok");
        loadDocument(t.workflow, { meta: { savedId: null, savedVersion: null } });
        showCanvas();
      } }, "Open"))));
  } catch (err) {
    showError($("#wf-error"), err);
  }
}
