"""Fixed pipelines that a job runs, stage by stage, over DeploymentHandles.

Each takes the JobContext and the handles by name. Data moves between stages as storage keys,
never through the ingress.
"""

from __future__ import annotations

from typing import Any, Callable

from deployments.sdxl import SDXLProgress, SDXLRequest, SDXLResponse
from storage.jobs import JobOutput


def stream_sdxl(ctx, sdxl_handle, request: SDXLRequest) -> SDXLResponse:
    """Run one SDXL request, reporting each denoising step on the job; cancel stops it."""
    stream = sdxl_handle.options(stream=True).generate_stream.remote(request)
    result = None
    try:
        for event in stream:
            if isinstance(event, SDXLProgress):
                ctx.step(event.step, event.total_steps)
            else:
                result = event
            ctx.check_cancelled()
    except BaseException:
        stream.cancel()
        raise
    return result


def image_generation(ctx, handles: dict[str, Any]) -> None:
    request = SDXLRequest.model_validate(
        {**ctx.request["sdxl"], "job_id": ctx.id, "store": True, "output_id": ctx.id}
    )
    ctx.start_stage("generate")
    response = stream_sdxl(ctx, handles["sdxl"], request)
    for image in response.images:
        ctx.add_output(JobOutput(key=image.key, content_type="image/png", width=image.width,
                                 height=image.height, seed=image.seed))
    ctx.record.result = {
        "model": response.model, "mode": response.mode, "prompt": response.prompt,
        "negative_prompt": response.negative_prompt, "steps": response.steps,
        "guidance_scale": response.guidance_scale, "seeds": [image.seed for image in response.images],
    }


JOB_PIPELINES: dict[str, Callable[..., None]] = {
    "images.generations": image_generation,
    "images.edits": image_generation,
}
