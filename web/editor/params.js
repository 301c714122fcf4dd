// Param forms generated from a node type's JSON Schema (from GET /v1/workflows/schema): enums as
// selects, numbers with their bounds, prompts and long text as text areas, booleans as checkboxes.
// An empty field leaves the param out, so the server's (or the model's) default applies.

import { el } from "../ui.js";
import { choicesOf, plainSchema } from "./graph.js";

const LONG_TEXT = new Set(["text", "prompt", "negative_prompt"]);

/** The value a field holds, typed by its schema; undefined when empty. */
function valueOf(input, schema) {
  if (input.type === "checkbox") return input.checked;
  const raw = input.value;
  if (raw === "") return undefined;
  const choices = choicesOf(schema);
  if (choices) return choices.find((c) => String(c) === raw);
  if (schema.type === "integer" || schema.type === "number") {
    const n = Number(raw);
    return Number.isFinite(n) ? n : raw; // a non-number goes to the server, which names the field
  }
  return raw;
}

function hintOf(name, schema, nullable, required) {
  const parts = [];
  if (schema.description) parts.push(schema.description);
  const low = schema.minimum ?? (schema.exclusiveMinimum !== undefined ? `>${schema.exclusiveMinimum}` : undefined);
  const high = schema.maximum ?? (schema.exclusiveMaximum !== undefined ? `<${schema.exclusiveMaximum}` : undefined);
  if (low !== undefined || high !== undefined) parts.push(`${low ?? "…"} to ${high ?? "…"}`);
  if (schema.maxLength && !LONG_TEXT.has(name)) parts.push(`up to ${schema.maxLength} characters`);
  if (schema.default !== undefined && schema.default !== null) parts.push(`default ${schema.default}`);
  else if (nullable || !required) parts.push("empty: the model's default");
  return parts.join(" · ");
}

/**
 * A form for `params` under `paramsSchema`. `onChange(name, value)` is called on every edit
 * (value undefined: the param is removed). Each field's id is `${prefix}-${name}`, and its error
 * line `${prefix}-${name}-error`, which `showFieldIssues` fills.
 */
export function paramsForm(paramsSchema, params, onChange, prefix = "wf-param") {
  const properties = paramsSchema?.properties || {};
  const required = new Set(paramsSchema?.required || []);
  const fields = [];
  for (const [name, raw] of Object.entries(properties)) {
    const { schema, nullable } = plainSchema(raw);
    const id = `${prefix}-${name}`;
    const current = params[name];
    const choices = choicesOf(schema);
    let input;
    if (choices) {
      input = el("select", { id },
        required.has(name) && schema.default === undefined ? null
          : el("option", { value: "" }, schema.default !== undefined && schema.default !== null ? `default (${schema.default})` : "default"),
        ...choices.map((c) => el("option", { value: String(c) }, String(c))));
      input.value = current === undefined || current === null ? "" : String(current);
    } else if (schema.type === "boolean") {
      input = el("input", { id, type: "checkbox" });
      input.checked = current ?? schema.default ?? false;
    } else if (schema.type === "integer" || schema.type === "number") {
      input = el("input", {
        id, type: "number", inputmode: schema.type === "integer" ? "numeric" : "decimal",
        step: schema.type === "integer" ? "1" : "any",
        min: schema.minimum ?? schema.exclusiveMinimum, max: schema.maximum ?? schema.exclusiveMaximum,
        placeholder: schema.default ?? "default",
      });
      input.value = current === undefined || current === null ? "" : String(current);
    } else if (LONG_TEXT.has(name) || (schema.maxLength || 0) > 300) {
      input = el("textarea", { id, rows: "3", maxlength: schema.maxLength, spellcheck: "true" });
      input.value = current ?? "";
    } else {
      input = el("input", { id, type: "text", maxlength: schema.maxLength, placeholder: schema.default ?? "", spellcheck: "false" });
      input.value = current ?? "";
    }
    input.dataset.param = name;
    const error = el("small", { id: `${id}-error`, class: "field-error", hidden: true });
    input.setAttribute("aria-describedby", `${id}-hint ${id}-error`);
    const event = input.tagName === "SELECT" || input.type === "checkbox" ? "change" : "input";
    input.addEventListener(event, () => onChange(name, valueOf(input, schema)));
    fields.push(el("div", { class: "field", dataset: { param: name } },
      el("label", { for: id }, `${schema.title || name}${required.has(name) ? " *" : ""}`),
      input,
      el("small", { id: `${id}-hint`, class: "muted" }, hintOf(name, schema, nullable, required.has(name))),
      error));
  }
  return fields.length ? fields : [el("p", { class: "muted" }, "This node type has no params.")];
}

/** Put the server's problems (field "params.<name>") under their fields; the rest are returned. */
export function showFieldIssues(container, issues, prefix = "wf-param") {
  for (const box of container.querySelectorAll(".field-error")) {
    box.hidden = true;
    box.textContent = "";
  }
  for (const input of container.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
  const rest = [];
  for (const issue of issues || []) {
    const name = issue.field?.startsWith("params.") ? issue.field.slice(7).split(".")[0] : null;
    const box = name ? container.querySelector(`#${CSS.escape(`${prefix}-${name}-error`)}`) : null;
    if (!box) {
      rest.push(issue);
      continue;
    }
    box.textContent = box.textContent ? `${box.textContent}; ${issue.message}` : issue.message;
    box.hidden = false;
    container.querySelector(`#${CSS.escape(`${prefix}-${name}`)}`)?.setAttribute("aria-invalid", "true");
  }
  return rest;
}
