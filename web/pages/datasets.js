// Datasets (create, upload images, browse, caption with the language model: POST
// /v1/datasets/{id}/captions, a job followed to its end) and LoRA / DreamBooth training runs (POST
// /v1/fine_tuning/jobs with the main hyperparameters, each checked here and by the API, whose 400
// is shown next to the field it names; the run is polled every 2 s with its events: status, step,
// epoch, learning rate, samples/s, a loss chart, and its validation images with download links).

import { api, followJob, getKey } from "../api.js";
import {
  $, alertBox, clearError, el, field, formatTime, loadModels, numberOf, revokeBlobs, setMedia, showError,
} from "../ui.js";

const POLL_MS = 2000;
// The hard ceilings of training/config.py (the app's `fine_tuning.limits` may set lower ones: the API says so).
const MAX_LEARNING_RATE = 1;
const MAX_BATCH = 256;
const MAX_RANK = 1024;
const MAX_RESOLUTION = 4096;
// The form's fields by the request field (the API error's `param`) they set.
const TRAIN_FIELDS = {
  training_file: "ft-dataset",
  method: "ft-method",
  class_prompt: "ft-class-prompt",
  instance_prompt: "ft-instance-prompt",
  validation_prompt: "ft-validation-prompt",
  suffix: "ft-suffix",
  "hyperparameters.learning_rate": "ft-lr",
  "hyperparameters.max_steps": "ft-steps",
  "hyperparameters.n_epochs": "ft-epochs",
  "hyperparameters.batch_size": "ft-batch",
  "hyperparameters.rank": "ft-rank",
  "hyperparameters.resolution": "ft-resolution",
};
const RUN_DONE = new Set(["succeeded", "failed", "cancelled"]);
let currentRun = null; // the run shown in #ft-status
let pollTimer = null;

