"""Fixed pipelines that a job runs, stage by stage, over DeploymentHandles.

Each takes the JobContext and the handles by name. Data moves between stages as storage keys,
never through the ingress.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, TypeVar

from pydantic import BaseModel

from deployments.llm.contract import RefinedPrompt, refined_from_response
from deployments.sdxl.contract import SDXLProgress, SDXLRequest, SDXLResponse, routed
from deployments.svd.contract import SVDProgress
from deployments.upscaler.contract import UpscaleProgress
from graphs.payloads import ImageEditPayload, ImageGenerationPayload, RefineSpec
from storage.jobs import JobOutput

ModelT = TypeVar("ModelT", bound=BaseModel)

PROGRESS_EVENTS = (SDXLProgress, SVDProgress, UpscaleProgress)


def drain_stream(stream, on_step: Callable[[int, int], None], check_cancelled: Callable[[], None],
                 cancel_poll_s: float = 0.25) -> Any:
    """Drain one streamed deployment call: progress events go to `on_step`, the last other event
    is the response. Leaving early cancels the call, which is how a cancel reaches the replica: a
    request still waiting in its queue leaves it, a running one stops at its next step.

    Cancel is checked between events, and by a watcher every `cancel_poll_s` while none comes (a
    request queued behind a busy model sends none)."""
    stop, raised = threading.Event(), []

    def watch() -> None:
        while not stop.wait(cancel_poll_s):
            try:
                check_cancelled()
            except BaseException as exc:  # the job was cancelled: stop the call from here
                raised.append(exc)
                stream.cancel()
                return

    watcher = threading.Thread(target=watch, name="cancel-watch", daemon=True)
    watcher.start()
    result = None
    try:
        for event in stream:
            if isinstance(event, PROGRESS_EVENTS):
                on_step(event.step, event.total_steps)
            else:
                result = event
            check_cancelled()
    except BaseException:
        stream.cancel()
        if raised:  # the call ended because the watcher cancelled it: report the cancel, not Serve's error
            raise raised[0] from None
        raise
    finally:
        stop.set()
    if raised:
        raise raised[0]
    return result


def stream_sdxl(ctx, sdxl_handle, request: SDXLRequest) -> SDXLResponse:
    """Run one SDXL request, reporting each denoising step on the job; cancel stops it."""
    stream = routed(sdxl_handle, request).options(stream=True).generate_stream.remote(request)
    return drain_stream(stream, ctx.step, ctx.check_cancelled)


def refine_stage(ctx, handles: dict[str, Any], spec: RefineSpec) -> RefinedPrompt:
    """Gemma rewrites the prompt; `spec` is what the ingress prepared (request, chat body, trigger word)."""
    from ray.serve.llm.openai_api_models import ChatCompletionRequest

    ctx.start_stage("refine")
    chat = ChatCompletionRequest.model_validate(spec.chat)
    stream = handles["llm"].options(stream=True).chat.remote(chat, None)
    try:
        first = next(iter(stream))
    finally:
        stream.cancel()
    first = first[0] if isinstance(first, list) else first
    refined = refined_from_response(first, spec.request, spec.trigger_word)
    ctx.step(1, 1)
    ctx.check_cancelled()
    return refined


def apply_refined(sdxl: dict, refined: RefinedPrompt) -> dict:
    negative = ", ".join(p for p in (refined.negative_prompt, sdxl.get("negative_prompt")) if p) or None
    return {**sdxl, "prompt": refined.prompt, "negative_prompt": negative}


def with_fields(request: ModelT, **fields: Any) -> ModelT:
    """`request` (a payload section) with `fields` set, validated again as a new request of its type;
    the fields it was stored without stay unset."""
    return type(request).model_validate({**request.model_dump(exclude_unset=True), **fields})


def refined_request(sdxl: SDXLRequest, refined: RefinedPrompt) -> SDXLRequest:
    """The SDXL request with the refined prompt, and the refined negative prompt before its own."""
    return type(sdxl).model_validate(apply_refined(sdxl.model_dump(exclude_unset=True), refined))


def image_generation(ctx, handles: dict[str, Any]) -> None:
    """Job kinds `images.generations` and `images.edits`: [refine] → generate."""
    payload: ImageGenerationPayload | ImageEditPayload = ctx.payload
    sdxl = payload.sdxl
    refined = None
    if payload.refine:
        refined = refine_stage(ctx, handles, payload.refine)
        sdxl = refined_request(sdxl, refined)
    request = with_fields(sdxl, job_id=ctx.id, store=True, output_id=ctx.id)
    ctx.start_stage("generate")
    response = stream_sdxl(ctx, handles["sdxl"], request)
    for image in response.images:
        lineage = image_lineage(ctx.id, ctx.record.kind, sdxl, response, image.seed)
        ctx.add_output(JobOutput(key=image.key, content_type="image/png", width=image.width,
                                 height=image.height, seed=image.seed, extra={"lineage": lineage}))
    ctx.record.result = {
        "model": response.model, "model_id": response.source, "mode": response.mode, "prompt": response.prompt,
        "negative_prompt": response.negative_prompt, "steps": response.steps,
        "guidance_scale": response.guidance_scale, "seeds": [image.seed for image in response.images],
        "lora": lora_lineage(response.lora, response.lora_sha256),
        "refine": refined.model_dump() if refined else None,
    }


def lora_lineage(ref: str | None, sha256: str | None) -> dict | None:
    """`name:version` and the weights' sha256 of the adapter used, or None."""
    if ref is None:
        return None
    name, _, version = ref.partition(":")
    return {"name": name, "version": int(version) if version.isdigit() else None, "sha256": sha256}


def image_lineage(job_id: str, kind: str, sdxl: SDXLRequest, response: SDXLResponse, seed: int) -> dict:
    """What made one image: the request as run (the prompt after refinement; uploads by key; the
    fields the job recorded), its seed, the model and adapter, and the job. The job id lives here,
    not in the PNG, so a replay (another job) writes the same bytes."""
    request = sdxl.model_dump(mode="json", exclude_unset=True,
                              exclude={"image", "mask", "store", "output_id", "job_id"})
    return {"job_id": job_id, "kind": kind, "request": request, "seed": seed,
            "model": response.model, "model_id": response.source,
            "lora": lora_lineage(response.lora, response.lora_sha256)}
