"""Each API area's service, built once per ingress replica from the handles, stores and limits.

The routers (ROUTERS) find their service on `app.state.<area>`; tests build services the same way
with fake handles. Each router comes with the access rule of its routes (api/auth.py
`RequireScope`: GETs need `read`, the other methods the scope named here), attached to every
route when the app includes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from fastapi import APIRouter
from ray.serve.handle import DeploymentHandle
from ray.serve.task_consumer import instantiate_adapter_from_config

from api.assets.router import router as assets_router
from api.assets.service import AssetsService, build_assets_service
from api.auth import PUBLIC, READ_ONLY, RequireScope
from api.collect.router import router as collect_router
from api.collect.service import CollectService, build_collect_service
from api.config import IngressConfig
from api.datasets.router import router as datasets_router
from api.datasets.service import DatasetsService, build_datasets_service
from api.files.router import router as files_router
from api.fine_tuning.router import router as fine_tuning_router
from api.fine_tuning.service import FineTuningService, build_fine_tuning_service
from api.files.service import FilesService
from api.images.router import router as images_router
from api.images.service import SDXL_JOB_KINDS, ImagesService
from api.jobs.router import router as jobs_router
from api.jobs.service import JobsService
from api.models.router import probes_router
from api.models.router import router as models_router
from api.models.service import ModelsService
from api.presets.router import router as presets_router
from api.presets.service import PresetsService
from api.prompts.router import router as prompts_router
from api.prompts.service import PromptsService
from api.ratelimit import RateLimiter
from api.stats.router import router as stats_router
from api.stats.service import StatsService
from api.text.images import ImageInputs
from api.text.router import routers as text_routers
from api.text.service import TextService
from api.upscale.router import router as upscale_router
from api.upscale.service import UpscaleService
from api.uploads import Uploads
from api.videos.router import router as videos_router
from api.videos.service import VideosService
from api.vision.router import router as vision_router
from api.vision.service import VisionService
from api.workflows.router import router as workflows_router
from api.workflows.service import WorkflowsService, build_workflows_service
from deployments.llm.contract import RefineSettings
from deployments.llm.vision import JudgeSettings
from storage.fs import Storage
from storage.jobs import JobStore
from storage.presets import PresetStore
from storage.registry import LoraRegistry

# A router, or a function of the app's services giving its routers (the text area's depend on
# whether a language model is deployed: api/text/router.py).
ROUTERS: list[tuple[APIRouter | Callable[[Any], list[APIRouter]], RequireScope]] = [
    (probes_router, PUBLIC),
    (models_router, RequireScope("train")),  # GETs: read; deleting a LoRA version: train (its owner)
    (images_router, RequireScope("generate")),
    # Cancel and replay act on a job of any kind: the key needs `generate` or `train`, and the
    # service checks the scope of the job's own kind (api/jobs/service.py KIND_SCOPES).
    (jobs_router, RequireScope("generate", "train")),
    (files_router, READ_ONLY),
    (lambda services: text_routers(getattr(services, "text", None)), RequireScope("generate")),
    (vision_router, RequireScope("generate")),
    (videos_router, RequireScope("generate")),
    (upscale_router, RequireScope("generate")),
    (datasets_router, RequireScope("train")),
    (collect_router, RequireScope("train")),  # GETs: read; searching and collecting: train
    (fine_tuning_router, RequireScope("train")),
    (workflows_router, RequireScope("generate")),
    (stats_router, READ_ONLY),
    (prompts_router, READ_ONLY),
    (presets_router, RequireScope("generate")),
    # Deleting a job needs the scope of its kind (as cancel); retention runs need admin (the service checks).
    (assets_router, RequireScope("generate", "train")),
]


@dataclass
class Services:
    files: FilesService
    uploads: Uploads
    jobs: JobsService
    models: ModelsService
    text: TextService
    vision: VisionService
    images: ImagesService
    videos: VideosService
    upscale: UpscaleService
    datasets: DatasetsService
    collect: CollectService
    fine_tuning: FineTuningService
    workflows: WorkflowsService
    stats: StatsService
    prompts: PromptsService
    presets: PresetsService
    rate: RateLimiter
    assets: AssetsService


def build_services(config: IngressConfig, handles: dict[str, DeploymentHandle], limits: dict[str, Any],
                   queue: Any = None) -> Services:
    """`handles`: the deployed models by name; `limits`: their contract Limits; `queue`: the task
    processor adapter (default: the one `config.queue` names)."""
    storage = Storage(config.storage_root, config.storage_options)
    if queue is None:
        queue = instantiate_adapter_from_config(config.queue.task_processor_config())
    files = FilesService(storage, config.presign_urls)
    uploads = Uploads(storage, config.max_upload_bytes, config.max_upload_pixels, readable=files.readable)
    store = JobStore(storage)
    rate = RateLimiter(config.rate_limits)
    jobs = JobsService(store, queue, config.queue, files, config.sse_poll_s, rate=rate,
                       sse_max_lifetime_s=config.sse_max_lifetime_s, sse_max_per_key=config.sse_max_per_key)
    models = ModelsService(handles, limits, LoraRegistry(storage), config.readiness_timeout_s,
                           max_import_bytes=config.max_lora_import_bytes)
    llm = config.llm
    if config.moderation.enabled and "llm" not in handles:  # fail closed: a policy that cannot be checked
        raise ValueError("moderation is enabled but no language model (llm) is deployed to check it")
    # Images a request brings (chat image parts, the judge's): within the upload limits, owner-checked.
    image_inputs = ImageInputs(storage, files.readable, config.max_upload_bytes, config.max_upload_pixels,
                               llm.max_images if llm else 0)
    text = TextService(handles.get("llm"), limits.get("llm"), llm.refine if llm else RefineSettings(),
                       models, **({"max_n": llm.max_n} if llm else {}), images=image_inputs)
    vision = VisionService(text, image_inputs, storage, llm.judge if llm else JudgeSettings(), config.moderation)
    styles = getattr(limits["sdxl"], "styles", None) or {}  # the built-in style presets
    presets = PresetsService(PresetStore(storage), styles)
    images = ImagesService(handles["sdxl"], models, text, jobs, files, storage, config.max_upload_pixels)
    images.presets = presets  # a request's `style` may name the caller's own preset
    images.vision = vision  # prompts and outputs moderated
    images.max_best_of = config.max_best_of
    for kind in SDXL_JOB_KINDS:  # a replay meets today's SDXL limits (the datasets service registers imports)
        jobs.replay_checks[kind] = images.recheck_replay
    videos = VideosService(models, images, text, jobs, store, files, uploads, storage)
    videos.presets = presets
    videos.vision = vision
    upscale = UpscaleService(models, text, jobs, files, uploads)
    upscale.vision = vision  # text-to-image-hd's stills moderated
    datasets = build_datasets_service(storage, jobs, files, config.dataset_import, config.max_upload_bytes,
                                      limits.get("llm"))  # the LLM captions datasets
    collect = build_collect_service(storage, config.collect, datasets, jobs, config.dataset_import)
    fine_tuning = build_fine_tuning_service(storage, config.fine_tuning, limits["sdxl"], config.storage_root,
                                            config.storage_options)
    workflows = build_workflows_service(storage, jobs, models, text, config.max_workflow_nodes,
                                        config.max_workflow_images)
    workflows.vision = vision
    workflows.max_best_of, workflows.max_qa_rounds = config.max_best_of, config.max_qa_rounds
    for service in (text, vision, images, videos, upscale, workflows):  # each charges its requests' cost to the key
        service.rate = rate
    assets = build_assets_service(storage, jobs, config.assets)  # search, tags, deletes, retention
    return Services(assets=assets, files=files, uploads=uploads, jobs=jobs, models=models, text=text, vision=vision, images=images,
                    videos=videos, upscale=upscale, datasets=datasets, collect=collect, fine_tuning=fine_tuning, workflows=workflows,
                    stats=StatsService(store),
                    prompts=PromptsService(styles=sorted(styles)), presets=presets, rate=rate)
