// Text-to-image: POST /v1/images/generations?async=true, followed over SSE, shown as a grid.
// With HD (x4) checked it is text-to-image-hd (`"upscale": true`): every image x4 by the upscaler.

import { api } from "../api.js";
import {
  $, alertBox, clearError, el, field, loadModels, numberOf, progressRow, renderGrid, runJob, showError, sizeOptions,
} from "../ui.js";

let models = null; // the last GET /v1/models, split by kind
let ownStyles = []; // the caller's own image presets (GET /v1/presets?kind=image), listed after the built-ins

export function init(section) {
  const option = (value, text = value) => el("option", { value }, text);
  // Forms are novalidate throughout: the API checks every field against the model's limits and
  // names the field, so its message (in the alert) is the one source of truth.
  const form = el("form", { novalidate: true, id: "gen-form", class: "panel form", onsubmit: submit },
    field("Prompt", el("textarea", { id: "gen-prompt", rows: "3", required: true, maxlength: "4000",
      placeholder: "a lighthouse at dusk, oil painting" })),
    field("Negative prompt", el("input", { id: "gen-negative", type: "text", placeholder: "blurry, low quality" })),
    el("div", { class: "row" },
      field("Model", el("select", { id: "gen-model", onchange: showTrigger })),
      field("Style", el("select", { id: "gen-style", onchange: applyStyle }, option("none")))),
    el("p", { id: "gen-model-hint", class: "muted" }),
    el("div", { class: "row" },
      field("Images", el("select", { id: "gen-n" }, ...["1", "2", "4", "8"].map((n) => option(n)))),
      field("Size", el("select", { id: "gen-size", onchange: showHdSize }))),
    el("div", { class: "row three" },
      field("Seed", el("input", { id: "gen-seed", type: "number", min: "0", step: "1", placeholder: "random" })),
      field("Steps", el("input", { id: "gen-steps", type: "number", min: "1", step: "1", placeholder: "default" })),
      field("Guidance", el("input", { id: "gen-guidance", type: "number", min: "0", max: "30", step: "0.5",
        placeholder: "default" }))),
    // Shown only when an upscaler is deployed (GET /v1/models lists one).
    el("div", { id: "gen-hd-row", hidden: true },
      el("div", { class: "check" },
        el("input", { id: "gen-hd", type: "checkbox", onchange: showHdSize }),
        el("label", { for: "gen-hd" }, "HD (x4): upscale every image four times with the upscaler")),
      el("p", { id: "gen-hd-hint", class: "muted hint", "aria-live": "polite" })),
    el("div", { class: "check", id: "gen-refine-row", hidden: true },
      el("input", { id: "gen-refine", type: "checkbox" }),
      el("label", { for: "gen-refine" }, "Refine the prompt with the language model first")),
    el("div", { class: "actions" },
      el("button", { id: "gen-submit", type: "submit", class: "primary" }, "Generate"),
      el("button", { id: "gen-cancel", type: "button", hidden: true }, "Cancel")),
    el("p", { id: "gen-info", class: "muted", "aria-live": "polite" }),
    alertBox("gen-error"));
  const results = el("div", { class: "panel results" },
    progressRow("gen"),
    el("div", { id: "gen-grid", class: "grid cols-1", "data-count": "0" },
      el("p", { class: "muted empty" }, "Your images appear here.")),
    el("p", { id: "gen-summary", class: "muted" }));
  section.append(el("div", { class: "layout" }, form, results));
}

export async function show(params) {
  // Every time: a LoRA trained since shows up in the model list.
  try {
    [models, ownStyles] = await Promise.all([loadModels(), loadOwnStyles()]);
    fillModelChoices();
    clearError($("#gen-error")); // e.g. a 401 from before the key was entered
  } catch (err) {
    showError($("#gen-error"), err);
    return;
  }
  const lora = params.get("lora"); // from a finished training run: "Generate with it"
  if (lora && [...$("#gen-model").options].some((o) => o.value === lora)) {
    $("#gen-model").value = lora;
    showTrigger();
  }
  const jobId = params.get("job"); // from the gallery's "Reuse settings"
  if (jobId) await reuse(jobId);
}

function keepSelection(select, options) {
  const before = select.value;
  select.replaceChildren(...options);
  if ([...select.options].some((o) => o.value === before)) select.value = before;
}

function fillModelChoices() {
  const { image, loras, all } = models;
  const meta = image?.metadata || {};
  keepSelection($("#gen-model"), [
    ...(image ? [el("option", { value: image.id }, `${image.id} (base model)`)] : []),
    ...loras.map((l) => el("option", { value: l.id }, `${l.metadata.name}:${l.metadata.version}`)),
  ]);
  showTrigger();
  keepSelection($("#gen-style"), [el("option", { value: "none" }, "none"),
    ...Object.keys(meta.styles || {}).map((s) => el("option", { value: s }, s)),
    ...(ownStyles.length ? [el("optgroup", { label: "Your presets" }, ...ownStyles.map((p) =>
      el("option", { value: p.name }, p.category ? `${p.name} (${p.category})` : p.name)))] : [])]);
  const sizeSelect = $("#gen-size");
  const hadSizes = sizeSelect.options.length > 0;
  keepSelection(sizeSelect, sizeOptions(meta).map((s) => el("option", { value: s }, s.replace("x", " × "))));
  if (!hadSizes && meta.default_size) sizeSelect.value = `${meta.default_size}x${meta.default_size}`;
  if (meta.max_steps) $("#gen-steps").max = String(meta.max_steps);
  if (meta.default_steps) $("#gen-steps").placeholder = `default ${meta.default_steps}`;
  $("#gen-refine-row").hidden = !all.some((m) => m.kind === "text");
  $("#gen-hd-row").hidden = !upscalerCard();
  showHdSize();
}

