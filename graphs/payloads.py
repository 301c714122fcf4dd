"""Typed job payloads: what each job kind's record holds in `JobRecord.request`, one model per kind.

    images.generations        ImageGenerationPayload   {"sdxl", "refine", "best_of"}             [refine] → generate → [judge]
    images.edits              ImageEditPayload         {"sdxl"} (image_key, mask_key set)        generate
    images.upscale            ImageUpscalePayload      {"upscale"} (image_key set)               upscale
    images.text_to_image_hd   TextToImageHDPayload     {"sdxl", "refine", "upscale"}             [refine] → generate → upscale
    videos.image_to_video     ImageToVideoPayload      video summary + {"svd", "upscale_video"}  video → [upscale_video]
    videos.text_to_video      TextToVideoPayload       video summary + {"sdxl", "refine", "upscale", "svd", "upscale_video"}
    workflows.run             WorkflowRunPayload       {"workflow", "use_cache", "refine", "judge", "loras", "saved"}
    datasets.import           DatasetImportPayload     {"dataset_id", one source, "captions", "tags", "license", "config"}
    datasets.collect          DatasetCollectPayload    {"dataset_id", "items", "tags", "sources", "config"}
    datasets.captions         DatasetCaptionsPayload   {"dataset_id", "version", "overwrite", "trigger_word", "model", "settings", "max_images"}

A video longer than one SVD clip also holds `chain` (SVDChain: how its clips are made), last.
Every kind that generates images (generations, edits, text_to_image_hd, text_to_video, workflows.run)
also holds `moderation` (ModerationSpec) when the config checks outputs: each image is looked at
before it is stored (graphs/vision.store_moderated).
Every payload may also carry `replay_of` (the job it replays). `JobPayload` is their union,
discriminated by `kind`.

The stored layout does not change: `JobRecord.kind` names the kind and `JobRecord.request` is
the same JSON object as before. `parse_payload(kind, request)` reads it; `payload.to_request()`
writes back exactly that object: the same keys in the same order, fields an older record lacks
still absent, keys this version does not know kept, plus whatever was changed on the payload
since (a replay pins a seed). The model sections are the model contracts' own request types,
holding only the fields that were stored (pydantic's "fields set"), so a section passed on to a
deployment is the request as recorded.

The API builds payloads with `<Payload>.create(...)` (or `parse_payload` on the dict it built)
and stores `payload.to_request()`; the job kinds (graphs/pipelines.py, video_pipelines.py,
workflow_jobs.py, dataset_jobs.py) read `ctx.payload`; replay, video delete and a dataset's
import of job outputs read them through the helpers at the bottom.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, TypeAdapter, ValidationError, model_validator

from deployments.llm.contract import RefineRequest, RefineSettings
from deployments.llm.vision import CaptionSettings, JudgeSettings, ModerationSettings
from deployments.sdxl.contract import SDXLRequest
from deployments.styles import StylePreset
from deployments.svd.contract import SVDChain, SVDRequest
from deployments.upscaler.contract import UpscaleRequest
from graphs.workflows import Workflow
from storage.jobs import JobRecord
from storage.sources import SourceConfig, SourceResult
from storage.url_import import DatasetImportConfig

__all__ = [
    "JOB_KINDS",
    "PAYLOAD_TYPES",
    "DatasetCaptionsPayload",
    "DatasetCollectPayload",
    "DatasetImportPayload",
    "ImageEditPayload",
    "ImageGenerationPayload",
    "ImageToVideoPayload",
    "ImageUpscalePayload",
    "BestOfSpec",
    "JudgeSpec",
    "JobPayload",
    "JobPayloadBase",
    "LoraPin",
    "ModerationSpec",
    "RefineSpec",
    "SavedWorkflowRef",
    "TextToImageHDPayload",
    "TextToVideoPayload",
    "UnknownJobKindError",
    "VIDEO_KINDS",
    "WorkflowRefineContext",
    "WorkflowRunPayload",
    "job_prompt",
    "parse_payload",
    "parse_record",
    "replay_payload",
    "replay_seed_missing",
    "section",
    "stored",
    "video_source_key",
]

# Request fields that carry bytes: sent to a deployment directly, never stored in a job.
UNSTORED_FIELDS = frozenset({"image", "mask", "video"})


# --- key order ---------------------------------------------------------------------------------


def _key_order(value: Any) -> Any:
    """The key order of a JSON-like value, nested: a dict of the same keys, a list, or None."""
    if isinstance(value, dict):
        return {key: _key_order(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_key_order(item) for item in value]
    return None


def _ordered(value: Any, shape: Any) -> Any:
    """`value` with its keys in the order `shape` recorded; keys it did not record follow, as dumped."""
    if isinstance(value, dict) and isinstance(shape, dict):
        keys = [key for key in shape if key in value] + [key for key in value if key not in shape]
        return {key: _ordered(value[key], shape.get(key)) for key in keys}
    if isinstance(value, list) and isinstance(shape, list):
        return [_ordered(item, shape[i] if i < len(shape) else None) for i, item in enumerate(value)]
    return value


def stored(value: Any) -> Any:
    """A section as a job stores it: a model dumped whole (defaults included, bytes left out), as
    JSON; dicts and lists item by item. `stored(sdxl_request)` is what the ingress always stored."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude=set(UNSTORED_FIELDS & set(type(value).model_fields)))
    if isinstance(value, dict):
        return {key: stored(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [stored(item) for item in value]
    return value


def section(model: BaseModel | None) -> dict[str, Any] | None:
    """A parsed section as stored: only the fields it was given (or was set since), as JSON."""
    return None if model is None else model.model_dump(mode="json", exclude_unset=True)


# --- the payload base ---------------------------------------------------------------------------


class UnknownJobKindError(ValueError):
    def __init__(self, kind: str):
        super().__init__(f"unknown job kind {kind!r}; known: {sorted(PAYLOAD_TYPES)}")
        self.kind = kind


class JobPayloadBase(BaseModel):
    """One job kind's request. Keys this version does not know are kept (`extra="allow"`), so a
    record written by a newer version reads and writes back whole."""

    model_config = ConfigDict(extra="allow")

    kind: str
    replay_of: str | None = Field(None, description="The job this one replays.")

    _shape: Any = PrivateAttr(None)

    @model_validator(mode="wrap")
    @classmethod
    def _remember_key_order(cls, data: Any, handler: Any) -> Any:
        payload = handler(data)
        if isinstance(data, dict):
            payload._shape = _key_order(data)
        return payload

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        # A field set after parsing that the request did not hold goes last, as a dict key would.
        if not name.startswith("_") and isinstance(self._shape, dict) and name not in self._shape:
            self._shape = {**self._shape, name: None}  # a new dict: a copy of this payload may share it

    @classmethod
    def create(cls, **sections: Any) -> "JobPayloadBase":
        """A new payload of this kind from its sections (models, dicts or plain values), stored as
        the ingress has always stored them: models whole (see `stored`), in the order given."""
        kind = cls.model_fields["kind"].default
        return cls.model_validate({**stored(sections), "kind": kind})

    def to_request(self) -> dict[str, Any]:
        """The JSON object `JobRecord.request` holds for this payload (see the module docstring)."""
        data = self.model_dump(mode="json", exclude_unset=True, exclude={"kind"})
        return _ordered(data, self._shape)


# --- sections -----------------------------------------------------------------------------------


class RefineSpec(BaseModel):
    """What a job's refine stage needs: the request, the chat body to send the LLM (built by the
    ingress with the style and LoRA trigger word), and the trigger word the answer must keep."""

    model_config = ConfigDict(extra="allow")  # kept whole, like the payload

    request: RefineRequest
    chat: dict[str, Any]
    trigger_word: str | None = None


class WorkflowRefineContext(BaseModel):
    """What a workflow's refine node needs to talk to the LLM, pinned at submit time."""

    model_config = ConfigDict(extra="allow")  # kept whole, like the payload

    model: str
    source: str | None = None
    settings: RefineSettings = Field(default_factory=RefineSettings)
    style: StylePreset | None = None
    trigger_word: str | None = None


class JudgeSpec(BaseModel):
    """What a job's judge needs to talk to the LLM (the model's name and source, the judgement's
    bounds from config `llm.judge`), pinned at submit time."""

    model_config = ConfigDict(extra="allow")  # kept whole, like the payload

    model: str
    source: str | None = None
    settings: JudgeSettings = Field(default_factory=JudgeSettings)


class BestOfSpec(JudgeSpec):
    """Best-of-n: `candidates` images are generated and judged against the prompt; the top `n`
    (the SDXL section's n) are the job's outputs, every candidate stays in its result."""

    candidates: int = Field(ge=1)
    criteria: str | None = None


class ModerationSpec(BaseModel):
    """What a job needs to look at its generated images before storing them (config `moderation`,
    at submit time): the LLM's name and the policy. Present only when output checks are on."""

    model_config = ConfigDict(extra="allow")  # kept whole, like the payload

    model: str
    settings: ModerationSettings


class LoraPin(BaseModel):
    """A LoRA a workflow uses, pinned to a version, with its weights' sha256 (lineage)."""

    model_config = ConfigDict(extra="allow")  # kept whole, like the payload

    name: str | None = None
    version: int | None = None
    sha256: str | None = None


class SavedWorkflowRef(BaseModel):
    """The saved workflow (and version) a run came from."""

    model_config = ConfigDict(extra="allow")  # kept whole, like the payload

    id: str
    version: int | None = None
    name: str | None = None


# --- the payloads -------------------------------------------------------------------------------


class _SDXLJob(JobPayloadBase):
    sdxl: SDXLRequest
    refine: RefineSpec | None = None
    moderation: ModerationSpec | None = None


class ImageGenerationPayload(_SDXLJob):
    kind: Literal["images.generations"] = "images.generations"
    best_of: BestOfSpec | None = None


class ImageEditPayload(_SDXLJob):
    """The input image and mask are stored uploads, named by `sdxl.image_key` / `sdxl.mask_key`."""

    kind: Literal["images.edits"] = "images.edits"


class TextToImageHDPayload(_SDXLJob):
    """`upscale` holds steps, noise level and seed; the prompt and each image come from SDXL."""

    kind: Literal["images.text_to_image_hd"] = "images.text_to_image_hd"
    upscale: UpscaleRequest


class ImageUpscalePayload(JobPayloadBase):
    """`upscale.image_key` is the input (a stored output or upload)."""

    kind: Literal["images.upscale"] = "images.upscale"
    upscale: UpscaleRequest


class _VideoJob(JobPayloadBase):
    """A video job: the Video object's fields (the final size, after any upscale), then the stages."""

    model: str | None = None
    prompt: str | None = None
    size: str | None = None
    seconds: str | None = None
    num_frames: int | None = None
    fps: int | None = None
    seed: int | None = None
    upscale_video: UpscaleRequest | None = None
    svd: SVDRequest
    chain: SVDChain | None = Field(None, description="Only on a video longer than one clip: how its clips "
                                                     "are made (svd.num_frames is the whole video's).")


class ImageToVideoPayload(_VideoJob):
    """`svd.image_key` is the image to animate (an upload, or a referenced output)."""

    kind: Literal["videos.image_to_video"] = "videos.image_to_video"


class TextToVideoPayload(_VideoJob):
    """SDXL makes the still (`sdxl`, refined first if `refine`), optionally upscaled (`upscale`);
    `svd.image_key` is None until then."""

    kind: Literal["videos.text_to_video"] = "videos.text_to_video"
    sdxl: SDXLRequest
    refine: RefineSpec | None = None
    upscale: UpscaleRequest | None = None
    moderation: ModerationSpec | None = Field(None, description="The still is looked at before it is stored "
                                                                "(and animated), when output checks are on.")


class WorkflowRunPayload(JobPayloadBase):
    """A workflow with every seed and LoRA version pinned, and what each refine node needs."""

    kind: Literal["workflows.run"] = "workflows.run"
    workflow: Workflow
    use_cache: bool = True
    refine: dict[str, WorkflowRefineContext] = Field(default_factory=dict)
    judge: JudgeSpec | None = Field(None, description="For judge and qa_loop nodes and text_to_image's best_of.")
    loras: dict[str, LoraPin] = Field(default_factory=dict)
    saved: SavedWorkflowRef | None = None
    moderation: ModerationSpec | None = Field(None, description="Every image a node generates is looked at "
                                                                "before it is stored, when output checks are on.")


class DatasetImportPayload(JobPayloadBase):
    """One source (`urls`, `prefix`, `job_ids` or `output_keys`), and `config`: the ingress's
    import limits and allow-list at submit time (a record without one uses the defaults)."""

    kind: Literal["datasets.import"] = "datasets.import"
    dataset_id: str
    urls: list[str] | None = None
    prefix: str | None = None
    job_ids: list[str] | None = None
    output_keys: list[str] | None = None
    captions: dict[str, str] | None = None
    tags: list[str] | None = None
    license: str | None = None
    config: DatasetImportConfig | None = None

    @property
    def import_config(self) -> DatasetImportConfig:
        return self.config or DatasetImportConfig()


class DatasetCollectPayload(JobPayloadBase):
    """Search results to download into a dataset (`items`: each as the source returned it to the
    owner, attribution included), `tags` for all, `sources`: each source's config at submit time
    (its download hosts, API base URL and the name of its key's variable: never a key), and
    `config`: the URL importer's limits and allow-list."""

    kind: Literal["datasets.collect"] = "datasets.collect"
    dataset_id: str
    items: list[SourceResult]
    tags: list[str] | None = None
    sources: dict[str, SourceConfig] = Field(default_factory=dict)
    app_name: str = "atelier"
    config: DatasetImportConfig | None = None

    @property
    def import_config(self) -> DatasetImportConfig:
        return self.config or DatasetImportConfig()


class DatasetCaptionsPayload(JobPayloadBase):
    """Caption the images of `version` (the latest at submit time unless asked) with the language model
    `model`, under `settings` (style or instruction, token budget, temperature), into a new version.
    `overwrite` false keeps every non-empty caption; `trigger_word` (the request's, else the dataset's
    at submit time; None for none) goes first in each new caption; `max_images` caps the images asked
    about in one run (the rest are left for the next)."""

    kind: Literal["datasets.captions"] = "datasets.captions"
    dataset_id: str
    version: int = Field(ge=1)
    overwrite: bool = False
    trigger_word: str | None = None
    model: str
    settings: CaptionSettings = Field(default_factory=CaptionSettings)
    max_images: int | None = Field(None, ge=1)


JobPayload = Annotated[
    Union[
        ImageGenerationPayload,
        ImageEditPayload,
        ImageUpscalePayload,
        TextToImageHDPayload,
        ImageToVideoPayload,
        TextToVideoPayload,
        WorkflowRunPayload,
        DatasetImportPayload,
        DatasetCollectPayload,
        DatasetCaptionsPayload,
    ],
    Field(discriminator="kind"),
]

_ADAPTER: TypeAdapter[JobPayload] = TypeAdapter(JobPayload)

PAYLOAD_TYPES: dict[str, type[JobPayloadBase]] = {
    cls.model_fields["kind"].default: cls
    for cls in (ImageGenerationPayload, ImageEditPayload, ImageUpscalePayload, TextToImageHDPayload,
                ImageToVideoPayload, TextToVideoPayload, WorkflowRunPayload, DatasetImportPayload,
                DatasetCollectPayload, DatasetCaptionsPayload)
}
JOB_KINDS: tuple[str, ...] = tuple(PAYLOAD_TYPES)
VIDEO_KINDS: tuple[str, ...] = ("videos.image_to_video", "videos.text_to_video")


def parse_payload(kind: str, request: dict[str, Any]) -> JobPayload:
    """A stored request (`JobRecord.request`) as its kind's payload; `to_request()` gives it back.

    Raises UnknownJobKindError for a kind with no payload, pydantic's ValidationError for a request
    that does not fit its kind."""
    if kind not in PAYLOAD_TYPES:
        raise UnknownJobKindError(kind)
    return _ADAPTER.validate_python({**request, "kind": kind})


def parse_record(record: JobRecord) -> JobPayload:
    return parse_payload(record.kind, record.request)


# --- readers for replay, video delete, dataset imports ---------------------------------------------


def replay_payload(record: JobRecord) -> JobPayload:
    """The job's payload with every seed it used pinned, so a replay reproduces its outputs: an
    SDXL section without a seed gets the first seed the job recorded (image i used seed + i); a
    workflow recomputes instead of reading its cache, so the replay proves the bytes; and
    `replay_of` names the job."""
    payload = parse_record(record)
    sdxl: SDXLRequest | None = getattr(payload, "sdxl", None)
    seeds = (record.result or {}).get("seeds")
    if sdxl is not None and sdxl.seed is None and seeds:
        sdxl.seed = seeds[0]
    if isinstance(payload, WorkflowRunPayload):
        payload.use_cache = False
    payload.replay_of = record.id
    return payload


def replay_seed_missing(record: JobRecord) -> bool:
    """An image generation that recorded no seed, neither asked nor drawn: a replay could not
    reproduce it."""
    if record.kind != "images.generations":
        return False
    payload = parse_record(record)
    return payload.sdxl.seed is None and not (record.result or {}).get("seeds")


def video_source_key(record: JobRecord) -> str | None:
    """The image a video job animated, when it was given one (`svd.image_key`); None for other kinds."""
    payload = parse_record(record)
    return payload.svd.image_key if isinstance(payload, _VideoJob) else None


def job_prompt(record: JobRecord) -> str:
    """The prompt a job's outputs were made from, as a caption: the one it ran (after refinement),
    else the one it was given; "" for a job without one, or whose request does not parse."""
    prompt = (record.result or {}).get("prompt")
    if prompt:
        return prompt
    try:
        payload = parse_record(record)
    except (UnknownJobKindError, ValidationError):
        return ""
    sdxl: SDXLRequest | None = getattr(payload, "sdxl", None)
    return (sdxl.prompt if sdxl is not None else None) or ""
