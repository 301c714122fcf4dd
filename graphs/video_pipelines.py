"""Fixed media pipelines run as jobs: upscale, text-to-image-hd, image-to-video, text-to-video.

    images.upscale            upscale
    images.text_to_image_hd   [refine] → generate (SDXL) → upscale
    videos.image_to_video     video (SVD) → [upscale_video]
    videos.text_to_video      [refine] → generate (SDXL) → [upscale] → video (SVD) → [upscale_video]

Each stage is one streamed call to one deployment, so each scales on its own. Stages hand each
other storage keys: a deployment reads its input from storage and stores its output there, so no
image or video passes through the runner or the ingress. The ingress declares the stage list at
submit time, so the job's overall progress is right from the first step.

What a stage produced (keys, sizes, timings, the stage progress it reached) is recorded in
`record.result["stages"]`, in the order the stages ran, as each finishes. A job retried after a
replica died resumes after its last finished stage.

A video longer than one SVD clip (its payload has a `chain`) is one "video" stage of several SVD
calls: clip i + 1 starts from the frame of clip i where their crossfade begins (a PNG the clip
stores, passed on by key), and SVD's `join` crossfades the stored clips into one MP4. Progress
runs once 0 → 100 over all clips; each finished clip is recorded as `stages["video.clip-<i>"]`
(key, seed, frames), so a retried job resumes after its last finished clip, and a cancel stops
before the next clip starts.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from deployments.errors import JobCancelledError
from deployments.llm.contract import RefinedPrompt
from deployments.sdxl.contract import SDXLRequest
from deployments.svd.contract import SVDChain, SVDJoinRequest, SVDJoinResponse, SVDRequest, SVDResponse, SVDSegment
from deployments.upscaler.contract import UpscaleRequest, UpscaleResponse
from graphs.payloads import (
    ImageToVideoPayload,
    ImageUpscalePayload,
    ModerationSpec,
    RefineSpec,
    TextToImageHDPayload,
    TextToVideoPayload,
)
from graphs.pipelines import drain_stream, refine_stage, refined_request, stream_sdxl, with_fields
from graphs.vision import store_moderated
from storage.jobs import JobOutput

def stream_call(ctx, stream, call: int = 0, calls: int = 1) -> Any:
    """Drain one streamed deployment call on the job; returns its response. A stage of several
    calls (one upscale per image) reports call `call` of `calls`, so its progress runs once 0 → 100."""
    return drain_stream(stream, lambda step, total: ctx.step(call * total + step, calls * total),
                        ctx.check_cancelled)


def run_stage(ctx, name: str, run: Callable[[], dict]) -> dict:
    """Run one stage unless an earlier attempt of this job finished it; record what it made."""
    stages = ctx.record.result.setdefault("stages", {})
    if name in stages:
        return stages[name]
    ctx.check_cancelled()
    ctx.start_stage(name)
    started = time.time()
    info = run()
    # The stage's own history: when it ran and how far its progress got (100 once its last step
    # was reported), so a finished job shows that each stage ran to the end, not just that it began.
    info.update(started_at=started, finished_at=time.time(), stage_progress=ctx.record.stage_progress,
                total_steps=ctx.record.total_steps)
    stages[name] = info
    ctx.save()  # the keys are durable before the next stage starts
    return info


def _handle(handles: dict[str, Any], name: str):
    handle = handles.get(name)
    if handle is None:  # the ingress refuses such jobs; this guards records from older configs
        raise RuntimeError(f"this job needs the {name!r} deployment, which this application does not deploy")
    return handle


def _begin(ctx, **summary: Any) -> dict:
    """The job's result summary, kept across retries; stages add to it as they finish."""
    if ctx.record.result is None or "stages" not in ctx.record.result:
        ctx.record.result = {**summary, "stages": {}}
    return ctx.record.result


# --- stages -------------------------------------------------------------------------------------


def _refine(ctx, handles, spec: RefineSpec) -> dict:
    refined = refine_stage(ctx, handles, spec)  # starts the "refine" stage itself
    return {"refined": refined.model_dump(mode="json")}


