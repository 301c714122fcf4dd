// Image-to-image and inpainting: POST /v1/images/edits?async=true (multipart). The image is
// drawn on a canvas; the user paints the mask over it (white = repaint), with a pointer or the
// keyboard (arrow keys move a brush outline, Space or Enter paints). No paint: image-to-image.

import { api } from "../api.js";
import {
  $, alertBox, clearError, el, field, loadModels, numberOf, progressRow, renderGrid, runJob, showError, sizeOptions,
} from "../ui.js";

const TINT = "rgba(255, 40, 120, 1)"; // how painted areas look over the image (drawn at half opacity)
const KEY_STEP_PX = 8; // how far an arrow key moves the brush, in screen pixels (Shift: 4 times that)
const BRUSH_STEP_PX = 4; // how much [ and ] change the brush size
const KEYS_HELP = "Arrow keys move the brush (Shift moves faster); Space or Enter paints, and held down while " +
  "moving paints a line; [ and ] change the brush size.";

let meta = {}; // the image model's limits
let source = null; // offscreen canvas: the image at working size (what is uploaded)
let mask = null; // the #edit-mask canvas (never shown): black background, white strokes (the uploaded mask)
let tint = null; // offscreen canvas: the strokes in colour, for display
let painted = false;
let brushAt = null; // {x, y}: the brush's centre in image pixels
let showBrush = false; // the outline is drawn while the canvas has focus or the pointer is over it