function upscalerCard() {
  return models?.all.find((m) => m.kind === "upscaler");
}

/** With HD checked: the size the images come out at, and the upscaler's input limit. */
function showHdSize() {
  const hint = $("#gen-hd-hint");
  const upscaler = upscalerCard();
  if (!upscaler || !$("#gen-hd").checked) {
    hint.textContent = "";
    return;
  }
  const scale = upscaler.metadata?.scale || 4;
  const max = upscaler.metadata?.max_input_size;
  const [width, height] = ($("#gen-size").value || "").split("x").map(Number);
  const out = width && height ? `${width} × ${height} → ${width * scale} × ${height * scale}. ` : "";
  hint.textContent = `${out}Images up to ${max ? `${max} × ${max}` : "the upscaler's limit"} can be upscaled.`;
}

/** The caller's own image presets; none if they cannot be read (the built-in styles still work). */
async function loadOwnStyles() {
  try {
    return (await api("GET", "/v1/presets", { query: { kind: "image" } })).data.filter((p) => !p.builtin);
  } catch {
    return [];
  }
}

/** An own preset with a size picks that size (the form always sends one, which would override it). */
function applyStyle() {
  const preset = ownStyles.find((p) => p.name === $("#gen-style").value);
  if (preset?.size) setSelect($("#gen-size"), preset.size);
}

/** A LoRA's trigger word, which the server adds to the prompt when it is absent. */
function showTrigger() {
  const lora = models?.loras.find((l) => l.id === $("#gen-model").value);
  const word = lora?.metadata.trigger_word;
  $("#gen-model-hint").textContent = lora
    ? `LoRA on ${lora.metadata.base}${word ? `; trigger word “${word}” is added to the prompt if missing` : ""}.`
    : "";
}

function setSelect(select, value) {
  if (![...select.options].some((o) => o.value === value)) select.append(el("option", { value }, value));
  select.value = value;
}

/** Fill the form from a finished job's recorded request (its lineage). */
async function reuse(jobId) {
  const error = $("#gen-error");
  clearError(error);
  try {
    const job = await api("GET", `/v1/jobs/${encodeURIComponent(jobId)}`);
    const p = job.params?.sdxl;
    if (!p) throw new Error(`Job ${jobId} (${job.kind}) has no image settings to reuse.`);
    $("#gen-prompt").value = p.prompt || "";
    $("#gen-negative").value = p.negative_prompt || "";
    setSelect($("#gen-n"), String(p.n || 1));
    if (p.width && p.height) setSelect($("#gen-size"), `${p.width}x${p.height}`);
    $("#gen-seed").value = p.seed ?? job.result?.seeds?.[0] ?? "";
    $("#gen-steps").value = p.steps ?? "";
    $("#gen-guidance").value = p.guidance_scale ?? "";
    setSelect($("#gen-style"), p.style || "none");
    setSelect($("#gen-model"), p.lora || models.image?.id || "");
    showTrigger();
    $("#gen-refine").checked = Boolean(job.params.refine);
    $("#gen-hd").checked = job.kind === "images.text_to_image_hd" && Boolean(upscalerCard());
    showHdSize();
    $("#gen-info").textContent = `Settings loaded from job ${jobId}.`;
  } catch (err) {
    showError(error, err);
  }
}

async function submit(event) {
  event.preventDefault();
  const chosen = $("#gen-model").value;
  const imageModel = models?.image?.id;
  const body = {
    prompt: $("#gen-prompt").value.trim(),
    n: Number($("#gen-n").value),
    size: $("#gen-size").value || undefined,
    negative_prompt: $("#gen-negative").value.trim() || undefined,
    seed: numberOf($("#gen-seed")),
    steps: numberOf($("#gen-steps")),
    guidance_scale: numberOf($("#gen-guidance")),
    style: $("#gen-style").value === "none" ? undefined : $("#gen-style").value,
    refine: $("#gen-refine").checked || undefined,
    upscale: !$("#gen-hd-row").hidden && $("#gen-hd").checked ? true : undefined,
  };
  if (chosen && chosen !== imageModel) {
    body.model = imageModel; // a LoRA runs on the base model
    body.lora = chosen;
  } else if (chosen) {
    body.model = chosen;
  }
  $("#gen-info").textContent = "";
  $("#gen-summary").textContent = "";
  const job = await runJob("gen", () => api("POST", "/v1/images/generations", { json: body, query: { async: "true" } }));
  if (job?.status === "completed") {
    const images = job.outputs.filter((o) => o.content_type.startsWith("image/"));
    renderGrid($("#gen-grid"), images);
    const p = job.params?.sdxl || {};
    const elapsed = job.finished_at && job.started_at ? ` in ${(job.finished_at - job.started_at).toFixed(1)} s` : "";
    const revised = job.result?.refine?.prompt ? ` Refined prompt: “${job.result.refine.prompt}”.` : "";
    // An HD job's outputs are the upscaled images: their own size, and the generated one's.
    const first = images[0] || {};
    const hd = job.kind === "images.text_to_image_hd";
    const size = hd && first.width ? `${first.width}×${first.height} (HD x4 of ${p.width}×${p.height})`
      : `${p.width}×${p.height}`;
    $("#gen-grid").classList.toggle("hd", hd);
    $("#gen-summary").textContent =
      `${images.length} image${images.length === 1 ? "" : "s"}, ${size}${elapsed} (job ${job.id}).${revised}`;
  }
}
