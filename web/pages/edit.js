// Image-to-image and inpainting: POST /v1/images/edits?async=true (multipart). The image is
// drawn on a canvas; the user paints the mask over it (white = repaint). No paint: image-to-image.

import { api } from "../api.js";
import {
  $, alertBox, clearError, el, field, loadModels, numberOf, progressRow, renderGrid, runJob, showError, sizeOptions,
} from "../ui.js";

const TINT = "rgba(255, 40, 120, 1)"; // how painted areas look over the image (drawn at half opacity)

let meta = {}; // the image model's limits
let source = null; // offscreen canvas: the image at working size (what is uploaded)
let mask = null; // offscreen canvas: black background, white strokes (the uploaded mask)
let tint = null; // offscreen canvas: the strokes in colour, for display
let painted = false;

export function init(section) {
  const canvas = el("canvas", { id: "edit-canvas", width: "1", height: "1", hidden: true,
    "aria-label": "The image; paint over the parts to repaint" });
  const brush = el("input", { id: "edit-brush", type: "range", min: "2", max: "120", value: "28" });
  const form = el("form", { novalidate: true, id: "edit-form", class: "panel form", onsubmit: submit },
    field("Image", el("input", { id: "edit-image", type: "file", accept: "image/png,image/jpeg,image/webp",
      onchange: loadImage }), "PNG, JPEG or WebP; large images are scaled to the model's size limit."),
    el("div", { class: "canvas-wrap" }, canvas,
      el("p", { id: "edit-canvas-empty", class: "muted empty" }, "Choose an image to start.")),
    el("div", { class: "row brush-row" },
      field("Brush size", brush),
      el("div", { class: "field" }, el("span", { class: "label-spacer", "aria-hidden": "true" }, "\u00a0"),
        el("button", { id: "edit-clear", type: "button", onclick: clearMask }, "Clear mask"))),
    el("p", { id: "edit-mode", class: "muted", "aria-live": "polite" },
      "Paint over the parts to repaint (inpainting), or leave the mask empty to redraw the whole image."),
    field("Prompt", el("textarea", { id: "edit-prompt", rows: "2", required: true, maxlength: "4000",
      placeholder: "a stained glass window" })),
    field("Negative prompt", el("input", { id: "edit-negative", type: "text" })),
    el("div", { class: "row three" },
      field("Strength", el("input", { id: "edit-strength", type: "number", min: "0.05", max: "1", step: "0.05",
        value: "0.8" }), "0–1: how much to change"),
      field("Images", el("select", { id: "edit-n" }, ...["1", "2", "4", "8"].map((n) => el("option", { value: n }, n)))),
      field("Size", el("select", { id: "edit-size" }, el("option", { value: "" }, "same as image")))),
    el("div", { class: "row" },
      field("Seed", el("input", { id: "edit-seed", type: "number", min: "0", step: "1", placeholder: "random" })),
      field("Steps", el("input", { id: "edit-steps", type: "number", min: "1", step: "1", placeholder: "default" }))),
    el("div", { class: "actions" },
      el("button", { id: "edit-submit", type: "submit", class: "primary" }, "Edit"),
      el("button", { id: "edit-cancel", type: "button", hidden: true }, "Cancel")),
    alertBox("edit-error"));
  const results = el("div", { class: "panel results" },
    progressRow("edit"),
    el("div", { id: "edit-grid", class: "grid cols-1", "data-count": "0" },
      el("p", { class: "muted empty" }, "Edited images appear here.")));
  section.append(el("div", { class: "layout" }, form, results));
  setupPainting(canvas, brush);
}

export async function show() {
  try {
    meta = (await loadModels()).image?.metadata || {};
    const select = $("#edit-size");
    const before = select.value;
    select.replaceChildren(el("option", { value: "" }, "same as image"),
      ...sizeOptions(meta).map((s) => el("option", { value: s }, s.replace("x", " × "))));
    select.value = before;
    clearError($("#edit-error"));
  } catch (err) {
    showError($("#edit-error"), err);
  }
}

function offscreen(width, height) {
  return Object.assign(document.createElement("canvas"), { width, height });
}

/** The working size: the image scaled so both sides fit the model's limits (multiples of 8). */
function workingSize(width, height) {
  const max = meta.max_size || 2048;
  const min = meta.min_size || 8;
  let scale = Math.min(1, max / Math.max(width, height));
  if (Math.min(width, height) * scale < min) scale = min / Math.min(width, height);
  const round8 = (v) => Math.max(8, Math.round((v * scale) / 8) * 8);
  return [Math.min(round8(width), max), Math.min(round8(height), max)];
}

