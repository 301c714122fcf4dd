"""Images: OpenAI's Images requests mapped onto SDXL's contract, run now or as a job."""

from __future__ import annotations

import asyncio
import base64
import time

from ray.serve.handle import DeploymentHandle

from api.files.service import FilesService
from api.images.protocol import ImageData, ImageGenerationRequest, ImagesResponse
from api.jobs.service import JobsService
from api.models.service import ModelsService
from api.presets.service import PresetsService
from api.ratelimit import NO_RATE_LIMITS, RateLimiter, image_cost, token_cost
from api.text.service import LLMUnavailableError, TextService
from api.vision.service import VisionService
from deployments.diffusion import random_seed
from deployments.errors import AtelierError, ConflictError, InvalidRequestError
from deployments.llm.contract import RefinedPrompt, RefineRequest
from deployments.llm.vision import check_best_of, check_criteria
from deployments.media import decode_image, parse_size
from deployments.sdxl import contract as sdxl_contract
from deployments.sdxl.contract import SDXLRequest, SDXLResponse, routed
from graphs.payloads import ImageEditPayload, ImageGenerationPayload, TextToImageHDPayload
from graphs.pipelines import apply_refined, candidate_requests
from storage.fs import Storage
from storage.jobs import TERMINAL_STATUSES, JobRecord
from storage.keys import new_id

SDXLJobPayload = ImageGenerationPayload | ImageEditPayload | TextToImageHDPayload
# The job kinds whose SDXL section a replay checks again (ImagesService.recheck_replay).
SDXL_JOB_KINDS = tuple(cls.model_fields["kind"].default for cls in (ImageGenerationPayload, ImageEditPayload,
                                                                    TextToImageHDPayload))


