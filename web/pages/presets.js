// Presets: the built-in styles (read-only; a copy can be saved under another name) and the
// caller's own image and video presets, created, edited and deleted over /v1/presets. An image
// preset is a `style` on Generate and Edit; a video preset is a `preset` on /v1/videos. The API
// checks every field; its error is shown next to the field its `param` names.

import { api } from "../api.js";
import { $, alertBox, clearError, el, field, loadModels, numberOf, showError, sizeOptions } from "../ui.js";

// Each field of a preset: its form control's id, and which kinds of preset have it.
const FIELDS = {
  name: { id: "preset-name" },
  kind: { id: "preset-kind" },
  category: { id: "preset-category" },
  description: { id: "preset-description" },
  prompt: { id: "preset-prompt", kind: "image" },
  negative_prompt: { id: "preset-negative", kind: "image" },
  size: { id: "preset-size" },
  steps: { id: "preset-steps", number: true },
  guidance_scale: { id: "preset-guidance", kind: "image", number: true },
  seconds: { id: "preset-seconds", kind: "video", number: true },
  fps: { id: "preset-fps", kind: "video", number: true },
  num_frames: { id: "preset-frames", kind: "video", number: true },
  motion_bucket_id: { id: "preset-motion", kind: "video", number: true },
  noise_aug_strength: { id: "preset-noise", kind: "video", number: true },
};

let editing = null; // the name of the preset in the form when editing, else null (a new one)
let presets = []; // the last GET /v1/presets

export function init(section) {
  const input = (name, attrs = {}) => el("input", { id: FIELDS[name].id, type: "text", ...attrs,
    "aria-describedby": `${FIELDS[name].id}-error` });
  const number = (name, attrs) => input(name, { type: "number", placeholder: "model default", ...attrs });
  // A labelled control with the place for the API's error about it under it.
  const withError = (label, control, hint) => {
    const box = field(label, control, hint);
    box.append(el("small", { id: `${control.id}-error`, class: "field-error", hidden: true }));
    return box;
  };
  const form = el("form", { novalidate: true, id: "preset-form", class: "panel form", onsubmit: save },
    el("h2", { id: "preset-form-title" }, "New preset"),
    el("div", { class: "row" },
      withError("Name", input("name", { maxlength: "64", placeholder: "product-shot", autocomplete: "off" }),
        "Letters, digits, _ . - (the name you pick as style or preset)"),
      withError("Kind", el("select", { id: "preset-kind", onchange: showKind, "aria-describedby": "preset-kind-error" },
        el("option", { value: "image" }, "Image (a style)"), el("option", { value: "video" }, "Video")))),
    el("div", { class: "row" },
      withError("Category", input("category", { maxlength: "64", placeholder: "e.g. portrait, product" })),
      withError("Description", input("description", { maxlength: "500", placeholder: "optional" }))),
    el("fieldset", { id: "preset-image-fields", class: "form" },
      el("legend", {}, "Image settings"),
      withError("Prompt template", el("textarea", { id: "preset-prompt", rows: "3", maxlength: "2000",
        "aria-describedby": "preset-prompt-error", placeholder: "{prompt}, studio lighting, 85mm" }),
      "{prompt} is where the prompt typed on Generate goes."),
      el("div", { class: "row" },
        withError("Negative prompt", input("negative_prompt", { maxlength: "2000", placeholder: "blurry, low quality" })),
        withError("Guidance", number("guidance_scale", { min: "0", max: "30", step: "0.5" })))),
    el("fieldset", { id: "preset-video-fields", class: "form", hidden: true },
      el("legend", {}, "Video settings"),
      el("div", { class: "row three" },
        withError("Seconds", number("seconds", { min: "0", max: "60", step: "0.5" })),
        withError("Frames", number("num_frames", { min: "1", max: "3600", step: "1" }),
          "Instead of seconds; with both, seconds × fps must match."),
        withError("Frames per second", number("fps", { min: "1", max: "60", step: "1" }))),
      el("div", { class: "row" },
        withError("Motion bucket", number("motion_bucket_id", { min: "0", max: "255", step: "1" }),
          "0–255: more is more motion."),
        withError("Noise augmentation", number("noise_aug_strength", { min: "0", max: "1", step: "0.01" }),
          "0–1: more lets the video stray from the image."))),
    el("div", { class: "row" },
      withError("Size", input("size", { list: "preset-sizes", placeholder: "model default", autocomplete: "off" }),
        "WIDTHxHEIGHT, e.g. 1024x1024"),
      withError("Steps", number("steps", { min: "1", max: "500", step: "1" }))),
    el("datalist", { id: "preset-sizes" }),
    el("div", { class: "actions" },
      el("button", { id: "preset-save", type: "submit", class: "primary" }, "Create preset"),
      el("button", { id: "preset-new", type: "button", onclick: () => fillForm(null) }, "Clear")),
    el("p", { id: "preset-result", role: "status" }),
    alertBox("preset-error"));
  const lists = el("div", { class: "stack" },
    listPanel("preset-own-image", "Your image presets"),
    listPanel("preset-own-video", "Your video presets"),
    listPanel("preset-builtin", "Built-in styles (read-only)"),
    alertBox("preset-list-error"));
  section.append(el("div", { class: "layout" }, form, lists));
}