export function init(section) {
  const list = el("div", { class: "panel" },
    el("div", { class: "panel-head" }, el("h2", {}, "Datasets"),
      el("button", { type: "button", onclick: loadDatasets }, "Refresh")),
    el("div", { id: "ds-list", class: "ds-list" }));
  const create = el("form", { novalidate: true, class: "panel form", id: "ds-create-form", onsubmit: createDataset },
    el("h2", {}, "New dataset"),
    el("div", { class: "row" },
      field("Name", el("input", { id: "ds-name", type: "text", required: true, maxlength: "100",
        pattern: "[A-Za-z0-9_\\-][A-Za-z0-9_.\\-]*", placeholder: "my-dog" }), "Letters, digits, _ . -"),
      field("Trigger word (optional)", el("input", { id: "ds-trigger", type: "text", maxlength: "100", placeholder: "sks" }))),
    el("div", { class: "actions" }, el("button", { id: "ds-create", type: "submit", class: "primary" }, "Create")),
    alertBox("ds-error"));
  const upload = el("form", { novalidate: true, class: "panel form", id: "ds-upload-form", onsubmit: uploadImages },
    el("h2", {}, "Add images"),
    field("Dataset", el("select", { id: "ds-select", required: true })),
    field("Images", el("input", { id: "ds-files", type: "file", multiple: true, required: true,
      accept: "image/png,image/jpeg,image/webp,.txt,.zip" }), "Images, same-name .txt captions, or .zip archives."),
    el("div", { class: "actions" }, el("button", { id: "ds-upload", type: "submit", class: "primary" }, "Upload")),
    el("p", { id: "ds-upload-result", role: "status" }),
    alertBox("ds-upload-error"));
  const input = (id, attrs = {}) => el("input", { id, type: "text", "aria-describedby": `${id}-error`, ...attrs });
  const number = (id, attrs = {}) => input(id, { type: "number", placeholder: "default", ...attrs });
  const train = el("form", { novalidate: true, class: "panel form", id: "ft-form", onsubmit: startRun },
    el("h2", {}, "Train a LoRA"),
    el("div", { class: "row" },
      withError("Dataset", el("select", { id: "ft-dataset", required: true, "aria-describedby": "ft-dataset-error" })),
      withError("Method", el("select", { id: "ft-method", onchange: showMethod, "aria-describedby": "ft-method-error" },
        el("option", { value: "lora" }, "LoRA (captions as they are)"),
        el("option", { value: "dreambooth" }, "DreamBooth (one subject, prior preservation)")))),
    el("div", { id: "ft-dreambooth", class: "row", hidden: true },
      withError("Class prompt", input("ft-class-prompt", { maxlength: "1000", placeholder: "a photo of a dog" }),
        "What the subject is; the run renders images of it to keep the class."),
      withError("Instance prompt (optional)", input("ft-instance-prompt", { maxlength: "1000",
        placeholder: "a photo of {trigger_word} dog" }), "The caption of every image; default: the trigger word.")),
    el("div", { class: "row" },
      withError("LoRA name", input("ft-suffix", { maxlength: "100", placeholder: "from dataset" })),
      withError("Validation prompt (optional)", input("ft-validation-prompt", { maxlength: "1000",
        placeholder: "default: the instance caption" }), "Rendered with the adapter at the end of the run.")),
    el("fieldset", { class: "form ft-hyper" },
      el("legend", {}, "Hyperparameters"),
      el("div", { class: "row three" },
        withError("Learning rate", number("ft-lr", { min: "0", max: String(MAX_LEARNING_RATE), step: "any" })),
        withError("Steps", number("ft-steps", { min: "1", step: "1" }), "Or epochs, not both."),
        withError("Epochs", number("ft-epochs", { min: "1", step: "1" }))),
      el("div", { class: "row three" },
        withError("Batch size", number("ft-batch", { min: "1", max: String(MAX_BATCH), step: "1" }), "Per worker."),
        withError("Rank", number("ft-rank", { min: "1", max: String(MAX_RANK), step: "1" })),
        withError("Resolution", number("ft-resolution", { min: "64", max: String(MAX_RESOLUTION), step: "8" }),
          "Pixels, a multiple of 8."))),
    el("div", { class: "check" }, el("input", { id: "ft-new-version", type: "checkbox" }),
      el("label", { for: "ft-new-version" }, "New version if the name is taken")),
    el("div", { class: "actions" },
      el("button", { id: "ft-start", type: "submit", class: "primary" }, "Start training"),
      el("button", { id: "ft-cancel", type: "button", hidden: true, onclick: cancelRun }, "Cancel run")),
    alertBox("ft-error"),
    el("div", { id: "ft-current", class: "run", hidden: true },
      el("p", { id: "ft-status", role: "status" }),
      el("p", { id: "ft-model" }),
      el("div", { class: "ft-progress" },
        el("div", { id: "ft-chart", class: "chart" }),
        el("dl", { id: "ft-metrics", class: "ft-metrics" },
          el("dt", {}, "Epoch"), el("dd", { id: "ft-epoch" }, "—"),
          el("dt", {}, "Learning rate"), el("dd", { id: "ft-lr-now" }, "—"),
          el("dt", {}, "Samples/s"), el("dd", { id: "ft-rate" }, "—"))),
      el("div", { id: "ft-validation", class: "ft-validation", hidden: true },
        el("h3", {}, "Validation images"),
        el("p", { id: "ft-validation-prompt-shown", class: "muted" }),
        el("div", { id: "ft-validation-grid", class: "ft-validation-grid" })),
      el("details", {}, el("summary", {}, "Run log"), el("ol", { id: "ft-events", class: "events", reversed: true }))));
  const runs = el("div", { class: "panel" },
    el("div", { class: "panel-head" }, el("h2", {}, "Training runs"),
      el("button", { type: "button", onclick: loadRuns }, "Refresh")),
    el("div", { class: "table-wrap" }, el("table", { id: "ft-jobs" })));
  const browser = el("div", { class: "panel", id: "ds-browser", hidden: true },
    el("div", { class: "panel-head" }, el("h2", { id: "ds-browser-title" }, "Images"),
      el("span", {},
        el("button", { type: "button", id: "ds-credits", onclick: downloadCredits }, "Download credits"), " ",
        el("button", { type: "button", onclick: () => { $("#ds-browser").hidden = true; } }, "Close"))),
    el("p", { id: "ds-browser-status", class: "muted", role: "status" }),
    alertBox("ds-browser-error"),
    el("form", { novalidate: true, class: "form ds-caption-form", id: "ds-caption-form", onsubmit: captionImages },
      el("div", { class: "row three" },
        field("Caption style", el("select", { id: "ds-caption-style" },
          el("option", { value: "sentence" }, "One sentence"), el("option", { value: "tags" }, "Short tags"))),
        field("Trigger word", el("input", { id: "ds-caption-trigger", type: "text", maxlength: "100",
          placeholder: "the dataset's" }), "Put first in each new caption."),
        el("div", { class: "check" }, el("input", { id: "ds-caption-overwrite", type: "checkbox" }),
          el("label", { for: "ds-caption-overwrite" }, "Replace existing captions"))),
      el("div", { class: "actions" },
        el("button", { id: "ds-caption", type: "submit", class: "primary" }, "Caption"),
        el("button", { id: "ds-caption-cancel", type: "button", hidden: true, onclick: cancelCaptions }, "Cancel")),
      el("p", { id: "ds-caption-progress", role: "status" }),
      alertBox("ds-caption-error")),
    el("ul", { id: "ds-images", class: "ds-images" }),
    el("div", { class: "actions" },
      el("button", { type: "button", id: "ds-prev", onclick: () => browse(browsing.id, browsing.offset - PAGE) }, "Previous"),
      el("button", { type: "button", id: "ds-next", onclick: () => browse(browsing.id, browsing.offset + PAGE) }, "Next")));
  section.append(el("div", { class: "layout" }, el("div", { class: "stack" }, list, browser, create, upload),
    el("div", { class: "stack" }, train, runs)));
}

