// The workflow editor's document logic, with no DOM and no React: is a JSON value a workflow,
// which ports fit, where nodes go when a workflow has no layout, and the `ui` block.
//
// A workflow is the engine's document (graphs/workflows.py): {name, description, nodes: [{id,
// type, params, cache}], edges: [{source, source_port, target, target_port}], ui}. The `ui` block
// holds the editor's layout: {positions: {id: {x, y}}, groups: [{id, title, x, y, width, height,
// nodes}], comments: [{id, text, x, y}], viewport: {x, y, zoom}}; the engine ignores it.

export const NODE_ID = /^[A-Za-z0-9_-]{1,64}$/;
const COLUMN = 300; // auto-layout: px between layers
const ROW = 200; // and between the nodes of a layer

/**
 * Why `doc` is not a workflow document, or null if it is one. Only the shape is checked here
 * (what the canvas needs to draw it); the server's validation says whether it can run.
 */
export function notAWorkflow(doc) {
  if (doc === null || typeof doc !== "object" || Array.isArray(doc)) {
    return "it is not a JSON object with nodes and edges";
  }
  if (!Array.isArray(doc.nodes)) return "it has no \"nodes\" list";
  if (doc.edges !== undefined && !Array.isArray(doc.edges)) return "its \"edges\" is not a list";
  if (doc.ui !== undefined && doc.ui !== null && (typeof doc.ui !== "object" || Array.isArray(doc.ui))) {
    return "its \"ui\" block is not an object";
  }
  const ids = new Set();
  for (const [i, node] of doc.nodes.entries()) {
    if (node === null || typeof node !== "object" || Array.isArray(node)) return `node ${i} is not an object`;
    if (typeof node.id !== "string" || !NODE_ID.test(node.id)) {
      return `node ${i} has no valid "id" (letters, digits, _ and -)`;
    }
    if (typeof node.type !== "string" || !node.type) return `node ${node.id} has no "type"`;
    if (node.params !== undefined && (node.params === null || typeof node.params !== "object" || Array.isArray(node.params))) {
      return `node ${node.id}'s "params" is not an object`;
    }
    if (ids.has(node.id)) return `two nodes have the id ${node.id}`;
    ids.add(node.id);
  }
  for (const [i, edge] of (doc.edges || []).entries()) {
    if (edge === null || typeof edge !== "object") return `edge ${i} is not an object`;
    for (const key of ["source", "source_port", "target", "target_port"]) {
      if (typeof edge[key] !== "string") return `edge ${i} has no "${key}"`;
    }
  }
  return null;
}

/** Parse text as a workflow: {doc} or {error} in words. */
export function parseWorkflow(text) {
  let doc;
  try {
    doc = JSON.parse(text);
  } catch (err) {
    return { error: `This is not JSON: ${err.message}` };
  }
  const why = notAWorkflow(doc);
  return why ? { error: `This is not a workflow: ${why}. Nothing was changed.` } : { doc };
}

/** The input port spec {type, required} of a node type, or null. */
export function inputOf(catalogue, type, port) {
  return catalogue?.[type]?.inputs?.[port] || null;
}

/** The output port type of a node type, or null. */
export function outputOf(catalogue, type, port) {
  return catalogue?.[type]?.outputs?.[port] || null;
}

/**
 * Can an edge go from (sourceType.sourcePort) to (targetType.targetPort)? {ok} or {ok: false,
 * reason}. The same rule as the engine's validation: an "any" input takes every type, any other
 * input only its own. Unknown node types are let through (the server will name them).
 */
export function fits(catalogue, sourceType, sourcePort, targetType, targetPort) {
  if (!catalogue?.[sourceType] || !catalogue?.[targetType]) return { ok: true };
  const out = outputOf(catalogue, sourceType, sourcePort);
  const input = inputOf(catalogue, targetType, targetPort);
  if (!out) return { ok: false, reason: `${sourceType} has no output ${sourcePort}` };
  if (!input) return { ok: false, reason: `${targetType} has no input ${targetPort}` };
  if (input.type === "any" || input.type === out) return { ok: true };
  const hint = out === "images" && input.type === "image" ? "; put a select node between them" : "";
  return { ok: false, reason: `${out} does not fit the ${input.type} input ${targetPort}${hint}` };
}

/** Layered positions for nodes that have none: each node one column right of its furthest source. */
export function autoLayout(nodes, edges, known = {}) {
  const depth = {};
  const sources = {};
  for (const e of edges) (sources[e.target] ||= []).push(e.source);
  const visit = (id, trail) => {
    if (depth[id] !== undefined) return depth[id];
    if (trail.has(id)) return 0; // a cycle: the server will say so
    trail.add(id);
    const d = Math.max(-1, ...(sources[id] || []).map((s) => visit(s, trail))) + 1;
    trail.delete(id);
    depth[id] = d;
    return d;
  };
  const rows = {};
  const positions = {};
  for (const node of nodes) {
    if (known[node.id]) {
      positions[node.id] = known[node.id];
      continue;
    }
    const d = visit(node.id, new Set());
    const row = (rows[d] = (rows[d] ?? -1) + 1);
    positions[node.id] = { x: d * COLUMN, y: row * ROW };
  }
  return positions;
}

/** A position {x, y} from a ui block entry, or null when it is not one. */
export function positionOf(value) {
  if (!value || typeof value !== "object") return null;
  const x = Number(value.x);
  const y = Number(value.y);
  return Number.isFinite(x) && Number.isFinite(y) ? { x, y } : null;
}

/** An id not in `taken`: `base`, else base_2, base_3... */
export function freeId(base, taken) {
  const clean = String(base).replace(/[^A-Za-z0-9_-]/g, "_").slice(0, 56) || "node";
  if (!taken.has(clean)) return clean;
  for (let i = 2; ; i++) if (!taken.has(`${clean}_${i}`)) return `${clean}_${i}`;
}

/** The JSON Schema of a param with `null` taken out of an anyOf: {schema, nullable}. */
export function plainSchema(schema) {
  if (Array.isArray(schema?.anyOf)) {
    const rest = schema.anyOf.filter((s) => s.type !== "null");
    const nullable = rest.length < schema.anyOf.length;
    const base = rest.length === 1 ? rest[0] : { anyOf: rest };
    return { schema: { ...base, title: schema.title, description: schema.description ?? base.description, default: schema.default }, nullable };
  }
  return { schema: schema || {}, nullable: false };
}

/** The options of an enum-like schema (enum, or anyOf/oneOf of consts), or null. */
export function choicesOf(schema) {
  if (Array.isArray(schema.enum)) return schema.enum;
  const list = schema.anyOf || schema.oneOf;
  if (Array.isArray(list) && list.length && list.every((s) => "const" in s)) return list.map((s) => s.const);
  return null;
}
