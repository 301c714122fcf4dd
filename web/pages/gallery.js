// Gallery: completed jobs' images and videos with their lineage, searched from the asset index
// (GET /v1/assets: prompt words, kind, model, LoRA, tag, favourites, dates), tags and favourites of
// each output, i.e. each card (PUT /v1/jobs/{id}/asset with `output`), delete (DELETE /v1/jobs/{id}),
// storage by kind (GET /v1/assets/stats),
// reuse of a job's settings, and adding selected images to a dataset (POST /v1/datasets/{id}/imports).

import { api } from "../api.js";
import {
  $, alertBox, clearError, el, formatTime, outputFigure, progressRow, revokeBlobs, runJob, showError,
} from "../ui.js";

const PAGE_SIZE = 50;
let after = null; // the `after` cursor of the next page
let shown = {}; // the filters of the shown pages: a job matches by any output, a card only by its own
const KINDS = [["", "Any kind"], ["images.generations", "Text to image"], ["images.edits", "Image edits"],
  ["images.upscale", "Upscales"], ["images.text_to_image_hd", "HD images"], ["videos.image_to_video", "Image to video"],
  ["videos.text_to_video", "Text to video"], ["workflows.run", "Workflow runs"]];

function filterField(id, label, control) {
  return el("div", { class: "field" }, el("label", { for: id }, label), control);
}

export function init(section) {
  const search = el("form", { id: "gallery-search", class: "panel gallery-search", role: "search",
    onsubmit: (event) => { event.preventDefault(); load(true); } },
  filterField("gallery-q", "Search prompts and tags", el("input", { id: "gallery-q", type: "search", maxlength: 200,
    placeholder: "lighthouse dusk" })),
  filterField("gallery-kind", "Kind", el("select", { id: "gallery-kind" },
    ...KINDS.map(([value, text]) => el("option", { value }, text)))),
  filterField("gallery-model", "Model", el("input", { id: "gallery-model", type: "text", maxlength: 300, placeholder: "any" })),
  filterField("gallery-lora", "LoRA", el("input", { id: "gallery-lora", type: "text", maxlength: 300, placeholder: "name or name:version" })),
  filterField("gallery-tag", "Tag", el("select", { id: "gallery-tag" }, el("option", { value: "" }, "Any tag"))),
  filterField("gallery-from", "Made from", el("input", { id: "gallery-from", type: "date" })),
  filterField("gallery-to", "Made until", el("input", { id: "gallery-to", type: "date" })),
  el("div", { class: "check" }, el("input", { id: "gallery-favorites", type: "checkbox" }),
    el("label", { for: "gallery-favorites" }, "Favourites only")),
  el("div", { class: "actions" }, el("button", { id: "gallery-search-submit", type: "submit", class: "primary" }, "Search"),
    el("button", { id: "gallery-search-clear", type: "button", onclick: clearFilters }, "Clear")),
  el("p", { id: "gallery-stats", class: "muted", "aria-live": "polite" }));
  const toolbar = el("div", { class: "panel toolbar" },
    el("div", { class: "field" }, el("label", { for: "gallery-dataset" }, "Dataset"),
      el("select", { id: "gallery-dataset" })),
    el("div", { class: "actions" },
      el("button", { id: "gallery-add", type: "button", class: "primary", onclick: addToDataset },
        "Add selected to dataset"),
      el("span", { id: "gallery-selected", class: "muted", "aria-live": "polite" }, "0 selected")),
    progressRow("gallery"),
    el("p", { id: "gallery-result", role: "status" }),
    alertBox("gallery-error"));
  const grid = el("div", { id: "gallery-grid", class: "cards", onchange: countSelected });
  section.append(search, toolbar, grid,
    el("p", { class: "center" }, el("button", { id: "gallery-more", type: "button", hidden: true, onclick: () => load(false) },
      "Load more")));
}

export function show() {
  load(true);
  loadDatasets();
  loadTagsAndStats();
}

function clearFilters() {
  $("#gallery-search").reset();
  load(true);
}

/** The date inputs as epoch seconds (local midnight; "until" includes its whole day). */
function dayStart(value, plusDays = 0) {
  if (!value) return null;
  const [y, m, d] = value.split("-").map(Number);
  return new Date(y, m - 1, d + plusDays).getTime() / 1000;
}