def _generate(ctx, handles, sdxl: SDXLRequest, moderation: ModerationSpec | None = None) -> dict:
    """SDXL's images, stored under the job's id: by the replica, or (with `moderation`) here once
    each has been looked at (a refused image fails the job, unstored)."""
    request = with_fields(sdxl, job_id=ctx.id, store=moderation is None, output_id=ctx.id)
    response = stream_sdxl(ctx, _handle(handles, "sdxl"), request)
    if moderation is not None:
        store_moderated(ctx.store.storage, _handle(handles, "llm"), response.images, ctx.id, moderation,
                        ctx.check_cancelled)
    return {
        "keys": [image.key for image in response.images], "seeds": [image.seed for image in response.images],
        "width": response.images[0].width, "height": response.images[0].height, "prompt": response.prompt,
        "negative_prompt": response.negative_prompt, "steps": response.steps, "elapsed_s": response.elapsed_s,
    }


def _upscale(ctx, handles, spec: UpscaleRequest, sources: list[dict], stage: str) -> dict:
    """x4 each source (`{"image_key": …}` or `{"video_key": …}`, maybe with its own seed) with the
    job's upscale settings `spec`, one call after another."""
    handle = _handle(handles, "upscaler").options(stream=True)
    responses: list[UpscaleResponse] = []
    for i, source in enumerate(sources):
        request = with_fields(spec, **source, job_id=ctx.id, store=True,
                              output_id=f"{ctx.id}.{stage}" + (f"-{i}" if len(sources) > 1 else ""))
        responses.append(stream_call(ctx, handle.upscale_stream.remote(request), i, len(sources)))
    first = responses[0]
    return {
        "keys": [r.key for r in responses], "key": first.key, "media": first.media, "width": first.width,
        "height": first.height, "num_frames": first.num_frames, "fps": first.fps, "seed": first.seed,
        "steps": first.steps, "noise_level": first.noise_level, "tiles": first.tiles,
        "elapsed_s": sum(r.elapsed_s for r in responses),
    }


def _animate(ctx, handles, svd: SVDRequest, image_key: str) -> dict:
    request = with_fields(svd, image_key=image_key, image=None, job_id=ctx.id, store=True,
                          output_id=f"{ctx.id}.video")
    response: SVDResponse = stream_call(ctx, _handle(handles, "svd").options(stream=True).generate_stream.remote(request))
    return {
        "key": response.video_key, "poster_key": response.poster_key, "num_frames": response.num_frames,
        "fps": response.fps, "width": response.width, "height": response.height, "seed": response.seed,
        "steps": response.steps, "motion_bucket_id": response.motion_bucket_id,
        "noise_aug_strength": response.noise_aug_strength, "elapsed_s": response.elapsed_s,
    }


def _video(ctx, handles, payload: ImageToVideoPayload | TextToVideoPayload, svd: SVDRequest, image_key: str) -> dict:
    """The "video" stage: one SVD call, or a chain of them for a video longer than one clip."""
    if payload.chain is None:
        return run_stage(ctx, "video", lambda: _animate(ctx, handles, svd, image_key))
    return run_stage(ctx, "video", lambda: _animate_chain(ctx, handles, svd, payload.chain, image_key))


