"""The upscaler's contract: its config, request and response, the model's limits, and the one check.

`UpscalerLimits` is built from the deployment's config (`from_config`), with what the weights
decide (the upscale factor, the VAE's; the highest noise level, the pipeline's) passed by the
deployment from its loaded pipeline, or read from the model's config files by anyone else.
`check(request, limits, media)` is the only place the limits are enforced: the API, workflow
validation and the deployment call it. It reads nothing: the input's size and frame count are
given as `media` by whoever knows them (the API from the decoded upload or the planned video, a
workflow from its graph, the deployment once it has decoded the input).

No torch or diffusers import here: the API layer imports this.
"""

from __future__ import annotations

from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.limits import MAX_SEED, pipeline_json
from deployments.errors import InvalidRequestError
from deployments.fast_paths import DiffusionFastPaths

DEFAULT_MAX_NOISE_LEVEL = 350  # StableDiffusionUpscalePipeline's, when its model_index.json sets none


class UpscalerFastPaths(DiffusionFastPaths):
    vae_tiling: bool = Field(True, description="On by default here: the 4x decode is the memory peak.")


class UpscalerConfig(BaseModel):
    model: str = Field(description="Folder or hub id of a StableDiffusionUpscalePipeline (diffusers layout).")
    model_name: str = "upscaler"
    storage_root: str = "var/storage"
    storage_options: dict[str, Any] = {}
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    variant: str | None = None
    min_input_size: int = Field(16, ge=1, description="Smallest side accepted.")
    max_input_size: int = Field(1024, description="Largest side accepted.")
    tile_size: int = Field(256, ge=8, description="Inputs with a longer side are upscaled as overlapping tiles.")
    tile_overlap: int = Field(32, ge=0, description="Input pixels shared by neighbouring tiles.")
    max_batch_images: int = Field(4, ge=1, description="Tiles or frames per pipeline call.")
    default_steps: int = 20
    max_steps: int = 100
    default_noise_level: int = 20
    guidance_scale: float = 9.0
    max_frames: int = Field(128, ge=1, description="Longest video accepted, in frames.")
    scale: int | None = Field(None, ge=2, description=(
        "The upscale factor (the VAE's). Read from a local model folder when unset; set it for a hub id."))
    max_noise_level: int | None = Field(None, ge=0, description=(
        "The pipeline's highest noise level. Read from a local model folder when unset; set it for a hub id."))
    torch_num_threads: int | None = None
    gpu_memory_fraction: float | None = Field(None, gt=0, le=1)
    stall_timeout_s: float | None = Field(600, gt=0, description="Fail the health check when a running request "
                                                                 "makes no progress for this long.")
    fast_paths: UpscalerFastPaths = Field(UpscalerFastPaths(), description=(
        "Speed switches (deployments/fast_paths.py); all off by default, except VAE tiling."))

    @model_validator(mode="after")
    def _check_tiles(self) -> "UpscalerConfig":
        if self.tile_overlap * 2 >= self.tile_size:
            raise ValueError("tile_overlap must be less than half of tile_size")
        if self.min_input_size > self.max_input_size:
            raise ValueError("min_input_size must not exceed max_input_size")
        return self


class UpscaleRequest(BaseModel):
    """Exactly one of `image`, `image_key`, `video` and `video_key` (when it runs)."""

    image: bytes | None = None
    image_key: str | None = None
    video: bytes | None = None
    video_key: str | None = None
    prompt: str = Field("", max_length=4000)
    steps: int | None = Field(None, ge=1)
    noise_level: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    job_id: str | None = None
    output_id: str | None = None
    store: bool = False
    # Checked by `check`, never stored: a dump (a job's payload) stays as it was.
    model: str | None = Field(None, exclude=True, description="The model the caller named, if any.")


class UpscaleProgress(BaseModel):
    step: int
    total_steps: int


class UpscaleResponse(BaseModel):
    model: str
    media: Literal["image", "video"]
    key: str | None = None
    png: bytes | None = None
    mp4: bytes | None = None
    width: int
    height: int
    num_frames: int | None = None
    fps: float | None = None
    tiles: int = Field(description="Tiles per image or frame; 1 when it was upscaled whole.")
    seed: int
    steps: int
    noise_level: int
    elapsed_s: float


class UpscaleMedia(BaseModel):
    """What is known of an input before (or after) decoding it, for `check`: its size, its frame
    count if it is a video, and how the caller names it in an error."""

    model_config = ConfigDict(frozen=True)

    width: int
    height: int
    num_frames: int | None = None
    param: str = Field("image", description="The field an error names, e.g. image_key or inputs.image.")
    what: str = Field("image", description="The input in an error's words, e.g. 'the video' or 'the still'.")


