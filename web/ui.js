// Shared page helpers: a tiny DOM builder, API error display, job progress, output grids.

import { api, followJob, getKey, mediaUrl } from "./api.js";

/** el("button", {type: "button", onclick}, "Text") — attributes starting with "on" are listeners. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "class") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else if (name in node && typeof value !== "string") node[name] = value;
    else node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return node;
}

export const $ = (selector, root = document) => root.querySelector(selector);

// --- errors -------------------------------------------------------------------------------------

/** An API error (or any error, or a string) in plain words. */
export function errorText(err) {
  if (typeof err === "string") return err;
  if (!err) return "Something went wrong.";
  if (err.status === 503 || err.status === 429) {
    return `The server is busy; try again in ${err.retryAfter ?? 5} s.`;
  }
  if (err.status === 401) return `${err.message} — enter a valid API key at the top of the page.`;
  let text = err.message || String(err);
  // Name the field unless the message already starts with it ("n: Input should be ...").
  if (err.param && !text.startsWith(`${err.param}:`)) {
    text += ` (field: ${err.param})`;
  }
  return text;
}

export function showError(box, err) {
  box.textContent = errorText(err);
  box.hidden = false;
}

export function clearError(box) {
  box.textContent = "";
  box.hidden = true;
}

/** An empty, hidden alert box; the page places it next to the form that makes the request. */
export function alertBox(id) {
  return el("div", { id, class: "error", role: "alert", hidden: true });
}

// --- jobs ----------------------------------------------------------------------------------------

/** A progress bar and its text label, in a row hidden until a job starts. */
export function progressRow(prefix) {
  return el("div", { class: "progress-row", id: `${prefix}-progress-row`, hidden: true },
    el("progress", { id: `${prefix}-progress`, max: "100", value: "0", "aria-labelledby": `${prefix}-progress-label` }),
    el("span", { id: `${prefix}-progress-label`, class: "progress-label", "aria-live": "polite" }, "0%"));
}

export function setProgress(prefix, job) {
  const done = job.status === "completed";
  // 100% only once completed: a job at 100% of its last step is still saving its outputs.
  const pct = done ? 100 : Math.max(0, Math.min(99, Math.round(Number(job.progress) || 0)));
  const bar = $(`#${prefix}-progress`);
  const stages = job.stages || [];
  let where = job.status.replace("_", " ");
  if (job.stage && (job.status === "queued" || job.status === "in_progress")) {
    const index = stages.indexOf(job.stage);
    where = stages.length > 1 && index >= 0 ? `${job.stage} (stage ${index + 1} of ${stages.length})` : job.stage;
  }
  $(`#${prefix}-progress-row`).hidden = false;
  bar.value = pct;
  $(`#${prefix}-progress-label`).textContent = `${pct}% · ${where}`;
}

/**
 * Submit a job and follow it to the end: the one path every page uses. `start()` makes the
 * request and answers the 202 job (or video) object. Progress goes to `#<prefix>-progress` and
 * its label, errors to `#<prefix>-error`; the submit button (default `#<prefix>-submit`) is
 * disabled and `#<prefix>-cancel` (if any) shown while it runs. Resolves with the final job, or
 * null if it never started or could not be followed.
 */
export async function runJob(prefix, start, { onUpdate = () => {}, submit = $(`#${prefix}-submit`) } = {}) {
  const error = $(`#${prefix}-error`);
  const cancel = $(`#${prefix}-cancel`);
  clearError(error);
  submit.disabled = true;
  $(`#${prefix}-progress-row`).hidden = true; // the last job's progress says nothing about this one
  let job;
  try {
    job = await start();
  } catch (err) {
    showError(error, err);
    submit.disabled = false;
    return null;
  }
  if (cancel) {
    cancel.hidden = false;
    cancel.disabled = false;
    cancel.onclick = async () => {
      cancel.disabled = true;
      try {
        await api("POST", `/v1/jobs/${encodeURIComponent(job.id)}/cancel`);
      } catch (err) {
        showError(error, err);
      }
    };
  }
  const update = (j) => {
    setProgress(prefix, j);
    onUpdate(j);
  };
  try {
    update(job);
    job = await followJob(job.id, update);
    if (job.status === "failed") showError(error, `The job failed: ${job.error?.message || "no reason given"}`);
    if (job.status === "cancelled") showError(error, "The job was cancelled.");
    return job;
  } catch (err) {
    showError(error, err);
    return null;
  } finally {
    submit.disabled = false;
    if (cancel) cancel.hidden = true;
  }
}

// --- media and output grids ----------------------------------------------------------------------

const lazy = "IntersectionObserver" in window
  ? new IntersectionObserver((entries) => {
    for (const entry of entries) {
      if (entry.isIntersecting) {
        lazy.unobserve(entry.target);
        for (const load of entry.target._loads.splice(0)) load();
      }
    }
  }, { rootMargin: "200px" })
  : null;

/**
 * Point `node` (img/video) at `url`, through a blob when an API key is set; `also(src)` gets
 * the usable URL too (for Open/Download links). `attribute` is "src", or "poster" for a video's
 * still. Blob fetches wait until the node is near view.
 */