/** A labelled control with the place for its error under it (filled by showFieldErrors). */
function withError(label, control, hint) {
  const box = field(label, control, hint);
  box.append(el("small", { id: `${control.id}-error`, class: "field-error", hidden: true }));
  return box;
}

function showMethod() {
  $("#ft-dreambooth").hidden = $("#ft-method").value !== "dreambooth";
}

export function show() {
  loadDatasets();
  loadRuns();
}

// --- datasets ---------------------------------------------------------------------------------

function fillSelect(select, datasets, selected) {
  const before = selected || select.value;
  select.replaceChildren(el("option", { value: "" }, datasets.length ? "Choose a dataset" : "No datasets yet"),
    ...datasets.map((d) => el("option", { value: d.id }, `${d.name} (${d.images} images)`)));
  if (datasets.some((d) => d.id === before)) select.value = before;
}

async function loadDatasets(selected) {
  const box = $("#ds-list");
  try {
    const { data } = await api("GET", "/v1/datasets");
    fillSelect($("#ds-select"), data, typeof selected === "string" ? selected : undefined);
    fillSelect($("#ft-dataset"), data, typeof selected === "string" ? selected : undefined);
    if (!data.length) {
      box.replaceChildren(el("p", { class: "muted empty" }, "No datasets yet. Create one below."));
      return;
    }
    // The list has no thumbnails; each dataset's own GET does.
    const details = await Promise.all(data.map((d) => (d.images
      ? api("GET", `/v1/datasets/${encodeURIComponent(d.id)}`).catch(() => d) : d)));
    revokeBlobs(box);
    box.replaceChildren(...details.map(datasetCard));
  } catch (err) {
    showError($("#ds-error"), err);
  }
}

function datasetCard(d) {
  const thumbs = el("div", { class: "ds-thumbs" }, ...(d.thumbnails || []).map((url) => {
    const img = el("img", { alt: `An image of ${d.name}`, loading: "lazy", width: 64, height: 64 });
    setMedia(img, url);
    return img;
  }));
  return el("article", { class: "ds-card" },
    thumbs,
    el("div", {},
      el("h3", {}, d.name, " ", el("button", { type: "button", class: "small", dataset: { browse: d.id },
        onclick: () => browse(d.id, 0) }, "Images")),
      el("p", { class: "muted" }, `${d.id} · version ${d.latest_version || "—"} · ${d.images} image${d.images === 1 ? "" : "s"}` +
        `${d.trigger_word ? ` · trigger “${d.trigger_word}”` : ""}`)));
}

