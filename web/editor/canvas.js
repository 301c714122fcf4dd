// The node canvas: React Flow (@xyflow/react, bundled into ../vendor/xyflow.js by `make web`)
// drawn from the page's state. This module only renders; the page (pages/workflows.js) owns the
// document, undo, runs and saving, and React Flow's changes come back to it through `ctl`.
// No JSX (the UI has no build step of its own): `h` is React.createElement.

import {
  Background, Controls, Handle, MiniMap, NodeResizer, Position, ReactFlow, createElement as h, createRoot, memo,
} from "../vendor/xyflow.js";

export { applyEdgeChanges, applyNodeChanges } from "../vendor/xyflow.js";

const STATUS_TEXT = { idle: "", pending: "pending", running: "running", completed: "completed", cached: "cached",
  failed: "failed", cancelled: "cancelled" };

function Port({ port, kind }) {
  const target = kind === "in";
  return h("div", { className: `wf-port ${kind}`, "data-port": port.name, "data-port-type": port.type },
    h(Handle, {
      type: target ? "target" : "source", position: target ? Position.Left : Position.Right, id: port.name,
      className: `port-${port.type}`, title: `${port.name}: ${port.type}${port.required === false ? " (optional)" : ""}`,
      "aria-label": `${target ? "input" : "output"} ${port.name} (${port.type})`,
    }),
    h("span", { className: "wf-port-name" }, port.name, port.required === false ? "?" : ""),
    h("small", { className: "wf-port-type" }, port.type));
}

function Media({ item, label }) {
  if (!item.src) return h("p", { className: "muted" }, "loading…");
  if (item.video) {
    return h("video", { src: item.src, controls: true, muted: true, loop: true, playsInline: true,
      "aria-label": label, className: "nodrag" });
  }
  return h("img", { src: item.src, alt: label, width: item.width || undefined, height: item.height || undefined });
}

/** A workflow node: title, ports with their types, param summary, run status, scores, problems, media. */
const AtelierNode = memo(function AtelierNode({ id, data }) {
  const status = data.status || "idle";
  const pct = status === "completed" || status === "cached" ? 100 : Math.round(data.progress || 0);
  const classes = ["wf-node", `status-${status}`, data.unknown ? "unknown" : "", data.issues?.length ? "has-issues" : ""];
  return h("div", { className: classes.filter(Boolean).join(" "), "data-status": status, "data-type": data.nodeType },
    h("div", { className: "wf-node-head" },
      h("strong", { className: "wf-node-id" }, id),
      h("span", { className: "wf-node-type" }, data.nodeType),
      status !== "idle" ? h("span", { className: `badge ${status}`, "data-role": "status" }, STATUS_TEXT[status] || status) : null),
    data.unknown
      ? h("p", { className: "wf-node-warn", role: "note" },
        `Unknown node type “${data.nodeType}”: this server does not know it. Replace or remove it to run.`)
      : null,
    data.inputs.length || data.outputs.length
      ? h("div", { className: "wf-ports" },
        h("div", { className: "wf-ins" }, data.inputs.map((p) => h(Port, { key: p.name, port: p, kind: "in" }))),
        h("div", { className: "wf-outs" }, data.outputs.map((p) => h(Port, { key: p.name, port: p, kind: "out" }))))
      : null,
    data.summary?.length
      ? h("dl", { className: "wf-node-params" }, data.summary.flatMap(([k, v]) => [h("dt", { key: `k${k}` }, k), h("dd", { key: `v${k}` }, v)]))
      : null,
    status !== "idle"
      ? h("div", { className: "wf-node-progress" },
        h("progress", { max: 100, value: pct, "aria-label": `${id} progress` }),
        h("span", { className: "wf-node-pct" }, `${pct}%`))
      : null,
    data.error ? h("p", { className: "wf-node-error" }, data.error) : null,
    data.judged?.length
      ? h("ol", { className: "wf-node-judged", "aria-label": `${id} scores` },
        data.judged.map((row, i) => h("li", { key: i, className: row.best ? "best" : "", "data-score": row.score },
          `${row.label}: ${row.score}/10${row.best ? " ★" : ""}`)))
      : null,
    data.issues?.length
      ? h("ul", { className: "wf-node-issues", role: "list" },
        data.issues.map((issue, i) => h("li", { key: i, "data-field": issue.field || "" },
          issue.field ? [h("code", { key: "f" }, issue.field), `: ${issue.message}`] : issue.message)))
      : null,
    data.media?.length
      ? h("div", { className: "wf-node-media" }, data.media.map((item, i) => h(Media, { key: i, item, label: `${id} output ${i + 1}` })))
      : null);
});

/** A group: a titled, resizable frame; dragging it moves the nodes inside. */
const GroupNode = memo(function GroupNode({ data, selected }) {
  return h("div", { className: "wf-group" },
    h(NodeResizer, { isVisible: selected, minWidth: 160, minHeight: 100 }),
    h("div", { className: "wf-group-title" }, data.title || "group"));
});

/** A comment: a note on the canvas. */
const CommentNode = memo(function CommentNode({ data }) {
  return h("div", { className: "wf-comment" }, data.text || "(empty comment)");
});

const NODE_TYPES = { atelier: AtelierNode, group: GroupNode, comment: CommentNode };

/**
 * Mount React Flow into `container`. `ctl` gives the state (nodes(), edges()) and takes its
 * events. Returns {render()}, called by the page after every change of its state.
 */
export function mountCanvas(container, ctl) {
  const root = createRoot(container);
  const onDragOver = (event) => {
    if (event.dataTransfer.types.includes("application/x-atelier-node")) {
      event.preventDefault();
      event.dataTransfer.dropEffect = "copy";
    }
  };
  const onDrop = (event) => {
    const type = event.dataTransfer.getData("application/x-atelier-node");
    if (!type) return;
    event.preventDefault();
    ctl.onDropType(type, { x: event.clientX, y: event.clientY });
  };
  const render = () => {
    root.render(h(ReactFlow, {
      nodes: ctl.nodes(),
      edges: ctl.edges(),
      nodeTypes: NODE_TYPES,
      onNodesChange: ctl.onNodesChange,
      onEdgesChange: ctl.onEdgesChange,
      onConnect: ctl.onConnect,
      onConnectEnd: ctl.onConnectEnd,
      isValidConnection: ctl.isValidConnection,
      onNodeDragStart: ctl.onNodeDragStart,
      onNodeDragStop: ctl.onNodeDragStop,
      onSelectionDragStart: ctl.onNodeDragStart,
      onInit: ctl.onInit,
      onMoveEnd: ctl.onMoveEnd,
      onDragOver,
      onDrop,
      deleteKeyCode: null, // the page deletes (with undo), from the keyboard and its buttons
      selectionKeyCode: "Shift",
      multiSelectionKeyCode: ["Meta", "Control"],
      minZoom: 0.15,
      maxZoom: 2.5,
      snapToGrid: false,
      elevateNodesOnSelect: false, // a selected group stays behind its nodes
      "aria-label": "Workflow canvas",
    },
    h(Background, { gap: 20, size: 1 }),
    h(MiniMap, { pannable: true, zoomable: true, ariaLabel: "Minimap of the workflow",
      nodeClassName: (node) => (node.type === "atelier" ? `mini-${node.data.status || "idle"}` : `mini-${node.type}`) }),
    h(Controls, { showInteractive: false })));
  };
  render();
  return { render };
}