def _animate_chain(ctx, handles, svd: SVDRequest, chain: SVDChain, image_key: str) -> dict:
    """SVD clips one after another, each from the frame of the one before where their crossfade
    begins, then joined into one MP4 with the overlaps crossfaded."""
    handle = _handle(handles, "svd")
    segments = chain.plan(svd.num_frames, svd.seed)
    overlap = chain.overlap_frames()
    stages = ctx.record.result["stages"]
    clips: list[dict] = []
    for segment in segments:
        name = f"video.clip-{segment.index}"
        if name not in stages:  # else an earlier attempt of this job made it
            _stop_if_cancelled(ctx)
            started = time.time()
            clip = _clip(ctx, handle, svd, segment, len(segments), overlap,
                         clips[-1]["handoff_key"] if clips else image_key)
            stages[name] = {**clip, "started_at": started, "finished_at": time.time()}
            ctx.save()  # durable before the next clip starts
        clips.append(stages[name])
    _stop_if_cancelled(ctx)
    request = SVDJoinRequest(video_keys=[clip["key"] for clip in clips], overlap=overlap, fps=clips[0]["fps"],
                             job_id=ctx.id, store=True, output_id=f"{ctx.id}.video")
    joined: SVDJoinResponse = handle.join.remote(request).result()
    first = clips[0]
    return {
        "key": joined.video_key, "poster_key": first["poster_key"], "num_frames": joined.num_frames,
        "fps": joined.fps, "width": joined.width, "height": joined.height, "seed": svd.seed,
        "steps": first["steps"], "motion_bucket_id": first["motion_bucket_id"],
        "noise_aug_strength": first["noise_aug_strength"], "clips": len(clips), "overlap": overlap,
        "elapsed_s": sum(clip["elapsed_s"] for clip in clips) + joined.elapsed_s,
    }


def _clip(ctx, handle, svd: SVDRequest, segment: SVDSegment, count: int, overlap: int, image_key: str) -> dict:
    """Clip `segment.index` of `count`; all but the last store the frame the next one starts from:
    the first of its last `overlap` frames, which the next clip's first frames are crossfaded with."""
    last = segment.index == count - 1
    request = with_fields(svd, image_key=image_key, image=None, num_frames=segment.num_frames, seed=segment.seed,
                          handoff_frame=None if last else -max(overlap, 1), job_id=ctx.id, store=True,
                          output_id=f"{ctx.id}.video-{segment.index}")
    stream = handle.options(stream=True).generate_stream.remote(request)
    response: SVDResponse = stream_call(ctx, stream, segment.index, count)
    return {
        "index": segment.index, "key": response.video_key, "poster_key": response.poster_key,
        "handoff_key": response.handoff_key, "image_key": image_key, "seed": response.seed,
        "num_frames": response.num_frames, "fps": response.fps, "width": response.width, "height": response.height,
        "steps": response.steps, "motion_bucket_id": response.motion_bucket_id,
        "noise_aug_strength": response.noise_aug_strength, "elapsed_s": response.elapsed_s,
    }


def _stop_if_cancelled(ctx) -> None:
    """Before starting a clip: a cancel asked for at any time before now stops the job (the
    context's own check reads the marker at most every 0.25 s)."""
    if ctx.store.is_cancel_requested(ctx.id):
        raise JobCancelledError("cancelled by request")


def _add_video_outputs(ctx, video: dict, final: dict) -> None:
    """The video the client downloads (upscaled if asked), then its poster (SVD's first frame)."""
    ctx.add_output(JobOutput(key=final["key"], content_type="video/mp4", width=final["width"],
                             height=final["height"], seed=video["seed"],
                             extra={"num_frames": video["num_frames"], "fps": video["fps"], "role": "video"}))
    ctx.add_output(JobOutput(key=video["poster_key"], content_type="image/png", width=video["width"],
                             height=video["height"], seed=video["seed"], extra={"role": "thumbnail"}))


# --- pipelines ----------------------------------------------------------------------------------


def image_upscale(ctx, handles: dict[str, Any]) -> None:
    """images.upscale: the payload's `upscale` request names its input by image_key."""
    payload: ImageUpscalePayload = ctx.payload
    spec = payload.upscale
    source = {"image_key": spec.image_key}
    _begin(ctx, prompt=spec.prompt if "prompt" in spec.model_fields_set else None, seed=spec.seed)
    up = run_stage(ctx, "upscale", lambda: _upscale(ctx, handles, spec, [source], "upscale"))
    ctx.add_output(JobOutput(key=up["key"], content_type="image/png", width=up["width"], height=up["height"],
                             seed=up["seed"]))