// --- browsing and curating one dataset's images -----------------------------------------------

const PAGE = 24;
const browsing = { id: null, offset: 0, version: 0 };

/** Show the latest version's images from `offset`: captions edit inline, images can be removed. */
async function browse(id, offset) {
  const error = $("#ds-browser-error");
  clearError(error);
  browsing.id = id;
  browsing.offset = Math.max(0, offset);
  $("#ds-browser").hidden = false;
  try {
    const page = await api("GET", `/v1/datasets/${encodeURIComponent(id)}/images`,
      { query: { offset: browsing.offset, limit: PAGE } });
    browsing.version = page.version;
    $("#ds-browser-title").textContent = `Images of ${id}, version ${page.version}`;
    $("#ds-browser-status").textContent = page.total
      ? `${browsing.offset + 1}–${browsing.offset + page.data.length} of ${page.total}` : "No images yet.";
    $("#ds-prev").disabled = browsing.offset === 0;
    $("#ds-next").disabled = browsing.offset + PAGE >= page.total;
    const list = $("#ds-images");
    revokeBlobs(list);
    list.replaceChildren(...page.data.map(imageItem));
  } catch (err) {
    showError(error, err);
  }
}

function imageItem(image) {
  const img = el("img", { alt: image.caption || image.filename, loading: "lazy", width: 96, height: 96 });
  setMedia(img, image.thumbnail_url);
  const thumb = el("figure", { class: "ds-thumb" }, img,
    el("figcaption", { class: image.caption ? "" : "muted", dataset: { caption: image.id } },
      image.caption || "No caption"));
  const credit = image.attribution?.photographer
    ? el("small", { class: "muted" }, "Photo by ", el("a", { href: image.attribution.photographer_url || image.attribution.page_url,
      target: "_blank", rel: "noopener" }, image.attribution.photographer), ` (${image.source}, ${image.license})`)
    : el("small", { class: "muted" }, `${image.source} · ${image.license}`);
  const caption = el("textarea", { rows: 2, maxlength: "10000", "aria-label": `Caption of ${image.filename}`,
    dataset: { image: image.id }, class: "ds-caption" }, image.caption);
  caption.addEventListener("change", () => edit({ captions: { [image.id]: caption.value } },
    `Caption saved`));
  return el("li", { class: "ds-image" }, thumb,
    el("div", {}, caption, credit, image.tags.length ? el("small", {}, ` · tags: ${image.tags.join(", ")}`) : null,
      el("div", {}, el("button", { type: "button", class: "small", dataset: { remove: image.id },
        onclick: () => edit({ remove: [image.id] }, "Image removed") }, "Remove"))));
}

// --- captions by the language model ------------------------------------------------------------

let captionJob = null; // the captioning job being followed

/** Caption the browsed dataset's latest version (a job), follow it, then show the new version. */
async function captionImages(event) {
  event.preventDefault();
  const error = $("#ds-caption-error");
  const progress = $("#ds-caption-progress");
  clearError(error);
  const id = browsing.id;
  const body = { style: $("#ds-caption-style").value, overwrite: $("#ds-caption-overwrite").checked };
  const trigger = $("#ds-caption-trigger").value.trim();
  if (trigger) body.trigger_word = trigger;
  const button = $("#ds-caption");
  button.disabled = true;
  try {
    const job = await api("POST", `/v1/datasets/${encodeURIComponent(id)}/captions`, { json: body });
    captionJob = job.id;
    $("#ds-caption-cancel").hidden = false;
    progress.textContent = "Captioning: queued";
    const final = await followJob(job.id, (j) => {
      const steps = j.total_steps ? `${j.step ?? 0} of ${j.total_steps} images, ` : "";
      progress.textContent = `Captioning: ${j.status}, ${steps}${Math.round(j.progress || 0)}%`;
    });
    const r = final.result || {};
    progress.textContent = final.status === "completed"
      ? `Captioned ${r.captioned} image${r.captioned === 1 ? "" : "s"}: version ${r.version} ` +
        `(${r.kept} kept, ${r.skipped} skipped, ${r.failed} failed).`
      : `Captioning ${final.status}${final.error ? `: ${final.error.message}` : ""}; the dataset is unchanged.`;
    if (final.status === "completed" && browsing.id === id) await browse(id, 0);
    loadDatasets();
  } catch (err) {
    showError(error, err);
  } finally {
    captionJob = null;
    $("#ds-caption-cancel").hidden = true;
    button.disabled = false;
  }
}