class UpscalerLimits(BaseModel):
    """What a request may ask of this upscaler deployment, and its defaults."""

    model_config = ConfigDict(frozen=True)

    model: str = Field(description="The served model's name (config `model_name`).")
    source: str = Field(description="Folder or hub id of the pipeline (config `model`).")
    scale: int = Field(description="The upscale factor: the VAE's; each side of the output is this times the input's.")
    min_input_size: int
    max_input_size: int
    tile_size: int = Field(description="The config's tile_size, rounded down to a multiple of scale.")
    tile_overlap: int
    default_steps: int
    max_steps: int
    default_noise_level: int
    max_noise_level: int
    max_frames: int

    @classmethod
    def from_config(cls, config: UpscalerConfig | Mapping[str, Any], scale: int | None = None,
                    max_noise_level: int | None = None) -> UpscalerLimits:
        """`scale` (the pipeline's `vae_scale_factor`) and `max_noise_level` (its config's): from
        the loaded pipeline; default: read from the model's `vae/config.json` and `model_index.json`."""
        config = UpscalerConfig.model_validate(config)
        for name, loaded in (("scale", scale), ("max_noise_level", max_noise_level)):
            set_ = getattr(config, name)
            if set_ is not None and loaded is not None and set_ != loaded:
                raise ValueError(f"upscaler {name} is set to {set_} but the model's is {loaded}")
        scale = scale or config.scale
        max_noise_level = max_noise_level if max_noise_level is not None else config.max_noise_level
        if scale is None:
            channels = (pipeline_json(config.model, "vae/config.json") or {}).get("block_out_channels")
            if not channels:
                raise ValueError(f"the upscale factor of {config.model!r} is unknown: it is not a local folder "
                                 "with a vae/config.json; set scale in the upscaler config")
            scale = 2 ** (len(channels) - 1)  # diffusers' vae_scale_factor
        if max_noise_level is None:
            index = pipeline_json(config.model, "model_index.json")
            if index is None:
                raise ValueError(f"the noise levels of {config.model!r} are unknown: it is not a local folder "
                                 "with a model_index.json; set max_noise_level in the upscaler config")
            max_noise_level = index.get("max_noise_level", DEFAULT_MAX_NOISE_LEVEL)
        return cls(
            model=config.model_name, source=config.model, scale=scale, min_input_size=config.min_input_size,
            max_input_size=config.max_input_size, tile_size=max(scale, config.tile_size // scale * scale),
            tile_overlap=config.tile_overlap, default_steps=config.default_steps, max_steps=config.max_steps,
            default_noise_level=config.default_noise_level, max_noise_level=int(max_noise_level),
            max_frames=config.max_frames,
        )

    @property
    def max_input_pixels(self) -> int:
        """An input image, or each frame of an input video, may have at most this many pixels."""
        return self.max_input_size**2

    def describe(self) -> dict:
        """UpscalerDeployment.describe(): every limit and default, as the ingress reads them."""
        return self.model_dump(mode="json")


def steps_of(request: UpscaleRequest, limits: UpscalerLimits) -> int:
    return request.steps or limits.default_steps


def noise_level_of(request: UpscaleRequest, limits: UpscalerLimits) -> int:
    return limits.default_noise_level if request.noise_level is None else request.noise_level


def check(request: UpscaleRequest, limits: UpscalerLimits, media: UpscaleMedia | None = None, *,
          steps_param: str = "steps") -> None:
    """Every upscaler limit, in one place. Raises InvalidRequestError naming the field.

    `media`: the input's size (and frames), when known; `steps_param`: the caller's name for
    `steps` (POST /v1/videos calls it upscale_steps).
    """
    if request.model is not None and request.model != limits.model:
        raise InvalidRequestError(f"unknown model {request.model!r}; available: [{limits.model!r}]", "model")
    steps = steps_of(request, limits)
    if steps > limits.max_steps:
        raise InvalidRequestError(f"{steps_param} must be at most {limits.max_steps}; got {steps}", steps_param)
    noise_level = noise_level_of(request, limits)
    if noise_level > limits.max_noise_level:
        raise InvalidRequestError(f"noise_level must be at most {limits.max_noise_level}; got {noise_level}",
                                  "noise_level")
    if media is None:
        return
    low, high = limits.min_input_size, limits.max_input_size
    if min(media.width, media.height) < low or max(media.width, media.height) > high:
        raise InvalidRequestError(
            f"{media.what} is {media.width}x{media.height}; each side must be between {low} and {high} pixels to "
            f"upscale (the output is {limits.scale}x each side)", media.param)
    if media.num_frames is not None and media.num_frames > limits.max_frames:
        raise InvalidRequestError(
            f"{media.what} has {media.num_frames} frames; the upscaler takes at most {limits.max_frames}", media.param)
