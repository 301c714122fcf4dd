// Videos: POST /v1/videos (multipart with an image: image-to-video; JSON with a prompt:
// text-to-video). The video id is its job id, so progress comes from /v1/jobs/{id}/events.
// Size and aspect, motion, seconds and the upscale options follow the models' limits (GET
// /v1/models); a video preset (GET /v1/presets?kind=video) fills the form with its settings.

import { api, mediaUrl } from "../api.js";
import {
  $, alertBox, clearError, el, field, loadModels, numberOf, progressRow, revokeBlobs, runJob, showError,
} from "../ui.js";

let preview = null; // object URL of the chosen image, revoked when replaced
let svd = {}; // the video model's limits (its GET /v1/models card's metadata)
let presets = []; // the caller's video presets

const ASPECTS = [["16:9", 16, 9], ["9:16", 9, 16], ["1:1", 1, 1], ["4:3", 4, 3], ["3:4", 3, 4]];

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
    field("Preset", el("select", { id: "video-preset", onchange: applyPreset }, el("option", { value: "" }, "none")),
      "Your video presets (Presets page): choosing one fills the settings below."),
    el("div", { class: "row" },
      field("Aspect", el("select", { id: "video-aspect", onchange: () => fillSizes() },
        ...ASPECTS.map(([name]) => el("option", { value: name }, name)))),
      field("Size", el("select", { id: "video-size" }))),
    el("div", { class: "row three" },
      field("Seconds", el("input", { id: "video-seconds", type: "number", min: "0.1", step: "0.1",
        placeholder: "default", oninput: showLength })),
      field("FPS", el("input", { id: "video-fps", type: "number", min: "1", step: "1", placeholder: "default",
        oninput: showLength })),
      field("Frames", el("input", { id: "video-frames", type: "number", min: "1", step: "1", placeholder: "default",
        oninput: showLength }))),
    el("p", { id: "video-length", class: "muted", "aria-live": "polite" }),
    el("div", { class: "row three" },
      field("Motion", el("input", { id: "video-motion", type: "number", min: "0", max: "255", step: "1",
        placeholder: "default 127" }), "Motion bucket, 0 to 255: more is more motion."),
      field("Noise", el("input", { id: "video-noise", type: "number", min: "0", max: "1", step: "0.01",
        placeholder: "default 0.02" }), "Noise augmentation, 0 to 1: more strays further from the image."),
      field("Steps", el("input", { id: "video-steps", type: "number", min: "1", step: "1", placeholder: "default" }))),
    el("div", { class: "row" },
      field("Seed", el("input", { id: "video-seed", type: "number", min: "0", step: "1", placeholder: "random" }))),
    // A labelled group, not a fieldset: a fieldset's min-content width can overflow a phone screen.
    el("div", { id: "video-upscale-options", class: "form", role: "group", "aria-labelledby": "video-upscale-title",
      hidden: true },
      el("span", { id: "video-upscale-title", class: "label-spacer" }, "Upscale (x4)"),
      el("div", { class: "check" },
        el("input", { id: "video-upscale", type: "checkbox" }),
        el("label", { for: "video-upscale" },
          "Upscale x4: the still before animating it (from a prompt), or the video (from an image)")),
      el("div", { class: "check" },
        el("input", { id: "video-upscale-video", type: "checkbox" }),
        el("label", { for: "video-upscale-video" }, "Upscale the finished video x4")),
      el("div", { class: "row" },
        field("Upscale steps", el("input", { id: "video-upscale-steps", type: "number", min: "1", step: "1",
          placeholder: "default" })),
        field("Noise level", el("input", { id: "video-noise-level", type: "number", min: "0", step: "1",
          placeholder: "default" })))),
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
  try {
    const [models, own] = await Promise.all([loadModels(), loadPresets()]);
    svd = models.all.find((m) => m.kind === "video")?.metadata || {};
    presets = own;
    fillChoices(models.all.some((m) => m.kind === "upscaler"));
    clearError($("#video-error")); // e.g. a 401 from before the key was entered
  } catch (err) {
    showError($("#video-error"), err);
  }
  const jobId = params.get("job"); // from the gallery's "Reuse settings"
  if (jobId) await reuse(jobId);
}

