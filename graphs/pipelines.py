"""Fixed pipelines that a job runs, stage by stage, over DeploymentHandles.

Each takes the JobContext and the handles by name. Data moves between stages as storage keys,
never through the ingress.
"""

from __future__ import annotations

from typing import Any, Callable

from deployments.gemma import RefinedPrompt, RefineRequest, refined_from_response
from deployments.sdxl import SDXLProgress, SDXLRequest, SDXLResponse, routed
from deployments.svd import SVDProgress
from deployments.upscaler import UpscaleProgress
from storage.jobs import JobOutput

PROGRESS_EVENTS = (SDXLProgress, SVDProgress, UpscaleProgress)


def drain_stream(stream, on_step: Callable[[int, int], None], check_cancelled: Callable[[], None]) -> Any:
    """Drain one streamed deployment call: progress events go to `on_step`, the last other event
    is the response. Cancel is checked between events; leaving early cancels the call, which
    frees the replica."""
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
        raise
    return result


def stream_sdxl(ctx, sdxl_handle, request: SDXLRequest) -> SDXLResponse:
    """Run one SDXL request, reporting each denoising step on the job; cancel stops it."""
    stream = routed(sdxl_handle, request).options(stream=True).generate_stream.remote(request)
    return drain_stream(stream, ctx.step, ctx.check_cancelled)


def refine_stage(ctx, handles: dict[str, Any], spec: dict) -> RefinedPrompt:
    """Gemma rewrites the prompt; `spec` is what the ingress prepared (request, chat body, trigger word)."""
    from ray.serve.llm.openai_api_models import ChatCompletionRequest

    ctx.start_stage("refine")
    chat = ChatCompletionRequest.model_validate(spec["chat"])
    stream = handles["llm"].options(stream=True).chat.remote(chat, None)
    try:
        first = next(iter(stream))
    finally:
        stream.cancel()
    first = first[0] if isinstance(first, list) else first
    refined = refined_from_response(first, RefineRequest.model_validate(spec["request"]), spec.get("trigger_word"))
    ctx.step(1, 1)
    ctx.check_cancelled()
    return refined


def apply_refined(sdxl: dict, refined: RefinedPrompt) -> dict:
    negative = ", ".join(p for p in (refined.negative_prompt, sdxl.get("negative_prompt")) if p) or None
    return {**sdxl, "prompt": refined.prompt, "negative_prompt": negative}


def image_generation(ctx, handles: dict[str, Any]) -> None:
    sdxl = ctx.request["sdxl"]
    refined = None
    if ctx.request.get("refine"):
        refined = refine_stage(ctx, handles, ctx.request["refine"])
        sdxl = apply_refined(sdxl, refined)
    request = SDXLRequest.model_validate({**sdxl, "job_id": ctx.id, "store": True, "output_id": ctx.id})
    ctx.start_stage("generate")
    response = stream_sdxl(ctx, handles["sdxl"], request)
    for image in response.images:
        ctx.add_output(JobOutput(key=image.key, content_type="image/png", width=image.width,
                                 height=image.height, seed=image.seed))
    ctx.record.result = {
        "model": response.model, "mode": response.mode, "prompt": response.prompt,
        "negative_prompt": response.negative_prompt, "steps": response.steps,
        "guidance_scale": response.guidance_scale, "seeds": [image.seed for image in response.images],
        "refine": refined.model_dump() if refined else None,
    }