class ImagesService:
    rate: RateLimiter = NO_RATE_LIMITS  # the key's cost budget (build_services sets the app's)
    presets: "PresetsService | None" = None  # the caller's own style presets (build_services sets them)
    vision: "VisionService | None" = None  # moderation of prompts and outputs (build_services sets it)
    max_best_of: int = 8  # candidates best_of may ask for (config max_best_of; build_services sets it)

    def __init__(self, sdxl: DeploymentHandle, models: ModelsService, text: TextService, jobs: JobsService,
                 files: FilesService, storage: Storage, max_upload_pixels: int):
        self.sdxl = sdxl
        self.models = models
        self.text = text
        self.jobs = jobs
        self.files = files
        self.storage = storage
        self.max_upload_pixels = max_upload_pixels

    @property
    def limits(self) -> sdxl_contract.SDXLLimits:
        return self.models.sdxl

    async def sdxl_request(self, body: ImageGenerationRequest, mode: str, strength: float = 0.8,
                           default_size: tuple[int, int] | None = None) -> SDXLRequest:
        """The SDXL request for an Images body, checked against SDXL's contract, so jobs never fail
        on bad input; a named LoRA must be registered."""
        preset = await self.presets.user_style(body.style) if self.presets else None
        if preset is not None:  # the caller's own preset, applied here (the model knows only the built-ins)
            body = body.model_copy(update={
                "prompt": preset.apply(body.prompt), "style": None,
                "negative_prompt": ", ".join(p for p in (preset.negative_prompt, body.negative_prompt) if p) or None,
                "steps": body.steps or preset.steps, "size": body.size or (preset.size if not default_size else None),
                "guidance_scale": body.guidance_scale if body.guidance_scale is not None else preset.guidance_scale})
        if body.size is not None:
            width, height = parse_size(body.size)
        else:
            width, height = default_size or (self.limits.default_size, self.limits.default_size)
        request = SDXLRequest(
            mode=mode, prompt=body.prompt, negative_prompt=body.negative_prompt, n=body.n, width=width,
            height=height, steps=body.steps, guidance_scale=body.guidance_scale, seed=body.seed,
            strength=strength, style=body.style, lora=body.lora, lora_scale=body.lora_scale, model=body.model,
        )
        sdxl_contract.check(request, self.limits)
        self.charge(request)
        lora = await self.models.lora_record(body.lora)
        request.lora = lora.id if lora else None
        if self.vision is not None:  # a refused prompt is a 400 before anything runs
            await self.vision.check_prompt(request.prompt, "prompt")
        return request

    def charge(self, request: SDXLRequest, images: int | None = None, param: str = "n") -> None:
        width, height = sdxl_contract.size_of(request, self.limits) or (self.limits.default_size,) * 2
        count = request.n if images is None else images
        self.rate.charge(image_cost(count, request.steps, width, height, self.limits.default_steps), param)

    def recheck_replay(self, payload: SDXLJobPayload) -> SDXLJobPayload:
        """A replayed SDXL job, checked against SDXL's limits of today and charged, as a new submit is."""
        sdxl_contract.check(payload.sdxl, self.limits)
        self.charge(payload.sdxl)
        best_of = getattr(payload, "best_of", None)
        if best_of is not None:  # today's cap, today's judge (the LLM may have been redeployed)
            spec = self._best_of_spec(best_of.candidates, best_of.criteria, payload.sdxl)  # charges the rest
            payload.best_of = type(best_of).model_validate({**best_of.model_dump(), **spec})
        return payload

    # --- best-of-n --------------------------------------------------------------------------------------

    def check_best_of(self, body: ImageGenerationRequest) -> None:
        """best_of's checks on the body alone, before anything is charged: n <= best_of <= the cap,
        no upscale with it, criteria only with it, a language model to judge."""
        if body.best_of is None:
            if body.criteria is not None:
                raise InvalidRequestError("criteria is what the judge of best_of looks for; give best_of too",
                                          "criteria")
            return
        if body.upscale:
            raise InvalidRequestError("best_of does not combine with upscale", "best_of")
        self._check_best_of(body.best_of, body.criteria, body.n)

    def _check_best_of(self, candidates: int, criteria: str | None, n: int) -> None:
        check_best_of(candidates, n, self.max_best_of)
        if self.text.limits is None or self.text.llm is None or self.vision is None:
            raise LLMUnavailableError("best_of judges the candidates with the language model, and none is "
                                      "deployed in this application", "best_of")
        check_criteria(criteria, self.vision.judge_settings)

    def best_of_spec(self, body: ImageGenerationRequest, sdxl_request: SDXLRequest) -> dict | None:
        """The job's `best_of` section (graphs/payloads.BestOfSpec), or None without best_of. The
        seed is pinned (candidate i has seed + i), each SDXL call the candidates take is checked
        by SDXL's contract, and the candidates beyond n are charged."""
        if body.best_of is None:
            return None
        if sdxl_request.seed is None:
            sdxl_request.seed = min(random_seed(), self.limits.max_seed - body.best_of + 1)
        spec = self._best_of_spec(body.best_of, body.criteria, sdxl_request)
        return {"candidates": body.best_of, "criteria": body.criteria, **spec}

    def _best_of_spec(self, candidates: int, criteria: str | None, sdxl_request: SDXLRequest) -> dict:
        """Checked (a submit and a replay alike); the candidates beyond the n already charged are charged."""
        self._check_best_of(candidates, criteria, sdxl_request.n)
        for request in candidate_requests(sdxl_request, candidates):
            sdxl_contract.check(request, self.limits)
        if candidates > sdxl_request.n:
            self.charge(sdxl_request, candidates - sdxl_request.n, "best_of")
        settings = self.vision.judge_settings  # and one judgement per candidate
        self.rate.charge(token_cost(candidates, settings.max_tokens, self.text.limits.max_model_len), "best_of")
        return {"model": self.text.limits.model, "source": self.text.limits.source,
                "settings": settings.model_dump(mode="json")}

    async def generate_best_of(self, sdxl_request: SDXLRequest, refine: dict | None, best_of: dict,
                               response_format: str, base_url: str) -> ImagesResponse:
        """Best-of-n answered synchronously: the same job as `?async=true` (generate → judge), waited
        for, so its record keeps every candidate; the answer is its top n, ranked, with scores."""
        record = await self.wait(await self.submit_generation(sdxl_request, refine, best_of))
        return await self.job_images(record, response_format, base_url)

    async def wait(self, record: JobRecord) -> JobRecord:
        """The job once it has finished; a client that hangs up cancels it. A failed job is its error."""
        try:
            while record.status not in TERMINAL_STATUSES:
                await asyncio.sleep(self.jobs.sse_poll_s)
                record = await asyncio.to_thread(self.jobs.get, record.id)
        except asyncio.CancelledError:
            await asyncio.to_thread(self.jobs.jobs.request_cancel, record.id)
            raise
        if record.status == "cancelled":
            raise ConflictError(f"job {record.id} was cancelled before it finished", "job_id")
        if record.status == "failed":
            raise JobFailedError.of(record)
        return record

    async def job_images(self, record: JobRecord, response_format: str, base_url: str) -> ImagesResponse:
        """A finished image job as the Images answer: its outputs in order, each with its judgement."""
        result = record.result or {}
        data = []
        for output in record.outputs:
            judgement = output.extra.get("judgement") or {}
            item = ImageData(seed=output.seed, revised_prompt=result.get("prompt"), **judgement)
            if response_format == "url":
                item.url = self.files.url_for(output.key, base_url)
            else:
                png = await asyncio.to_thread(self.storage.get_bytes, output.key)
                item.b64_json = base64.b64encode(png).decode()
            data.append(item)
        first = record.outputs[0]
        elapsed = (record.finished_at or time.time()) - (record.started_at or record.created_at)
        return ImagesResponse(created=int(time.time()), data=data, model=result.get("model"),
                              size=f"{first.width}x{first.height}", steps=result.get("steps"),
                              elapsed_s=round(elapsed, 4), refine=result.get("refine"), job_id=record.id)

    def decode_edit_inputs(self, image_bytes: bytes, mask_bytes: bytes | None) -> tuple[int, int]:
        """Decode the edit's image (and mask) now, so a bad upload is a 400, not a failed job; SDXL
        takes inputs of at most its largest size in pixels. Returns the image's size."""
        max_pixels = min(self.max_upload_pixels, self.limits.max_input_pixels)
        decoded = decode_image(image_bytes, "image", max_pixels=max_pixels)
        if mask_bytes is not None:
            decoded_mask = decode_image(mask_bytes, "mask", max_pixels=max_pixels, mode="L")
            if decoded_mask.size != decoded.size:
                raise InvalidRequestError(
                    f"mask is {decoded_mask.width}x{decoded_mask.height} but image is "
                    f"{decoded.width}x{decoded.height}; they must match", "mask")
        return decoded.width, decoded.height

    async def submit_generation(self, sdxl_request: SDXLRequest, refine: dict | None,
                                best_of: dict | None = None) -> JobRecord:
        stages = ["refine", "generate"] if refine else ["generate"]
        sections = {"best_of": best_of} if best_of else {}  # a job without it is stored as it always was
        if best_of:
            stages.append("judge")
        return await self.jobs.submit_async(ImageGenerationPayload.create(sdxl=sdxl_request, refine=refine,
                                                                          **self.moderation(), **sections), stages)

    async def submit_edit(self, sdxl_request: SDXLRequest, image_bytes: bytes, mask_bytes: bytes | None) -> JobRecord:
        """Jobs read their inputs from storage: the uploads are stored once, then passed by key."""
        upload_id = new_id("upload")
        sdxl_request.image_key = await asyncio.to_thread(self.storage.put_bytes, f"uploads/{upload_id}/image",
                                                         image_bytes)
        if mask_bytes is not None:
            sdxl_request.mask_key = await asyncio.to_thread(self.storage.put_bytes, f"uploads/{upload_id}/mask",
                                                            mask_bytes)
        return await self.jobs.submit_async(ImageEditPayload.create(sdxl=sdxl_request, **self.moderation()),
                                            ["generate"])

    def moderation(self) -> dict:
        """The job's `moderation` section when outputs are checked (none otherwise: the stored
        request stays as it always was)."""
        spec = self.vision.moderation_spec() if self.vision is not None else None
        return {"moderation": spec} if spec else {}

    async def refine_then_generate(self, sdxl_request: SDXLRequest, refine: dict | None, response_format: str,
                                   base_url: str) -> ImagesResponse:
        refined = None
        if refine is not None:
            refined = await self.text.refine(RefineRequest.model_validate(refine["request"]))
            sdxl_request = SDXLRequest.model_validate(apply_refined(sdxl_request.model_dump(), refined))
        return await self.generate(sdxl_request, response_format, base_url, refined)

    async def generate(self, sdxl_request: SDXLRequest, response_format: str, base_url: str,
                       refined: RefinedPrompt | None = None) -> ImagesResponse:
        store = response_format == "url"
        moderated = self.vision is not None and self.vision.checks_outputs
        if store and not moderated:
            sdxl_request.store, sdxl_request.output_id = True, self.files.output_id()
        result: SDXLResponse = await routed(self.sdxl, sdxl_request).generate.remote(sdxl_request)
        if moderated:  # each image looked at, and stored only once all passed
            await self.vision.store_checked(result, self.files.output_id() if store else None)
        data = []
        for image in result.images:
            if store:
                data.append(ImageData(url=self.files.url_for(image.key, base_url), seed=image.seed,
                                      revised_prompt=result.prompt))
            else:
                data.append(ImageData(b64_json=base64.b64encode(image.png).decode(), seed=image.seed,
                                      revised_prompt=result.prompt))
        first = result.images[0]
        return ImagesResponse(created=int(time.time()), data=data, model=result.model,
                              size=f"{first.width}x{first.height}", steps=result.steps,
                              elapsed_s=round(result.elapsed_s, 4), batch_images=result.batch_images,
                              refine=refined.model_dump() if refined else None)


class JobFailedError(AtelierError):
    """A job a synchronous answer waited for failed: its error, with the status its type has."""

    STATUS = {"invalid_request_error": 400, "not_found_error": 404, "model_not_found": 404,
              "conflict_error": 409, "overloaded_error": 503}

    def __init__(self, message: str, error_type: str = "server_error", param: str | None = None,
                 code: str | None = None, category: str | None = None):
        super().__init__(message, param)
        self.error_type = error_type
        self.status_code = self.STATUS.get(error_type, 500)
        self.code, self.category = code, category

    @classmethod
    def of(cls, record: JobRecord) -> "JobFailedError":
        """The job's recorded error, with what it named (field, code, a refusal's category)."""
        error = record.error
        message = error.message if error else "the job failed"
        if error is None:
            return cls(f"job {record.id} failed: {message}")
        return cls(f"job {record.id} failed: {message}", error.type, error.param, error.code, error.category)

    def to_body(self) -> dict:
        body = super().to_body()
        body["error"].update({k: v for k, v in (("code", self.code), ("category", self.category)) if v})
        return body

    def __reduce__(self):
        return JobFailedError, (self.message, self.error_type, self.param, self.code, self.category)
