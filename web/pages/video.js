// Videos: POST /v1/videos (multipart with an image: image-to-video; JSON with a prompt:
// text-to-video). The video id is its job id, so progress comes from /v1/jobs/{id}/events.

import { api, mediaUrl } from "../api.js";
import { $, alertBox, clearError, el, field, numberOf, progressRow, revokeBlobs, runJob, showError } from "../ui.js";

let preview = null; // object URL of the chosen image, revoked when replaced

export function init(section) {
  const form = el("form", { novalidate: true, id: "video-form", class: "panel form", onsubmit: submit },
    el("p", { class: "muted" },
      "With an image, it is animated (image-to-video). Without one, a still is made from the prompt first (text-to-video)."),
    field("Image (optional)", el("input", { id: "video-image", type: "file", accept: "image/png,image/jpeg,image/webp",
      onchange: showPreview })),
    el("div", { class: "preview-row" },
      el("img", { id: "video-preview", alt: "The image to animate", hidden: true }),
      el("button", { id: "video-clear-image", type: "button", hidden: true, onclick: clearImage }, "Remove image")),
    el("p", { id: "video-info", class: "muted", "aria-live": "polite" }),
    field("Prompt", el("textarea", { id: "video-prompt", rows: "2", maxlength: "4000",
      placeholder: "a paper boat on a pond (needed without an image)" })),
    el("div", { class: "row three" },
      field("Frames", el("input", { id: "video-frames", type: "number", min: "1", step: "1", placeholder: "default" })),
      field("FPS", el("input", { id: "video-fps", type: "number", min: "1", step: "1", placeholder: "default" })),
      field("Seed", el("input", { id: "video-seed", type: "number", min: "0", step: "1", placeholder: "random" }))),
    el("div", { class: "actions" },
      el("button", { id: "video-submit", type: "submit", class: "primary" }, "Make video"),
      el("button", { id: "video-cancel", type: "button", hidden: true }, "Cancel")),
    alertBox("video-error"));
  const results = el("div", { class: "panel results" },
    progressRow("video"),
    el("ol", { id: "video-stages", class: "stages", "aria-label": "Stages" }),
    el("div", { id: "video-result" }, el("p", { class: "muted empty" }, "Your video appears here.")));
  section.append(el("div", { class: "layout" }, form, results));
}

export async function show(params) {
  const jobId = params.get("job"); // from the gallery's "Reuse settings"
  if (jobId) await reuse(jobId);
}

/** Fill the form from a finished video job's recorded request (its lineage). */
async function reuse(jobId) {
  const error = $("#video-error");
  clearError(error);
  try {
    const job = await api("GET", `/v1/jobs/${encodeURIComponent(jobId)}`);
    const p = job.params || {};
    if (!job.kind.startsWith("videos.")) throw new Error(`Job ${jobId} (${job.kind}) is not a video.`);
    $("#video-prompt").value = p.prompt || p.sdxl?.prompt || "";
    const svd = p.svd || {}; // a video job records its SVD stage's request under `svd`
    $("#video-frames").value = svd.num_frames ?? p.num_frames ?? "";
    $("#video-fps").value = svd.fps ?? p.fps ?? "";
    $("#video-seed").value = svd.seed ?? p.seed ?? "";
    // A file input cannot be filled from a URL: the source image has to be chosen again.
    $("#video-info").textContent = job.kind === "videos.image_to_video"
      ? `Settings loaded from video ${jobId}. It was made from an image: choose that image again above.`
      : `Settings loaded from video ${jobId}.`;
  } catch (err) {
    showError(error, err);
  }
}

function showPreview() {
  const file = $("#video-image").files[0];
  if (preview) URL.revokeObjectURL(preview);
  preview = file ? URL.createObjectURL(file) : null;
  $("#video-preview").hidden = !file;
  $("#video-clear-image").hidden = !file;
  if (file) $("#video-preview").src = preview;
}

function clearImage() {
  $("#video-image").value = "";
  showPreview();
  $("#video-image").focus();
}

/** Stage list: done, current or waiting. */
function showStages(job) {
  const stages = job.stages || [];
  const current = stages.indexOf(job.stage);
  const done = job.status === "completed";
  $("#video-stages").replaceChildren(...stages.map((name, i) => {
    const state = done || i < current ? "done" : i === current ? job.status === "in_progress" ? "running" : job.status
      : "waiting";
    const pct = i === current && !done ? ` ${Math.round(job.stage_progress || 0)}%` : "";
    return el("li", { class: `stage ${state}` }, `${name} — ${state}${pct}`);
  }));
}

async function submit(event) {
  event.preventDefault();
  const file = $("#video-image").files[0];
  const fields = {
    prompt: $("#video-prompt").value.trim() || undefined,
    num_frames: numberOf($("#video-frames")),
    fps: numberOf($("#video-fps")),
    seed: numberOf($("#video-seed")),
  };
  let start;
  if (file) {
    const form = new FormData();
    form.append("input_reference", file, file.name);
    for (const [name, value] of Object.entries(fields)) if (value !== undefined) form.append(name, String(value));
    start = () => api("POST", "/v1/videos", { form });
  } else {
    start = () => api("POST", "/v1/videos", { json: fields });
  }
  $("#video-info").textContent = "";
  revokeBlobs($("#video-result"));
  $("#video-result").replaceChildren();
  const job = await runJob("video", start, { onUpdate: showStages });
  if (job?.status === "completed") await showVideo(job.id);
}

async function showVideo(id) {
  const base = `/v1/videos/${encodeURIComponent(id)}/content`;
  const player = el("video", { id: "video-player", controls: true, loop: true, muted: true, playsinline: true,
    preload: "auto" });
  // Attributes too (not only properties), so `muted` holds for autoplay rules and the markup says so.
  for (const name of ["controls", "loop", "muted", "playsinline"]) player.setAttribute(name, "");
  const download = el("a", { download: `${id}.mp4`, class: "button" }, "Download MP4");
  try {
    const [src, poster] = await Promise.all([mediaUrl(base), mediaUrl(`${base}?variant=thumbnail`).catch(() => null)]);
    if (poster) player.poster = poster;
    player.src = src;
    download.href = src;
    const info = await api("GET", `/v1/videos/${encodeURIComponent(id)}`);
    $("#video-result").replaceChildren(player,
      el("p", { class: "muted" }, `${info.size}, ${info.num_frames} frames at ${info.fps} fps (${info.seconds} s), seed ${info.seed}. `, download));
  } catch (err) {
    showError($("#video-error"), `The video is ready but could not be loaded: ${err.message}`);
  }
}