function filters() {
  return {
    q: $("#gallery-q").value.trim(), kind: $("#gallery-kind").value, model: $("#gallery-model").value.trim(),
    lora: $("#gallery-lora").value.trim(), tag: $("#gallery-tag").value,
    favorite: $("#gallery-favorites").checked ? "true" : null,
    created_after: dayStart($("#gallery-from").value), created_before: dayStart($("#gallery-to").value, 1),
  };
}

function formatBytes(n) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

async function loadTagsAndStats() {
  try {
    const [tags, stats] = await Promise.all([api("GET", "/v1/assets/tags"), api("GET", "/v1/assets/stats")]);
    const select = $("#gallery-tag");
    const before = select.value;
    select.replaceChildren(el("option", { value: "" }, "Any tag"),
      ...tags.data.map((t) => el("option", { value: t.tag }, `${t.tag} (${t.count})`)));
    if (tags.data.some((t) => t.tag === before)) select.value = before;
    const kinds = Object.entries(stats.by_kind).map(([kind, s]) => `${kind}: ${s.jobs} (${formatBytes(s.bytes)})`);
    const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;
    $("#gallery-stats").textContent = `${plural(stats.total.jobs, "job")}, ${plural(stats.total.outputs, "file")}, ` +
      `${formatBytes(stats.total.bytes)}${kinds.length ? ` · ${kinds.join(" · ")}` : ""}`;
  } catch (err) {
    showError($("#gallery-error"), err);
  }
}

async function loadDatasets() {
  const select = $("#gallery-dataset");
  try {
    const { data } = await api("GET", "/v1/datasets");
    const before = select.value;
    select.replaceChildren(
      el("option", { value: "" }, data.length ? "Choose a dataset" : "No datasets yet (create one on Datasets)"),
      ...data.map((d) => el("option", { value: d.id }, `${d.name} (${d.images} images)`)));
    if (data.some((d) => d.id === before)) select.value = before;
  } catch (err) {
    showError($("#gallery-error"), err);
  }
}

async function load(first) {
  const grid = $("#gallery-grid");
  const more = $("#gallery-more");
  clearError($("#gallery-error"));
  if (first) {
    after = null;
    shown = filters();
  }
  more.disabled = true;
  grid.setAttribute("aria-busy", "true"); // until this search's cards are in
  try {
    const page = await api("GET", "/v1/assets", { query: { status: "completed", limit: PAGE_SIZE, after, ...shown } });
    const cards = page.data.flatMap(cardsOf);
    if (first) {
      revokeBlobs(grid);
      grid.replaceChildren(...cards);
    }
    else grid.append(...cards);
    if (!grid.children.length) {
      const filtered = Object.values(filters()).some((v) => v);
      grid.append(el("p", { class: "muted empty" }, filtered ? "Nothing matches this search." : "No finished images or videos yet."));
    }
    after = page.last_id;
    more.hidden = !page.has_more;
  } catch (err) {
    showError($("#gallery-error"), err);
  } finally {
    more.disabled = false;
    grid.setAttribute("aria-busy", "false");
    countSelected();
  }
}

const VIDEO_KINDS = new Set(["videos.image_to_video", "videos.text_to_video"]);

/** What made an output, from the job's recorded params (or a workflow output's lineage). */
function lineageOf(job, output) {
  const p = job.params || {};
  const sdxl = p.sdxl || {};
  const info = { kind: job.kind, model: job.result?.model, lora: sdxl.lora, seed: output.seed };
  if (VIDEO_KINDS.has(job.kind)) {
    // A video job records the video's settings at the top (p.sdxl is text-to-video's still).
    const svd = p.svd || {};
    Object.assign(info, {
      prompt: job.result?.prompt || p.prompt || sdxl.prompt, model: p.model, size: p.size,
      frames: p.num_frames, fps: p.fps, seconds: p.seconds, steps: svd.steps ?? job.result?.stages?.video?.steps,
      seed: output.seed ?? p.seed, style: sdxl.style,
      upscaled: p.upscale_video ? "video ×4" : p.upscale ? "still ×4" : undefined,
    });
  } else if (p.sdxl) {
    Object.assign(info, { prompt: sdxl.prompt, size: `${sdxl.width}x${sdxl.height}`, steps: sdxl.steps ?? job.result?.steps,
      style: sdxl.style });
  } else if (p.upscale) {
    Object.assign(info, { prompt: p.upscale.prompt, steps: p.upscale.steps, seed: output.seed ?? p.upscale.seed });
  } else if (output.extra?.lineage) {
    const nodes = output.extra.lineage.nodes || [];
    const gen = nodes.find((n) => ["text_to_image", "image_to_image", "inpaint"].includes(n.type))?.params || {};
    const animate = nodes.find((n) => n.type === "image_to_video")?.params || {};
    Object.assign(info, {
      prompt: nodes.find((n) => n.type === "prompt")?.params?.text,
      node: output.extra.name, size: gen.size, steps: gen.steps, lora: gen.lora, seed: output.seed ?? gen.seed,
    });
    if (output.content_type.startsWith("video/")) {
      Object.assign(info, { size: animate.size, steps: animate.steps, frames: animate.num_frames, fps: animate.fps,
        seed: output.seed ?? animate.seed });
    }
  }
  if (!info.size && output.width) info.size = `${output.width}x${output.height}`;
  return info;
}