async function cancelCaptions() {
  if (!captionJob) return;
  try {
    await api("POST", `/v1/jobs/${encodeURIComponent(captionJob)}/cancel`);
  } catch (err) {
    showError($("#ds-caption-error"), err);
  }
}

async function edit(change, done) {
  const error = $("#ds-browser-error");
  clearError(error);
  try {
    const r = await api("POST", `/v1/datasets/${encodeURIComponent(browsing.id)}/edits`,
      { json: { version: browsing.version, ...change } });
    browsing.version = r.version;
    await browse(browsing.id, browsing.offset);
    $("#ds-browser-status").textContent = `${done}: version ${r.version} has ${r.images} image${r.images === 1 ? "" : "s"}.`;
    loadDatasets();
  } catch (err) {
    showError(error, err);
  }
}

/** The credits CSV, fetched with the key and saved through a blob link. */
async function downloadCredits() {
  const error = $("#ds-browser-error");
  clearError(error);
  try {
    const key = getKey();
    const response = await fetch(`/v1/datasets/${encodeURIComponent(browsing.id)}/credits?version=${browsing.version}`,
      { headers: key ? { Authorization: `Bearer ${key}` } : {} });
    if (!response.ok) throw new Error(`The server answered ${response.status}`);
    const url = URL.createObjectURL(await response.blob());
    const link = el("a", { href: url, download: `${browsing.id}-v${browsing.version}-credits.csv` });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  } catch (err) {
    showError(error, err);
  }
}

async function createDataset(event) {
  event.preventDefault();
  const error = $("#ds-error");
  clearError(error);
  const body = { name: $("#ds-name").value.trim() };
  const trigger = $("#ds-trigger").value.trim();
  if (trigger) body.trigger_word = trigger;
  try {
    const dataset = await api("POST", "/v1/datasets", { json: body });
    $("#ds-name").value = "";
    $("#ds-trigger").value = "";
    await loadDatasets(dataset.id);
  } catch (err) {
    showError(error, err);
  }
}

async function uploadImages(event) {
  event.preventDefault();
  const error = $("#ds-upload-error");
  const result = $("#ds-upload-result");
  clearError(error);
  result.textContent = "";
  const datasetId = $("#ds-select").value;
  const files = [...$("#ds-files").files];
  if (!datasetId) return showError(error, "Choose the dataset to add the images to.");
  const form = new FormData();
  for (const file of files) form.append("files", file, file.name);
  const button = $("#ds-upload");
  button.disabled = true;
  try {
    const r = await api("POST", `/v1/datasets/${encodeURIComponent(datasetId)}/images`, { form });
    const parts = [`Added ${r.added} image${r.added === 1 ? "" : "s"}: version ${r.version} has ${r.images}.`];
    if (r.duplicates.length) parts.push(`${r.duplicates.length} duplicate${r.duplicates.length === 1 ? "" : "s"} skipped (${r.duplicates.join(", ")}).`);
    if (r.rejected.length) parts.push(`Rejected: ${r.rejected.map((x) => `${x.filename}: ${x.reason}`).join("; ")}.`);
    result.textContent = parts.join(" ");
    $("#ds-files").value = "";
    await loadDatasets(datasetId);
  } catch (err) {
    showError(error, err);
  } finally {
    button.disabled = false;
  }
}

// --- training ---------------------------------------------------------------------------------