async function loadImage(event) {
  const file = event.target.files[0];
  const error = $("#edit-error");
  clearError(error);
  if (!file) return;
  let bitmap;
  try {
    bitmap = await createImageBitmap(file);
  } catch {
    showError(error, "That file is not an image this browser can read (use PNG, JPEG or WebP).");
    return;
  }
  const [width, height] = workingSize(bitmap.width, bitmap.height);
  source = offscreen(width, height);
  source.getContext("2d").drawImage(bitmap, 0, 0, width, height);
  bitmap.close();
  mask = offscreen(width, height);
  tint = offscreen(width, height);
  const canvas = $("#edit-canvas");
  canvas.width = width;
  canvas.height = height;
  canvas.hidden = false;
  $("#edit-canvas-empty").hidden = true;
  clearMask();
}

function clearMask() {
  if (!mask) return;
  const ctx = mask.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, mask.width, mask.height);
  tint.getContext("2d").clearRect(0, 0, tint.width, tint.height);
  painted = false;
  updateMode();
  redraw();
}

function updateMode() {
  $("#edit-mode").textContent = painted
    ? "Inpainting: only the painted area is repainted."
    : "Image-to-image: nothing painted, so the whole image is redrawn. Paint over parts to inpaint instead.";
}

function redraw() {
  const ctx = $("#edit-canvas").getContext("2d");
  ctx.globalAlpha = 1;
  ctx.drawImage(source, 0, 0);
  ctx.globalAlpha = 0.5;
  ctx.drawImage(tint, 0, 0);
  ctx.globalAlpha = 1;
}

function setupPainting(canvas, brush) {
  let last = null;
  const point = (event) => {
    const box = canvas.getBoundingClientRect();
    const scale = canvas.width / box.width; // the canvas is shown scaled; paint in image pixels
    return { x: (event.clientX - box.left) * scale, y: (event.clientY - box.top) * scale, scale };
  };
  const stroke = (from, to) => {
    for (const [layer, colour] of [[mask, "#fff"], [tint, TINT]]) {
      const ctx = layer.getContext("2d");
      ctx.strokeStyle = colour;
      ctx.lineWidth = Number(brush.value) * to.scale;
      ctx.lineCap = "round";
      ctx.lineJoin = "round";
      ctx.beginPath();
      ctx.moveTo(from.x, from.y);
      ctx.lineTo(to.x + 0.01, to.y); // a zero-length line draws nothing; a dot needs a nudge
      ctx.stroke();
    }
    if (!painted) {
      painted = true;
      updateMode();
    }
    redraw();
  };
  canvas.addEventListener("pointerdown", (event) => {
    if (!source) return;
    event.preventDefault();
    canvas.setPointerCapture(event.pointerId);
    last = point(event);
    stroke(last, last);
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!last) return;
    const next = point(event);
    stroke(last, next);
    last = next;
  });
  const end = () => { last = null; };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
}

const pngOf = (canvas) => new Promise((resolve) => canvas.toBlob(resolve, "image/png"));

async function submit(event) {
  event.preventDefault();
  if (!source) {
    showError($("#edit-error"), "Choose an image first.");
    return;
  }
  const form = new FormData();
  // The canvas pixels, not the file: the mask then matches the image exactly (size and EXIF rotation).
  form.append("image", await pngOf(source), "image.png");
  if (painted) form.append("mask", await pngOf(mask), "mask.png");
  const fields = {
    prompt: $("#edit-prompt").value.trim(),
    negative_prompt: $("#edit-negative").value.trim(),
    strength: $("#edit-strength").value,
    n: $("#edit-n").value,
    size: $("#edit-size").value,
    seed: numberOf($("#edit-seed")),
    steps: numberOf($("#edit-steps")),
  };
  for (const [name, value] of Object.entries(fields)) {
    if (value !== undefined && value !== "") form.append(name, String(value));
  }
  const job = await runJob("edit", () => api("POST", "/v1/images/edits", { form, query: { async: "true" } }));
  if (job?.status === "completed") {
    renderGrid($("#edit-grid"), job.outputs.filter((o) => o.content_type.startsWith("image/")),
      painted ? "inpainted" : "image-to-image");
  }
}