/** The caller's video presets; none if they cannot be read. */
async function loadPresets() {
  try {
    return (await api("GET", "/v1/presets", { query: { kind: "video" } })).data;
  } catch {
    return [];
  }
}

function fillChoices(upscaler) {
  const before = $("#video-preset").value;
  $("#video-preset").replaceChildren(el("option", { value: "" }, "none"), ...presets.map((p) =>
    el("option", { value: p.name }, p.category ? `${p.name} (${p.category})` : p.name)));
  if (presets.some((p) => p.name === before)) $("#video-preset").value = before;
  if (!$("#video-size").options.length && svd.default_width) {
    $("#video-aspect").value = aspectOf(svd.default_width, svd.default_height);
    fillSizes(`${svd.default_width}x${svd.default_height}`);
  }
  if (svd.max_seconds) $("#video-seconds").max = String(Math.max(svd.max_seconds, svd.max_num_frames / fps()));
  if (svd.max_num_frames) $("#video-frames").max = String(svd.max_num_frames);
  if (svd.min_fps) $("#video-fps").min = String(svd.min_fps);
  if (svd.max_fps) $("#video-fps").max = String(svd.max_fps);
  if (svd.default_fps) $("#video-fps").placeholder = `default ${svd.default_fps}`;
  if (svd.max_steps) $("#video-steps").max = String(svd.max_steps);
  if (svd.default_steps) $("#video-steps").placeholder = `default ${svd.default_steps}`;
  $("#video-upscale-options").hidden = !upscaler;
  showLength();
}

/** The aspect of the listed ones closest to width:height. */
function aspectOf(width, height) {
  const ratio = width / height;
  return ASPECTS.reduce((best, a) => Math.abs(Math.log(a[1] / a[2] / ratio)) < Math.abs(Math.log(best[1] / best[2] / ratio))
    ? a : best)[0];
}

/** Sizes of the chosen aspect within the model's limits (sides multiples of 8), largest first;
 * `pick` (a WIDTHxHEIGHT) is selected, added if it is not among them. */
function fillSizes(pick = null) {
  const [, w, h] = ASPECTS.find(([name]) => name === $("#video-aspect").value) || ASPECTS[2];
  const min = svd.min_size || 64;
  const max = svd.max_size || 1024;
  const round8 = (v) => Math.round(v / 8) * 8;
  const sizes = [];
  for (const long of [max, Math.max(svd.default_width || 0, svd.default_height || 0), 768, 512, 384, 256, 128, min]) {
    const [width, height] = w >= h ? [long, round8((long * h) / w)] : [round8((long * w) / h), long];
    const size = `${width}x${height}`;
    if (Math.min(width, height) >= min && Math.max(width, height) <= max && !sizes.includes(size)) sizes.push(size);
  }
  if (pick && !sizes.includes(pick)) sizes.unshift(pick);
  const keep = pick || $("#video-size").value;
  $("#video-size").replaceChildren(...sizes.map((s) => el("option", { value: s }, s.replace("x", " × "))));
  if (sizes.includes(keep)) $("#video-size").value = keep;
}

function fps() {
  return numberOf($("#video-fps")) || svd.default_fps || 7;
}

/** What the asked length makes: frames, and how many clips a longer video is chained from. */
function showLength() {
  const clip = svd.max_num_frames;
  if (!clip) return;
  const seconds = numberOf($("#video-seconds"));
  const frames = numberOf($("#video-frames")) ?? (seconds !== undefined ? Math.round(seconds * fps()) : null);
  const longest = Math.max(svd.max_seconds || 0, clip / fps());
  let text = `One clip is up to ${clip} frames (${(clip / fps()).toFixed(2)} s at ${fps()} fps); `
    + `longer videos, up to ${longest} s, are chained from clips, crossfaded where they join.`;
  if (frames && frames > clip) {
    const overlap = Math.min(svd.segment_overlap || 0, Math.floor(clip / 2));
    const clips = 1 + Math.ceil((frames - clip) / (clip - overlap));
    text = `${frames} frames: ${clips} clips of up to ${clip}, each overlapping the one before by ${overlap}. ` + text;
  }
  $("#video-length").textContent = text;
}