async function loadRuns() {
  const table = $("#ft-jobs");
  try {
    const { data } = await api("GET", "/v1/fine_tuning/jobs");
    table.replaceChildren(
      el("caption", { class: "muted" }, data.length ? "Newest first" : "No training runs yet."),
      el("thead", {}, el("tr", {}, ...["LoRA / run", "Status", "Loss", ""].map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, ...data.map(runRow)));
    if (!currentRun && data.length && !RUN_DONE.has(data[0].status)) follow(data[0].id); // pick up a live run
  } catch (err) {
    showError($("#ft-error"), err);
  }
}

function runRow(run) {
  return el("tr", { dataset: { run: run.id } },
    el("td", {}, run.fine_tuned_model || run.suffix, el("br"),
      el("small", { class: "muted" }, el("code", {}, run.id), " ", formatTime(run.created_at))),
    el("td", {}, el("span", { class: `badge ${run.status}` }, run.status), el("br"),
      el("small", { class: "muted" }, `step ${run.step}/${run.total_steps}`)),
    el("td", {}, run.loss != null ? run.loss.toFixed(4) : "—"),
    el("td", {}, el("button", { type: "button", onclick: () => follow(run.id) }, "Show")));
}

/** The form's request, or `{errors}` by request field when a value is wrong before asking the API. */
function trainRequest() {
  const errors = {};
  const text = (id) => $(`#${id}`).value.trim();
  const hyperparameters = {};
  const numeric = (param, id, { integer = true, min = 1, max = Infinity, multiple = 1 } = {}) => {
    const input = $(`#${id}`);
    if (input.validity.badInput) return void (errors[param] = "Enter a number.");
    const value = numberOf(input);
    if (value === undefined) return;
    if (!Number.isFinite(value) || (integer && !Number.isInteger(value))) {
      errors[param] = integer ? "Enter a whole number." : "Enter a number.";
    } else if (value < min || value > max) {
      errors[param] = max === Infinity ? `At least ${min}.` : `Between ${min} and ${max}.`;
    } else if (value % multiple) {
      errors[param] = `A multiple of ${multiple}.`;
    } else {
      hyperparameters[param.split(".")[1]] = value;
    }
  };
  const lr = numberOf($("#ft-lr"));
  if ($("#ft-lr").validity.badInput || (lr !== undefined && !(lr > 0 && lr <= MAX_LEARNING_RATE))) {
    errors["hyperparameters.learning_rate"] = `Greater than 0 and at most ${MAX_LEARNING_RATE}.`;
  } else if (lr !== undefined) {
    hyperparameters.learning_rate = lr;
  }
  numeric("hyperparameters.max_steps", "ft-steps");
  numeric("hyperparameters.n_epochs", "ft-epochs");
  if (hyperparameters.max_steps !== undefined && hyperparameters.n_epochs !== undefined) {
    errors["hyperparameters.n_epochs"] = "Give steps or epochs, not both.";
  }
  numeric("hyperparameters.batch_size", "ft-batch", { max: MAX_BATCH });
  numeric("hyperparameters.rank", "ft-rank", { max: MAX_RANK });
  numeric("hyperparameters.resolution", "ft-resolution", { min: 64, max: MAX_RESOLUTION, multiple: 8 });
  const method = $("#ft-method").value;
  if (!text("ft-dataset")) errors.training_file = "Choose a dataset.";
  if (method === "dreambooth" && !text("ft-class-prompt")) {
    errors.class_prompt = "DreamBooth needs a class prompt: what the subject is (a dog, a person...).";
  }
  const suffix = text("ft-suffix");
  if (suffix && !/^[A-Za-z0-9_-][A-Za-z0-9_.-]*$/.test(suffix)) errors.suffix = "Letters, digits, _ . - only.";
  if (Object.keys(errors).length) return { errors };
  const body = { training_file: text("ft-dataset"), method, hyperparameters, suffix: suffix || undefined,
    validation_prompt: text("ft-validation-prompt") || undefined,
    new_version: $("#ft-new-version").checked || undefined };
  if (method === "dreambooth") {
    body.class_prompt = text("ft-class-prompt");
    body.instance_prompt = text("ft-instance-prompt") || undefined;
  }
  return { body };
}

function clearFieldErrors() {
  for (const id of Object.values(TRAIN_FIELDS)) {
    $(`#${id}`).removeAttribute("aria-invalid");
    const box = $(`#${id}-error`);
    box.textContent = "";
    box.hidden = true;
  }
}

/** Each message next to its field (by request field); false when none of them is a field of the form. */
function showFieldErrors(errors) {
  const shown = Object.keys(errors).filter((param) => param in TRAIN_FIELDS);
  for (const param of shown) {
    const id = TRAIN_FIELDS[param];
    $(`#${id}`).setAttribute("aria-invalid", "true");
    const box = $(`#${id}-error`);
    box.textContent = errors[param];
    box.hidden = false;
  }
  if (!shown.length) return false;
  $(`#${TRAIN_FIELDS[shown[0]]}`).focus();
  const labels = shown.map((param) => $(`label[for="${TRAIN_FIELDS[param]}"]`).textContent);
  showError($("#ft-error"), `Not started: see ${labels.join(", ")}.`);
  return true;
}

async function startRun(event) {
  event.preventDefault();
  const error = $("#ft-error");
  clearError(error);
  clearFieldErrors();
  const { body, errors } = trainRequest();
  if (errors) return showFieldErrors(errors);
  const button = $("#ft-start");
  button.disabled = true;
  try {
    const models = await loadModels();
    const run = await api("POST", "/v1/fine_tuning/jobs", { json: { model: models.image.id, ...body } });
    follow(run.id, run);
    loadRuns();
  } catch (err) {
    // The API's 400 names the field ("hyperparameters.rank"); its message starts with the config's name of it.
    const message = String(err.message || "").replace(/^[\w.]+: /, "").replace(/^Value error, /, "");
    if (!(err.param && showFieldErrors({ [err.param]: message }))) showError(error, err);
  } finally {
    button.disabled = false;
  }
}

async function cancelRun() {
  if (!currentRun) return;
  $("#ft-cancel").disabled = true;
  try {
    showRun(await api("POST", `/v1/fine_tuning/jobs/${encodeURIComponent(currentRun)}/cancel`));
  } catch (err) {
    showError($("#ft-error"), err);
  }
}

/** Make `id` the current run and poll it (and its events) every 2 s until it ends. */
function follow(id, first) {
  currentRun = id;
  clearTimeout(pollTimer);
  $("#ft-current").hidden = false;
  $("#ft-chart").replaceChildren();
  $("#ft-events").replaceChildren();
  $("#ft-validation").hidden = true;
  $("#ft-validation-grid").replaceChildren();
  shownImages = "";
  if (first) showRun(first);
  const tick = async () => {
    if (currentRun !== id) return;
    try {
      const [run, events] = await Promise.all([
        api("GET", `/v1/fine_tuning/jobs/${encodeURIComponent(id)}`),
        api("GET", `/v1/fine_tuning/jobs/${encodeURIComponent(id)}/events`, { query: { limit: 1000 } }),
      ]);
      if (currentRun !== id) return;
      showRun(run);
      showEvents(events.data);
      if (RUN_DONE.has(run.status)) {
        loadRuns();
        return;
      }
    } catch (err) {
      showError($("#ft-error"), err);
    }
    pollTimer = setTimeout(tick, POLL_MS);
  };
  tick();
}

let shownImages = ""; // the validation files shown, so a poll does not reload them

/** Epoch, learning rate and samples/s of the run's last step, and its validation images. */
function showMetrics(run) {
  $("#ft-epoch").textContent = run.epoch ? `${run.epoch} of ${run.epochs}` : "—";
  $("#ft-lr-now").textContent = run.learning_rate != null ? run.learning_rate.toExponential(2) : "—";
  $("#ft-rate").textContent = run.samples_per_s != null ? run.samples_per_s.toFixed(2) : "—";
  const images = run.validation_images || [];
  const files = images.map((i) => i.file).join(" ");
  if (files === shownImages) return;
  shownImages = files;
  const grid = $("#ft-validation-grid");
  revokeBlobs(grid);
  grid.replaceChildren(...images.map((image) => {
    const last = image.step === run.total_steps;
    const label = `Step ${image.step}${last ? " (final)" : ""}, seed ${image.seed}`;
    const img = el("img", { alt: `Validation image, ${label}`, loading: "lazy", decoding: "async" });
    const download = el("a", { download: `${run.suffix}-${image.file.replaceAll("/", "-")}`,
      dataset: { file: image.file } }, "Download");
    setMedia(img, image.url, (src) => { download.href = src; });
    return el("figure", { class: "thumb" }, img, el("figcaption", {}, el("span", { class: "muted" }, label), " ", download));
  }));
  $("#ft-validation-prompt-shown").textContent = run.validation_prompt ? `“${run.validation_prompt}”` : "";
  $("#ft-validation").hidden = !images.length;
}

function showRun(run) {
  const loss = run.loss != null ? `, loss ${run.loss.toFixed(4)}` : "";
  const state = run.state && run.state !== run.status ? ` (${run.state})` : "";
  $("#ft-status").replaceChildren(
    el("span", { class: `badge ${run.status}` }, run.status),
    ` Run ${run.id} for “${run.suffix}”: ${run.status}${state} — step ${run.step} of ${run.total_steps}` +
    ` (${Math.round(run.progress)}%)${loss}.`);
  $(`#ft-jobs tr[data-run="${run.id}"]`)?.replaceWith(runRow(run)); // keep its row in the list current
  showMetrics(run);
  const cancel = $("#ft-cancel");
  cancel.hidden = RUN_DONE.has(run.status);
  cancel.disabled = false;
  const model = $("#ft-model");
  if (run.status === "succeeded" && run.fine_tuned_model) {
    model.replaceChildren("Registered LoRA ", el("strong", { id: "ft-lora" }, run.fine_tuned_model), ". ",
      el("a", { href: `#/generate?lora=${encodeURIComponent(run.fine_tuned_model)}` }, "Generate with it"));
  } else if (run.status === "failed") {
    model.replaceChildren();
    showError($("#ft-error"), `Training failed: ${run.error?.message || "no reason given"}`);
  } else {
    model.replaceChildren();
  }
}

function showEvents(events) {
  // No times shown: the API stamps log lines when it reads them, not when they were written.
  $("#ft-events").replaceChildren(...events.map((e) => el("li", { class: e.level }, e.message)));
  const points = events.filter((e) => e.type === "metrics" && e.data && Number.isFinite(e.data.train_loss))
    .map((e) => [e.data.step, e.data.train_loss]).sort((a, b) => a[0] - b[0]);
  $("#ft-chart").replaceChildren(...(points.length ? [lossChart(points)] : []));
}

/** A small inline SVG line chart of loss by step. */
function lossChart(points) {
  const W = 320;
  const H = 120;
  const pad = 28;
  const NS = "http://www.w3.org/2000/svg";
  const svg = (tag, attrs, text) => {
    const node = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  };
  const steps = points.map((p) => p[0]);
  const losses = points.map((p) => p[1]);
  const [x0, x1] = [Math.min(...steps), Math.max(...steps)];
  const [y0, y1] = [Math.min(...losses), Math.max(...losses)];
  const x = (s) => pad + ((s - x0) / Math.max(x1 - x0, 1)) * (W - pad - 8);
  const y = (l) => 8 + (1 - (l - y0) / Math.max(y1 - y0, 1e-9)) * (H - pad - 8);
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img",
    "aria-label": `Training loss from ${losses[0].toFixed(4)} at step ${steps[0]} to ${losses.at(-1).toFixed(4)} at step ${steps.at(-1)}` });
  chart.append(
    svg("line", { x1: pad, y1: H - pad, x2: W - 8, y2: H - pad, class: "axis" }),
    svg("line", { x1: pad, y1: 8, x2: pad, y2: H - pad, class: "axis" }),
    svg("text", { x: pad - 4, y: 14, "text-anchor": "end" }, y1.toPrecision(3)),
    svg("text", { x: pad - 4, y: H - pad, "text-anchor": "end" }, y0.toPrecision(3)),
    svg("text", { x: pad, y: H - pad + 14 }, `step ${x0}`),
    svg("text", { x: W - 8, y: H - pad + 14, "text-anchor": "end" }, `step ${x1}`),
    svg("polyline", { points: points.map(([s, l]) => `${x(s).toFixed(1)},${y(l).toFixed(1)}`).join(" "), class: "line" }),
    ...points.map(([s, l]) => svg("circle", { cx: x(s).toFixed(1), cy: y(l).toFixed(1), r: 2.5, class: "dot" })));
  return chart;
}
