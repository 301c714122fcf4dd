"""Fixed pipelines that a job runs, stage by stage, over DeploymentHandles.

Each takes the JobContext and the handles by name. Data moves between stages as storage keys,
never through the ingress.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

from pydantic import BaseModel

from deployments.diffusion import random_seed
from deployments.llm.contract import RefinedPrompt, refined_from_response
from deployments.llm.vision import Judgement, rank
from deployments.sdxl.contract import ALLOWED_N, MAX_SEED, SDXLImage, SDXLProgress, SDXLRequest, SDXLResponse, routed
from deployments.svd.contract import SVDProgress
from deployments.upscaler.contract import UpscaleProgress
from graphs import vision as graph_vision
from graphs.payloads import BestOfSpec, ImageEditPayload, ImageGenerationPayload, RefineSpec
from graphs.vision import store_moderated
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
    """Job kinds `images.generations` and `images.edits`: [refine] → generate → [judge] (best_of)."""
    payload: ImageGenerationPayload | ImageEditPayload = ctx.payload
    sdxl = payload.sdxl
    refined = None
    if payload.refine:
        refined = refine_stage(ctx, handles, payload.refine)
        sdxl = refined_request(sdxl, refined)
    moderation = payload.moderation  # each image is looked at before it is stored (graphs/vision.py)
    best_of: BestOfSpec | None = getattr(payload, "best_of", None)
    # Best-of keeps the PNGs to judge them, and stores them itself (under the job's id, in candidate order).
    request = with_fields(sdxl, job_id=ctx.id, store=moderation is None and best_of is None, output_id=ctx.id)
    ctx.start_stage("generate")
    judged: list[Judgement] = []
    if best_of is None:
        response = stream_sdxl(ctx, handles["sdxl"], request)
    else:
        started = time.perf_counter()
        response = generate_candidates(ctx, handles["sdxl"], request, best_of.candidates)
        generated = time.perf_counter()
        judged = judge_stage(ctx, handles["llm"], best_of, [image.png for image in response.images],
                             payload.sdxl.prompt)  # the prompt the caller asked for, before refinement
        timings = {"generate_s": round(generated - started, 4), "judge_s": round(time.perf_counter() - generated, 4)}
    if moderation is not None or best_of is not None:  # the PNGs came back: looked at if asked, then stored
        store_moderated(ctx.store.storage, handles.get("llm"), response.images, ctx.id, moderation,
                        ctx.check_cancelled)
    chosen = range(len(response.images)) if best_of is None else rank(judged)[:sdxl.n]
    for index in chosen:
        image = response.images[index]
        extra: dict[str, Any] = {"lineage": image_lineage(ctx.id, ctx.record.kind, sdxl, response, image.seed)}
        if best_of is not None:
            extra.update(candidate=index, judgement=judged[index].model_dump())
        ctx.add_output(JobOutput(key=image.key, content_type="image/png", width=image.width,
                                 height=image.height, seed=image.seed, extra=extra))
    ctx.record.result = {
        "model": response.model, "model_id": response.source, "mode": response.mode, "prompt": response.prompt,
        "negative_prompt": response.negative_prompt, "steps": response.steps,
        "guidance_scale": response.guidance_scale, "seeds": [image.seed for image in response.images],
        "lora": lora_lineage(response.lora, response.lora_sha256),
        "refine": refined.model_dump() if refined else None,
    }
    if best_of is not None:
        ctx.record.result["best_of"] = {**best_of_record(best_of, response.images, judged, sdxl.n), **timings}


# --- best-of-n: candidates, the judge, the ranking -------------------------------------------------


def candidate_batches(k: int, allowed: tuple[int, ...] = ALLOWED_N) -> list[int]:
    """k candidates as SDXL calls: one call of k images when k is an allowed batch size, else the
    fewest calls of allowed sizes (largest first: 6 → 4 + 2)."""
    batches, left = [], k
    for size in sorted(allowed, reverse=True):
        while left >= size:
            batches.append(size)
            left -= size
    if left:
        raise ValueError(f"{k} candidates cannot be split into batches of {list(allowed)}")
    return batches


def candidate_requests(request: SDXLRequest, k: int) -> list[SDXLRequest]:
    """The SDXL requests that make best-of-k's candidates: candidate i has seed + i, whichever call
    makes it (a split needs a seed, so one is drawn when the request has none; the API pins it).
    The API and workflow checks run the SDXL contract's check() on each of these."""
    batches = candidate_batches(k)
    if len(batches) == 1:
        return [with_fields(request, n=k)]
    seed = request.seed if request.seed is not None else min(random_seed(), MAX_SEED - k + 1)
    requests, offset = [], 0
    for size in batches:
        requests.append(with_fields(request, n=size, seed=seed + offset))
        offset += size
    return requests


def generate_candidates(ctx, sdxl_handle, request: SDXLRequest, k: int,
                        on_step: Callable[[int, int], None] | None = None,
                        check_cancelled: Callable[[], None] | None = None) -> SDXLResponse:
    """Best-of-k's candidates: its SDXL calls sent together (the deployment may batch them into one
    pipeline call), their steps reported as one progress, the images in candidate order."""
    requests = candidate_requests(request, k)
    on_step = on_step or ctx.step
    check_cancelled = check_cancelled or ctx.check_cancelled
    if len(requests) == 1:
        stream = routed(sdxl_handle, requests[0]).options(stream=True).generate_stream.remote(requests[0])
        return drain_stream(stream, on_step, check_cancelled)
    done, lock = [0] * len(requests), threading.Lock()

    def call(i: int) -> SDXLResponse:
        def step(step: int, total: int) -> None:
            with lock:
                done[i] = step / max(total, 1)
                fraction = sum(done) / len(done)
            on_step(round(fraction * 1000), 1000)

        stream = routed(sdxl_handle, requests[i]).options(stream=True).generate_stream.remote(requests[i])
        return drain_stream(stream, step, check_cancelled)

    with ThreadPoolExecutor(len(requests), thread_name_prefix="best-of") as pool:
        responses = list(pool.map(call, range(len(requests))))
    return responses[0].model_copy(update={
        "images": [image for response in responses for image in response.images],
        "batch_images": max(response.batch_images for response in responses),
        "elapsed_s": max(response.elapsed_s for response in responses)})


def judge_stage(ctx, llm_handle, spec: BestOfSpec, images: list[bytes], prompt: str) -> list[Judgement]:
    """Stage "judge": every candidate judged against the prompt (one request each, sent together)."""
    ctx.start_stage("judge")
    ctx.check_cancelled()
    judged = graph_vision.judge_images(llm_handle, images, prompt, spec.model, spec.settings, spec.criteria)
    ctx.step(1, 1)
    ctx.check_cancelled()
    return judged


def best_of_record(spec: BestOfSpec, images: list[SDXLImage], judged: list[Judgement], n: int) -> dict:
    """Every candidate in the job's result (its image, seed, rank and judgement), the top n chosen."""
    order = rank(judged)
    ranks = {index: position for position, index in enumerate(order)}
    return {
        "candidates": len(images), "n": n, "criteria": spec.criteria, "ranking": order,
        "judged": [{"index": i, "key": image.key, "seed": image.seed, "rank": ranks[i], "chosen": ranks[i] < n,
                    **judged[i].model_dump()} for i, image in enumerate(images)],
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