export async function show() {
  await load();
  try { // the image model's sizes as suggestions for the size field
    const { image } = await loadModels();
    const sizes = image ? sizeOptions(image.metadata || {}) : [];
    $("#preset-sizes").replaceChildren(...sizes.map((s) => el("option", { value: s })));
  } catch {
    /* the sizes are only suggestions; load() has shown any error already */
  }
}

function listPanel(id, title) {
  return el("div", { class: "panel" },
    el("h2", { id: `${id}-title` }, title),
    el("div", { class: "table-wrap" }, el("table", { id, "aria-labelledby": `${id}-title` })));
}

async function load() {
  const error = $("#preset-list-error");
  try {
    ({ data: presets } = await api("GET", "/v1/presets"));
    clearError(error);
  } catch (err) {
    showError(error, err);
    return;
  }
  const own = (kind) => presets.filter((p) => !p.builtin && p.kind === kind);
  const values = (p, names) => names.map((n) => (p[n] === null || p[n] === undefined ? "" : String(p[n])));
  fill($("#preset-own-image"), ["Name", "Category", "Template", "Negative", "Size", "Steps", "Guidance"], own("image"),
    (p) => values(p, ["category", "prompt", "negative_prompt", "size", "steps", "guidance_scale"]),
    "No image presets of yours yet: make one with the form.", ownActions);
  fill($("#preset-own-video"),
    ["Name", "Category", "Seconds", "Frames", "FPS", "Motion", "Noise aug.", "Size", "Steps"], own("video"),
    (p) => values(p, ["category", "seconds", "num_frames", "fps", "motion_bucket_id", "noise_aug_strength", "size",
      "steps"]),
    "No video presets of yours yet.", ownActions);
  fill($("#preset-builtin"), ["Name", "Template", "Negative", "Steps", "Guidance"], presets.filter((p) => p.builtin),
    (p) => values(p, ["prompt", "negative_prompt", "steps", "guidance_scale"]), "No built-in styles.",
    (p) => [el("button", { type: "button", class: "small", onclick: () => copy(p),
      "aria-label": `Copy ${p.name} into a new preset` }, "Copy")]);
}

/** A table of presets: a row per preset (its name, a badge for a built-in, its values, its buttons). */
function fill(table, head, rows, cells, empty, actions) {
  table.replaceChildren(
    el("thead", {}, el("tr", {}, ...head.map((h) => el("th", { scope: "col" }, h)), el("th", { scope: "col" },
      el("span", { class: "visually-hidden" }, "Actions")))),
    el("tbody", {}, rows.length
      ? rows.map((p) => el("tr", { dataset: { preset: p.name } },
        el("th", { scope: "row" }, el("code", {}, p.name),
          p.builtin ? [" ", el("span", { class: "badge" }, "built-in")] : null),
        ...cells(p).map((text) => el("td", { class: "preset-cell" }, text)),
        el("td", { class: "nowrap" }, ...actions(p))))
      : el("tr", {}, el("td", { colspan: String(head.length + 1), class: "muted" }, empty))));
}

function ownActions(p) {
  return [
    el("button", { type: "button", class: "small", onclick: () => fillForm(p), "aria-label": `Edit ${p.name}` }, "Edit"),
    " ",
    el("button", { type: "button", class: "small", onclick: () => remove(p), "aria-label": `Delete ${p.name}` }, "Delete"),
  ];
}

// --- the form -----------------------------------------------------------------------------------------

function showKind() {
  const kind = $("#preset-kind").value;
  $("#preset-image-fields").hidden = kind !== "image";
  $("#preset-video-fields").hidden = kind !== "video";
}