export function setMedia(node, url, also = () => {}, attribute = "src") {
  if (!getKey()) {
    node[attribute] = url;
    also(url);
    return;
  }
  const load = async () => {
    try {
      const src = await mediaUrl(url);
      node[attribute] = src;
      also(src);
    } catch {
      // A missing poster leaves the video playable; missing media is said in words.
      if (attribute === "src") node.replaceWith(el("p", { class: "muted" }, "(could not load this file)"));
    }
  };
  (node._loads ||= []).push(load); // a video may wait for both its src and its poster
  if (lazy) lazy.observe(node);
  else load();
}

/**
 * One output (image or video) as a figure with Open and Download links. `poster` is the
 * output (an image) shown on a video before it plays.
 */
export function outputFigure(output, caption = "", { poster = null } = {}) {
  const isVideo = (output.content_type || "").startsWith("video/");
  const seedText = output.seed != null ? `seed ${output.seed}` : "";
  const media = isVideo
    ? el("video", { controls: true, loop: true, muted: true, playsInline: true, preload: "metadata",
      "aria-label": `Generated video${seedText ? `, ${seedText}` : ""}` })
    : el("img", { alt: `Generated image${seedText ? `, ${seedText}` : ""}`, loading: "lazy", decoding: "async" });
  if (!isVideo && output.width) {
    media.width = output.width;
    media.height = output.height;
  }
  const name = output.key.split("/").pop();
  const open = el("a", { target: "_blank", rel: "noopener" }, "Open");
  const download = el("a", { download: name }, "Download");
  if (isVideo && poster) setMedia(media, poster.url, undefined, "poster");
  setMedia(media, output.url, (src) => {
    open.href = src;
    download.href = src;
  });
  const size = output.width ? `${output.width}×${output.height}` : "";
  const frames = isVideo && output.extra?.num_frames
    ? `${output.extra.num_frames} frames${output.extra.fps ? ` at ${output.extra.fps} fps` : ""}` : "";
  return el("figure", { class: isVideo ? "thumb video" : "thumb" }, media,
    el("figcaption", {}, el("span", { class: "muted" }, [caption, seedText, size, frames].filter(Boolean).join(" · ")),
      el("span", { class: "links" }, open, download)));
}

/** Columns for a batch: 1 → 1, 2 → 2, 4 → 2×2, 8 → 2×4 (CSS drops 4 columns to 2 on phones). */
export function columnsFor(count) {
  return count <= 1 ? 1 : count <= 4 ? 2 : 4;
}

/** Free the blob: URLs (made when an API key is set) of the media inside `container`. */
export function revokeBlobs(container) {
  for (const media of container.querySelectorAll("img, video")) {
    for (const url of [media.src, media.poster]) if (url?.startsWith("blob:")) URL.revokeObjectURL(url);
  }
}

/** Render outputs into a grid element, replacing what it showed. */
export function renderGrid(grid, outputs, caption = "") {
  revokeBlobs(grid);
  grid.replaceChildren(...outputs.map((o) => outputFigure(o, caption)));
  grid.dataset.count = String(outputs.length);
  grid.classList.remove("cols-1", "cols-2", "cols-4");
  grid.classList.add(`cols-${columnsFor(outputs.length)}`);
}

// --- forms -----------------------------------------------------------------------------------------

/** A labelled field: label[for] + control (+ optional hint). */
export function field(label, control, hint = "") {
  return el("div", { class: "field" },
    el("label", { for: control.id }, label), control, hint ? el("small", { class: "muted" }, hint) : null);
}

/** The number in an input, or undefined when it is empty (so the server default applies). */
export function numberOf(input) {
  const text = input.value.trim();
  return text === "" ? undefined : Number(text);
}

/** Size options from the image model card: squares and a few aspect ratios, within its limits. */
export function sizeOptions(meta) {
  const min = meta.min_size || 64;
  const max = meta.max_size || 2048;
  const base = meta.default_size || 1024;
  const round8 = (v) => Math.max(8, Math.round(v / 8) * 8);
  const sizes = [[base, base]];
  for (const [w, h] of [[4, 3], [3, 4], [16, 9], [9, 16]]) {
    const scale = Math.sqrt((base * base) / (w * h));
    sizes.push([round8(w * scale), round8(h * scale)]);
  }
  for (let side = min; side <= max; side *= 2) {
    sizes.push([side, side]);
    if (side * 1.5 <= max) sizes.push([round8(side * 1.5), round8(side * 1.5)]);
  }
  const seen = new Set();
  return sizes
    .filter(([w, h]) => Math.min(w, h) >= min && Math.max(w, h) <= max)
    .map(([w, h]) => `${w}x${h}`)
    .filter((s) => !seen.has(s) && seen.add(s));
}

/** GET /v1/models, split by kind. */
export async function loadModels() {
  const { data } = await api("GET", "/v1/models");
  return {
    image: data.find((m) => m.kind === "image"),
    loras: data.filter((m) => m.kind === "lora"),
    all: data,
  };
}

export function formatTime(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleString() : "";
}