/** A preset's settings fill the form (what it leaves out is left as it is). */
function applyPreset() {
  const preset = presets.find((p) => p.name === $("#video-preset").value);
  if (!preset) return;
  const fields = { seconds: "#video-seconds", fps: "#video-fps", num_frames: "#video-frames",
    motion_bucket_id: "#video-motion", noise_aug_strength: "#video-noise", steps: "#video-steps" };
  for (const [name, selector] of Object.entries(fields)) if (preset[name] != null) $(selector).value = preset[name];
  // the preset's length in its own unit: the other field would override it
  if (preset.num_frames != null) $("#video-seconds").value = "";
  else if (preset.seconds != null) $("#video-frames").value = "";
  if (preset.size) setSize(preset.size);
  showLength();
}

function setSize(size) {
  const [width, height] = size.split("x").map(Number);
  $("#video-aspect").value = aspectOf(width, height);
  fillSizes(size);
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
    const stage = p.svd || {}; // a video job records its SVD stage's request under `svd`
    // A video longer than one clip (`chain`) is asked for in seconds; frames are one clip's.
    $("#video-frames").value = p.chain ? "" : stage.num_frames ?? p.num_frames ?? "";
    $("#video-seconds").value = p.chain ? p.seconds ?? "" : "";
    $("#video-fps").value = stage.fps ?? p.fps ?? "";
    $("#video-seed").value = stage.seed ?? p.seed ?? "";
    $("#video-motion").value = stage.motion_bucket_id ?? "";
    $("#video-noise").value = stage.noise_aug_strength ?? "";
    $("#video-steps").value = stage.steps ?? "";
    if (stage.width && stage.height) setSize(`${stage.width}x${stage.height}`);
    $("#video-upscale-video").checked = Boolean(p.upscale_video);
    $("#video-upscale").checked = Boolean(p.upscale);
    showLength();
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
    return el("li", { class: `stage ${state}` }, `${name} — ${state}${pct}${name === "video" ? clipsOf(job) : ""}`);
  }));
}

/** ", clip 2 of 3" for a video chained from clips (its job pins the `chain`), from the clips it has recorded. */
function clipsOf(job) {
  const chain = job.params?.chain;
  const frames = job.params?.num_frames;
  if (!chain || !frames) return "";
  const overlap = Math.min(chain.overlap || 0, Math.floor(chain.clip_frames / 2));
  const clips = 1 + Math.ceil((frames - chain.clip_frames) / (chain.clip_frames - overlap));
  const made = Object.keys(job.result?.stages || {}).filter((name) => name.startsWith("video.clip-")).length;
  return made >= clips ? `, ${clips} clips joined` : `, clip ${made + 1} of ${clips}`;
}

async function submit(event) {
  event.preventDefault();
  const file = $("#video-image").files[0];
  const upscaling = !$("#video-upscale-options").hidden && ($("#video-upscale").checked
    || $("#video-upscale-video").checked);
  const fields = {
    prompt: $("#video-prompt").value.trim() || undefined,
    preset: $("#video-preset").value || undefined,
    size: $("#video-size").value || undefined,
    seconds: numberOf($("#video-seconds")),
    num_frames: numberOf($("#video-frames")),
    fps: numberOf($("#video-fps")),
    motion_bucket_id: numberOf($("#video-motion")),
    noise_aug_strength: numberOf($("#video-noise")),
    steps: numberOf($("#video-steps")),
    seed: numberOf($("#video-seed")),
    upscale: upscaling && $("#video-upscale").checked ? true : undefined,
    upscale_video: upscaling && $("#video-upscale-video").checked ? true : undefined,
    upscale_steps: upscaling ? numberOf($("#video-upscale-steps")) : undefined,
    noise_level: upscaling ? numberOf($("#video-noise-level")) : undefined,
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