/** Where "Reuse settings" goes: the page that made this kind of job, or none. */
function reuseRoute(job) {
  if (VIDEO_KINDS.has(job.kind)) return `#/video?job=${encodeURIComponent(job.id)}`;
  if (job.params?.sdxl) return `#/generate?job=${encodeURIComponent(job.id)}`;
  return null;
}

/** Whether an output's card matches the favourite and tag filters (the job matched by any output). */
function cardMatches(job, output) {
  return (!shown.favorite || output.favorite) &&
    (!shown.tag || job.tags.includes(shown.tag) || output.tags.includes(shown.tag));
}

function cardsOf(job) {
  const media = job.outputs.filter((o) => /^(image|video)\//.test(o.content_type) && o.extra?.role !== "thumbnail");
  // A video job stores its poster (SVD's first frame) as a separate "thumbnail" output.
  const poster = job.outputs.find((o) => o.extra?.role === "thumbnail") || null;
  const reuse = reuseRoute(job);
  return media.filter((output) => cardMatches(job, output)).map((output) => {
    const i = job.outputs.indexOf(output); // the output's index: its tags and favourite are its own
    const isVideo = output.content_type.startsWith("video/");
    const info = lineageOf(job, output);
    const rows = [["Prompt", info.prompt], ["Kind", info.kind], ["Node", info.node], ["Model", info.model],
      ["LoRA", info.lora], ["Style", info.style], ["Size", info.size?.replace("x", " × ")], ["Frames", info.frames],
      ["FPS", info.fps], ["Seconds", info.seconds], ["Upscaled", info.upscaled], ["Steps", info.steps],
      ["Seed", info.seed], ["Made", formatTime(job.finished_at)]];
    const checkId = `gallery-check-${job.id}-${i}`;
    return el("article", { class: isVideo ? "card video" : "card",
      dataset: { job: job.id, output: String(i), kind: isVideo ? "video" : "image" } },
      outputFigure(output, "", { poster: isVideo ? poster : null }),
      // Datasets hold images only, so a video has nothing to select.
      isVideo ? null : el("div", { class: "check" },
        el("input", { type: "checkbox", id: checkId, class: "gallery-check", value: output.key }),
        el("label", { for: checkId }, "Select")),
      el("dl", { class: "lineage" }, ...rows.filter(([, v]) => v !== undefined && v !== null && v !== "")
        .flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, String(v))])),
      assetControls(job, i),
      reuse
        ? el("button", { type: "button", class: "reuse", onclick: () => { location.hash = reuse; } }, "Reuse settings")
        : null,
      // A workflow run opens again on the editor's canvas, with its node states and outputs.
      job.kind === "workflows.run"
        ? el("button", { type: "button", class: "open-workflow",
          onclick: () => { location.hash = `#/workflows?job=${encodeURIComponent(job.id)}`; } }, "Open in editor")
        : null);
  });
}

function selectedKeys() {
  return [...document.querySelectorAll("#gallery-grid .gallery-check:checked")].map((c) => c.value);
}

function countSelected() {
  $("#gallery-selected").textContent = `${selectedKeys().length} selected`;
}