export function init(section) {
  // Focusable, with its own keys (role "application" lets screen readers pass them through).
  const canvas = el("canvas", { id: "edit-canvas", width: "1", height: "1", hidden: true, tabindex: "0",
    role: "application", "aria-describedby": "edit-mode",
    "aria-label": `Inpainting mask over the image: painted parts are repainted. ${KEYS_HELP}` });
  const maskCanvas = el("canvas", { id: "edit-mask", width: "1", height: "1", hidden: true, "aria-hidden": "true" });
  const brush = el("input", { id: "edit-brush", type: "range", min: "2", max: "120", value: "28" });
  const form = el("form", { novalidate: true, id: "edit-form", class: "panel form", onsubmit: submit },
    field("Image", el("input", { id: "edit-image", type: "file", accept: "image/png,image/jpeg,image/webp",
      onchange: loadImage }), "PNG, JPEG or WebP; large images are scaled to the model's size limit."),
    el("div", { class: "canvas-wrap" }, canvas, maskCanvas,
      el("p", { id: "edit-canvas-empty", class: "muted empty" }, "Choose an image to start.")),
    el("p", { id: "edit-keys", class: "muted hint" }, `Keyboard: Tab to the image. ${KEYS_HELP}`),
    el("div", { class: "row brush-row" },
      el("div", { class: "field" },
        el("label", { for: "edit-brush" }, "Brush size ", el("span", { id: "edit-brush-value", class: "muted" }, "28 px")),
        brush),
      el("div", { class: "field" }, el("span", { class: "label-spacer", "aria-hidden": "true" }, "\u00a0"),
        el("div", { class: "actions" },
          el("button", { id: "edit-fill", type: "button", onclick: fillMask }, "Fill all"),
          el("button", { id: "edit-clear", type: "button", onclick: clearMask }, "Clear")))),
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
  mask = $("#edit-mask");
  mask.width = width;
  mask.height = height;
  tint = offscreen(width, height);
  const canvas = $("#edit-canvas");
  canvas.width = width;
  canvas.height = height;
  canvas.hidden = false;
  $("#edit-canvas-empty").hidden = true;
  moveBrush(width / 2, height / 2);
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

/** Mask the whole image: every pixel is repainted (inpainting with nothing kept). */
function fillMask() {
  if (!mask) return;
  for (const [layer, colour] of [[mask, "#fff"], [tint, TINT]]) {
    const ctx = layer.getContext("2d");
    ctx.fillStyle = colour;
    ctx.fillRect(0, 0, layer.width, layer.height);
  }
  painted = true;
  updateMode();
  redraw();
}

function updateMode() {
  $("#edit-mode").textContent = painted
    ? "Inpainting: only the painted area is repainted."
    : "Image-to-image: nothing painted, so the whole image is redrawn. Paint over parts to inpaint instead.";
}

/** Image pixels per screen pixel: the canvas is shown scaled to its column. */
function displayScale(canvas) {
  const width = canvas.getBoundingClientRect().width;
  return width ? canvas.width / width : 1;
}

/** Put the brush at (x, y), kept on the image; its position is also in the canvas's data-brush-x/-y. */
function moveBrush(x, y) {
  const canvas = $("#edit-canvas");
  brushAt = { x: Math.min(Math.max(x, 0), canvas.width - 1), y: Math.min(Math.max(y, 0), canvas.height - 1) };
  canvas.dataset.brushX = String(Math.round(brushAt.x));
  canvas.dataset.brushY = String(Math.round(brushAt.y));
}

function redraw() {
  if (!source) return;
  const canvas = $("#edit-canvas");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height); // the last brush outline goes, even over a transparent image
  ctx.globalAlpha = 1;
  ctx.drawImage(source, 0, 0);
  ctx.globalAlpha = 0.5;
  ctx.drawImage(tint, 0, 0);
  ctx.globalAlpha = 1;
  if (showBrush && brushAt) {
    // The brush outline (display only, never uploaded): a light ring on a dark one shows on any image.
    const scale = displayScale(canvas);
    const radius = Math.max((Number($("#edit-brush").value) * scale) / 2, scale);
    for (const [colour, width] of [["rgba(0, 0, 0, 0.75)", 3], ["#fff", 1.5]]) {
      ctx.strokeStyle = colour;
      ctx.lineWidth = width * scale;
      ctx.beginPath();
      ctx.arc(brushAt.x, brushAt.y, radius, 0, 2 * Math.PI);
      ctx.stroke();
    }
  }
}

function setupPainting(canvas, brush) {
  let last = null; // the pointer's last point while a button is down
  let hovering = false;
  let penDown = false; // Space or Enter held on the canvas
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

  // --- pointer ---
  canvas.addEventListener("pointerdown", (event) => {
    if (!source) return;
    event.preventDefault(); // no text selection or scrolling; it also skips the focus, so focus here
    canvas.focus({ preventScroll: true });
    canvas.setPointerCapture(event.pointerId);
    last = point(event);
    moveBrush(last.x, last.y);
    stroke(last, last);
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!source) return;
    const next = point(event);
    moveBrush(next.x, next.y);
    showBrush = true;
    if (!last) return redraw();
    stroke(last, next);
    last = next;
  });
  const end = () => { last = null; };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
  canvas.addEventListener("pointerenter", () => { hovering = true; });
  canvas.addEventListener("pointerleave", () => {
    hovering = false;
    showBrush = document.activeElement === canvas;
    redraw();
  });

  // --- keyboard ---
  const MOVES = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
  const isPaintKey = (event) => event.key === " " || event.key === "Enter";
  canvas.addEventListener("keydown", (event) => {
    if (!source || event.altKey || event.ctrlKey || event.metaKey) return; // browser and screen reader keys
    const scale = displayScale(canvas);
    if (event.key in MOVES) {
      const [dx, dy] = MOVES[event.key];
      const step = KEY_STEP_PX * scale * (event.shiftKey ? 4 : 1);
      const from = { ...brushAt, scale };
      moveBrush(brushAt.x + dx * step, brushAt.y + dy * step);
      if (penDown) stroke(from, { ...brushAt, scale });
      else redraw();
    } else if (isPaintKey(event)) {
      if (!event.repeat) {
        penDown = true;
        stroke({ ...brushAt, scale }, { ...brushAt, scale });
      }
    } else if (event.key === "[" || event.key === "]") {
      // The range input clamps the value to its min and max.
      brush.value = String(Number(brush.value) + (event.key === "]" ? BRUSH_STEP_PX : -BRUSH_STEP_PX));
      brush.dispatchEvent(new Event("input", { bubbles: true }));
    } else {
      return; // Tab and the rest keep their usual meaning
    }
    event.preventDefault(); // no page scrolling on arrows or Space
  });
  canvas.addEventListener("keyup", (event) => {
    if (isPaintKey(event)) penDown = false;
  });
  canvas.addEventListener("focus", () => {
    showBrush = true;
    redraw();
  });
  canvas.addEventListener("blur", () => {
    penDown = false;
    showBrush = hovering;
    redraw();
  });

  brush.addEventListener("input", () => {
    $("#edit-brush-value").textContent = `${brush.value} px`;
    redraw(); // the outline shows the new size
  });
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
