// Gallery: completed jobs' images and videos with their lineage (GET /v1/jobs), reuse of a job's
// settings, and adding selected images to a dataset (POST /v1/datasets/{id}/imports with output_keys).

import { api } from "../api.js";
import {
  $, alertBox, clearError, el, formatTime, outputFigure, progressRow, revokeBlobs, runJob, showError,
} from "../ui.js";

const PAGE_SIZE = 50;
let after = null; // the `after` cursor of the next page

export function init(section) {
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
  section.append(toolbar, grid,
    el("p", { class: "center" }, el("button", { id: "gallery-more", type: "button", hidden: true, onclick: () => load(false) },
      "Load more")));
}

export function show() {
  load(true);
  loadDatasets();
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
  if (first) after = null;
  more.disabled = true;
  try {
    const page = await api("GET", "/v1/jobs", { query: { status: "completed", limit: PAGE_SIZE, after } });
    const cards = page.data.flatMap(cardsOf);
    if (first) {
      revokeBlobs(grid);
      grid.replaceChildren(...cards);
    }
    else grid.append(...cards);
    if (!grid.children.length) grid.append(el("p", { class: "muted empty" }, "No finished images or videos yet."));
    after = page.last_id;
    more.hidden = !page.has_more;
  } catch (err) {
    showError($("#gallery-error"), err);
  } finally {
    more.disabled = false;
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

function cardsOf(job) {
  const shown = job.outputs.filter((o) => /^(image|video)\//.test(o.content_type) && o.extra?.role !== "thumbnail");
  // A video job stores its poster (SVD's first frame) as a separate "thumbnail" output.
  const poster = job.outputs.find((o) => o.extra?.role === "thumbnail") || null;
  const reuse = reuseRoute(job);
  return shown.map((output, i) => {
    const isVideo = output.content_type.startsWith("video/");
    const info = lineageOf(job, output);
    const rows = [["Prompt", info.prompt], ["Kind", info.kind], ["Node", info.node], ["Model", info.model],
      ["LoRA", info.lora], ["Style", info.style], ["Size", info.size?.replace("x", " × ")], ["Frames", info.frames],
      ["FPS", info.fps], ["Seconds", info.seconds], ["Upscaled", info.upscaled], ["Steps", info.steps],
      ["Seed", info.seed], ["Made", formatTime(job.finished_at)]];
    const checkId = `gallery-check-${job.id}-${i}`;
    return el("article", { class: isVideo ? "card video" : "card", dataset: { job: job.id, kind: isVideo ? "video" : "image" } },
      outputFigure(output, "", { poster: isVideo ? poster : null }),
      // Datasets hold images only, so a video has nothing to select.
      isVideo ? null : el("div", { class: "check" },
        el("input", { type: "checkbox", id: checkId, class: "gallery-check", value: output.key }),
        el("label", { for: checkId }, "Select")),
      el("dl", { class: "lineage" }, ...rows.filter(([, v]) => v !== undefined && v !== null && v !== "")
        .flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, String(v))])),
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