async function addToDataset() {
  const datasetId = $("#gallery-dataset").value;
  const keys = selectedKeys();
  const error = $("#gallery-error");
  $("#gallery-result").textContent = "";
  if (!datasetId) return showError(error, "Choose a dataset to add the images to.");
  if (!keys.length) return showError(error, "Select at least one image (tick its Select box).");
  const job = await runJob("gallery",
    () => api("POST", `/v1/datasets/${encodeURIComponent(datasetId)}/imports`, { json: { output_keys: keys } }),
    { submit: $("#gallery-add") });
  if (job?.status === "completed") {
    const r = job.result || {};
    const name = $("#gallery-dataset").selectedOptions[0]?.textContent.replace(/ \(\d+ images\)$/, "");
    $("#gallery-result").textContent = `Added ${r.added} image${r.added === 1 ? "" : "s"} to ${name} ` +
      `(version ${r.version}, ${r.images} images in all)` +
      `${r.duplicates ? `; ${r.duplicates} already there` : ""}${r.rejected ? `; ${r.rejected} rejected` : ""}.`;
    for (const box of document.querySelectorAll("#gallery-grid .gallery-check:checked")) box.checked = false;
    countSelected();
    loadDatasets();
  }
}

// --- tags and favourite of one output (its card), delete of the whole job -------------------------

function cardsOfJob(id) {
  return [...document.querySelectorAll("#gallery-grid .card")].filter((c) => c.dataset.job === id);
}

/** A card's controls: output `index`'s favourite and tags (with the job's own tags, if any). */
function assetControls(job, index) {
  const tagList = el("ul", { class: "tags", "aria-label": "Tags" });
  const star = el("button", { type: "button", class: "favorite",
    title: "Favourite (the retention policy keeps its job)",
    onclick: () => edit(job, { output: index, favorite: !job.outputs[index].favorite }) });
  const input = el("input", { class: "tag-input", type: "text", maxlength: 40, placeholder: "add a tag", "aria-label": "New tag" });
  const remove = el("button", { type: "button", class: "delete danger", onclick: () => removeJob(job, remove) }, "Delete");
  const controls = el("div", { class: "asset-controls" }, star, tagList,
    el("form", { class: "tag-form", onsubmit: (event) => {
      event.preventDefault();
      const tag = input.value.trim();
      if (tag) edit(job, { output: index, add_tags: [tag] }).then((ok) => { if (ok) input.value = ""; });
    } }, input, el("button", { type: "submit", class: "tag-add" }, "Tag")),
    remove);
  controls.render = (view) => {
    Object.assign(job, { tags: view.tags, favorite: view.favorite, outputs: view.outputs });
    const output = view.outputs[index];
    // A job tag (set through the API) is on every card of the job; removing it removes it from the job.
    const tags = [...view.tags.map((tag) => [tag, {}]), ...output.tags.filter((t) => !view.tags.includes(t))
      .map((tag) => [tag, { output: index }])];
    tagList.replaceChildren(...tags.map(([tag, where]) => el("li", { class: "tag" }, tag,
      el("button", { type: "button", class: "tag-remove", "aria-label": `Remove tag ${tag}`,
        onclick: () => edit(job, { ...where, remove_tags: [tag] }) }, "×"))));
    star.textContent = output.favorite ? "★ Favourite" : "☆ Favourite";
    star.setAttribute("aria-pressed", String(output.favorite));
  };
  controls.render(job);
  return controls;
}

async function edit(job, change) {
  clearError($("#gallery-error"));
  try {
    const view = await api("PUT", `/v1/jobs/${encodeURIComponent(job.id)}/asset`, { json: change });
    for (const card of cardsOfJob(job.id)) card.querySelector(".asset-controls")?.render(view);
    loadTagsAndStats();
    return true;
  } catch (err) {
    showError($("#gallery-error"), err);
    return false;
  }
}

/** Two clicks: the first asks, the second deletes the job, its files and its tags. */
async function removeJob(job, button) {
  if (!button.classList.contains("confirm")) {
    button.classList.add("confirm");
    button.textContent = "Really delete?";
    setTimeout(() => { button.classList.remove("confirm"); button.textContent = "Delete"; }, 5000);
    return;
  }
  clearError($("#gallery-error"));
  button.disabled = true;
  try {
    const done = await api("DELETE", `/v1/jobs/${encodeURIComponent(job.id)}`);
    for (const card of cardsOfJob(job.id)) {
      revokeBlobs(card);
      card.remove();
    }
    const kept = done.files_kept.length;
    $("#gallery-result").textContent = `Deleted ${job.id}` +
      (kept ? `; ${kept} file${kept === 1 ? "" : "s"} kept (another job still uses ${kept === 1 ? "it" : "them"}).` : ".");
    loadTagsAndStats();
    countSelected();
  } catch (err) {
    button.disabled = false;
    showError($("#gallery-error"), err);
  }
}