/** Fill the form from a preset to edit (null: empty, for a new one). */
function fillForm(preset, { asNew = false, focus = true } = {}) {
  clearFieldErrors();
  clearError($("#preset-error"));
  $("#preset-result").textContent = "";
  editing = preset && !asNew ? preset.name : null;
  for (const [name, { id }] of Object.entries(FIELDS)) {
    const value = preset?.[name];
    $(`#${id}`).value = value === null || value === undefined ? (name === "kind" ? "image" : "") : String(value);
  }
  if (asNew) $("#preset-name").value = `${preset.name}-copy`;
  $("#preset-name").readOnly = Boolean(editing); // PUT /v1/presets/{name} keeps the name
  $("#preset-form-title").textContent = editing ? `Edit preset ${editing}` : "New preset";
  $("#preset-save").textContent = editing ? "Save changes" : "Create preset";
  showKind();
  if (focus) $(editing ? "#preset-category" : "#preset-name").focus();
}

function copy(builtin) {
  fillForm({ ...builtin, category: null }, { asNew: true });
}

/** The request body: the fields of the chosen kind, empty ones left out (the model's default applies). */
function body() {
  const kind = $("#preset-kind").value;
  const out = {};
  for (const [name, spec] of Object.entries(FIELDS)) {
    if (spec.kind && spec.kind !== kind) continue;
    const control = $(`#${spec.id}`);
    const value = spec.number ? numberOf(control) : control.value.trim();
    if (value !== undefined && value !== "") out[name] = value;
  }
  return out;
}

async function save(event) {
  event.preventDefault();
  const button = $("#preset-save");
  const error = $("#preset-error");
  clearFieldErrors();
  clearError(error);
  $("#preset-result").textContent = "";
  button.disabled = true;
  try {
    const json = body();
    const saved = editing
      ? await api("PUT", `/v1/presets/${encodeURIComponent(editing)}`, { json })
      : await api("POST", "/v1/presets", { json });
    await load();
    fillForm(saved, { focus: false }); // now editing what was saved
    $("#preset-result").textContent = `Saved ${saved.kind} preset ${saved.name}.`;
  } catch (err) {
    showFieldErrors(err);
  } finally {
    button.disabled = false;
  }
}

async function remove(preset) {
  if (!window.confirm(`Delete the preset ${preset.name}?`)) return;
  const error = $("#preset-list-error");
  try {
    await api("DELETE", `/v1/presets/${encodeURIComponent(preset.name)}`);
    clearError(error);
    if (editing === preset.name) fillForm(null);
    $("#preset-result").textContent = `Deleted the preset ${preset.name}.`;
    await load();
  } catch (err) {
    showError(error, err);
  }
}

// --- errors by field --------------------------------------------------------------------------------

function clearFieldErrors() {
  for (const { id } of Object.values(FIELDS)) {
    $(`#${id}`).removeAttribute("aria-invalid");
    const box = $(`#${id}-error`);
    box.textContent = "";
    box.hidden = true;
  }
}

/**
 * Put the API's error next to the field(s) it names. A validation error's message lists every
 * field ("steps: Input should be ...; fps: ..."), its `param` the first; any other error is about
 * its `param`. What names no field of the form stays in the alert.
 */
function showFieldErrors(err) {
  const names = Object.keys(FIELDS).join("|");
  const found = {};
  for (const part of String(err.message || "").split(new RegExp(`; (?=(?:${names}): )`))) {
    const match = part.match(new RegExp(`^(${names}): ([\\s\\S]*)$`));
    if (match) found[match[1]] = match[2];
  }
  if (err.param in FIELDS && !Object.keys(found).length) found[err.param] = err.message;
  const kind = $("#preset-kind").value;
  const shown = Object.keys(found).filter((name) => !FIELDS[name].kind || FIELDS[name].kind === kind);
  for (const name of shown) {
    const { id } = FIELDS[name];
    $(`#${id}`).setAttribute("aria-invalid", "true");
    const box = $(`#${id}-error`);
    box.textContent = found[name].replace(/^Value error, /, "");
    box.hidden = false;
  }
  if (shown.length) {
    $(`#${FIELDS[shown[0]].id}`).focus();
    const labels = shown.map((n) => $(`label[for="${FIELDS[n].id}"]`).textContent);
    showError($("#preset-error"), `Not saved: see ${labels.join(", ")} above.`);
  } else {
    showError($("#preset-error"), err);
  }
}