def text_to_image_hd(ctx, handles: dict[str, Any]) -> None:
    """images.text_to_image_hd: [refine] → generate → upscale: every image of the batch x4."""
    payload: TextToImageHDPayload = ctx.payload
    sdxl = payload.sdxl
    _begin(ctx, prompt=sdxl.prompt, seed=sdxl.seed)
    if payload.refine:
        refined = run_stage(ctx, "refine", lambda: _refine(ctx, handles, payload.refine))
        sdxl = _apply(sdxl, refined)
    generated = run_stage(ctx, "generate", lambda: _generate(ctx, handles, sdxl, payload.moderation))
    spec = with_fields(payload.upscale, prompt=generated["prompt"])
    # Each image is upscaled with its own seed, so image i of the batch is reproducible alone.
    sources = [{"image_key": key, "seed": seed} for key, seed in zip(generated["keys"], generated["seeds"])]
    up = run_stage(ctx, "upscale", lambda: _upscale(ctx, handles, spec, sources, "upscale"))
    for key, seed in zip(up["keys"], generated["seeds"]):
        ctx.add_output(JobOutput(key=key, content_type="image/png", width=up["width"], height=up["height"],
                                 seed=seed))
    ctx.record.result.update(prompt=generated["prompt"], width=up["width"], height=up["height"])


def image_to_video(ctx, handles: dict[str, Any]) -> None:
    """videos.image_to_video: video (SVD, from `svd.image_key`) → [upscale_video]."""
    payload: ImageToVideoPayload = ctx.payload
    svd = payload.svd
    _begin(ctx, prompt=payload.prompt, seed=svd.seed, num_frames=svd.num_frames, fps=svd.fps,
           input_key=svd.image_key)
    video = _video(ctx, handles, payload, svd, svd.image_key)
    final = _upscale_video(ctx, handles, payload.upscale_video, payload.prompt, video)
    _add_video_outputs(ctx, video, final)


def text_to_video(ctx, handles: dict[str, Any]) -> None:
    """videos.text_to_video: [refine] → generate (SDXL) → [upscale] → video (SVD) → [upscale_video]."""
    payload: TextToVideoPayload = ctx.payload
    sdxl, svd = payload.sdxl, payload.svd
    _begin(ctx, prompt=sdxl.prompt, seed=svd.seed, num_frames=svd.num_frames, fps=svd.fps)
    if payload.refine:
        refined = run_stage(ctx, "refine", lambda: _refine(ctx, handles, payload.refine))
        sdxl = _apply(sdxl, refined)
    generated = run_stage(ctx, "generate", lambda: _generate(ctx, handles, sdxl, payload.moderation))
    still = generated["keys"][0]
    if _given(payload.upscale):
        spec = with_fields(payload.upscale, prompt=generated["prompt"])
        still = run_stage(ctx, "upscale", lambda: _upscale(
            ctx, handles, spec, [{"image_key": generated["keys"][0]}], "upscale"))["key"]
    video = _video(ctx, handles, payload, svd, still)
    final = _upscale_video(ctx, handles, payload.upscale_video, generated["prompt"], video)
    _add_video_outputs(ctx, video, final)
    ctx.record.result["prompt"] = generated["prompt"]


def _upscale_video(ctx, handles, spec: UpscaleRequest | None, prompt: str | None, video: dict) -> dict:
    if not _given(spec):
        return video
    spec = with_fields(spec, prompt=prompt or "")
    return run_stage(ctx, "upscale_video", lambda: _upscale(
        ctx, handles, spec, [{"video_key": video["key"]}], "upscale_video"))


def _given(spec: UpscaleRequest | None) -> bool:
    """An optional upscale stage is asked for: its settings are recorded, and not empty."""
    return spec is not None and bool(spec.model_fields_set)


def _apply(sdxl: SDXLRequest, refined_stage: dict) -> SDXLRequest:
    return refined_request(sdxl, RefinedPrompt.model_validate(refined_stage["refined"]))


VIDEO_PIPELINES: dict[str, Callable[..., None]] = {
    "images.upscale": image_upscale,
    "images.text_to_image_hd": text_to_image_hd,
    "videos.image_to_video": image_to_video,
    "videos.text_to_video": text_to_video,
}
