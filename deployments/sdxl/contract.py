"""SDXL's contract: what a request and a response look like, the model's limits, and the one check.

`SDXLLimits` is built from the deployment's config when the app is built (`from_config`), so the
API, workflow validation and the deployment hold the same numbers; `check(request, limits)` is the
only place they are enforced. It reads nothing: a LoRA's existence is the API's to check against
the registry, and what needs the decoded input images (their pixel count, a mask matching its
image) is the deployment's, once it has them.

No torch or diffusers import here: the API layer imports this.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Mapping

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from deployments.errors import InvalidRequestError
from deployments.fast_paths import DiffusionFastPaths
from deployments.media import check_size
from deployments.styles import StylePreset, load_styles

ALLOWED_N = (1, 2, 4, 8)
# Seeds are uint32 (deployments.diffusion.random_seed); the same value as deployments.diffusion's
# MAX_SEED, written here because that module's functions import torch and this one must not.
MAX_SEED = 2**32 - 1
SIZE_MULTIPLE = 8  # SDXL's latents are 1/8 of the image's sides
DEFAULT_MAX_LORAS_PER_REPLICA = 4
Mode = Literal["text_to_image", "image_to_image", "inpaint"]


def _check_n(n: int) -> int:
    if n not in ALLOWED_N:
        raise ValueError(f"n must be one of {list(ALLOWED_N)}")
    return n


def _check_prompt(prompt: str) -> str:
    if not prompt.strip():
        raise ValueError("prompt must not be empty")
    return prompt


# Field types shared with the HTTP protocol models.
ImageCount = Annotated[int, AfterValidator(_check_n)]
Prompt = Annotated[str, Field(min_length=1, max_length=4000), AfterValidator(_check_prompt)]


class SDXLConfig(BaseModel):
    model: str = Field(description="Folder or hub id of an SDXL base pipeline (diffusers layout).")
    model_name: str = "sdxl"
    storage_root: str = "var/storage"
    storage_options: dict[str, Any] = {}
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    variant: str | None = None
    default_size: int = 1024
    min_size: int = 256
    max_size: int = 2048
    default_steps: int = 30
    max_steps: int = 100
    default_guidance_scale: float = 5.0
    max_batch_images: int = Field(8, ge=8, description="Images per pipeline call; at least one n=8 request.")
    batch_wait_timeout_s: float = Field(0.0, ge=0, le=1, description=(
        "How long a request that finds the model idle waits for others to share its call. Under load, "
        "requests collect while the model is busy, whatever this is."))
    torch_num_threads: int | None = None
    gpu_memory_fraction: float | None = Field(None, gt=0, le=1)
    stall_timeout_s: float | None = Field(600, gt=0, description="Fail the health check when a running request "
                                                                 "makes no progress for this long.")
    fast_paths: DiffusionFastPaths = Field(DiffusionFastPaths(), description=(
        "Speed switches (deployments/fast_paths.py); all off by default."))
    styles_file: str | None = None
    max_loras_per_replica: int = Field(DEFAULT_MAX_LORAS_PER_REPLICA, ge=1,
                                       description="LoRA adapters a replica keeps loaded (LRU).")


class SDXLRequest(BaseModel):
    """What the deployment runs; the ingress maps the OpenAI shapes onto it."""

    mode: Mode = "text_to_image"
    prompt: Prompt
    negative_prompt: str | None = Field(None, max_length=4000)
    n: ImageCount = 1
    width: int | None = None
    height: int | None = None
    steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0, le=30)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    strength: float = Field(0.8, gt=0, le=1)
    style: str | None = None
    lora: str | None = Field(None, max_length=300, description="A registered LoRA: 'name' (latest) or 'name:version'.")
    lora_scale: float = Field(1.0, ge=0, le=4, description="The adapter's weight.")
    image: bytes | None = None
    image_key: str | None = None
    mask: bytes | None = None
    mask_key: str | None = None
    job_id: str | None = None
    store: bool = False
    output_id: str | None = None
    # Checked by `check`, never stored: a dump (a job's payload, its params) stays as it was.
    model: str | None = Field(None, exclude=True, description="The model the caller named, if any.")


class SDXLImage(BaseModel):
    seed: int
    width: int
    height: int
    png: bytes | None = None
    key: str | None = None


class SDXLResponse(BaseModel):
    model: str
    mode: Mode
    prompt: str
    negative_prompt: str
    steps: int
    guidance_scale: float
    images: list[SDXLImage]
    lora: str | None = Field(None, description="The adapter used, as name:version.")
    # Lineage: what made the images, besides the request (the PNGs carry the same in text chunks).
    source: str | None = Field(None, description="Folder or hub id of the base pipeline.")
    lora_sha256: str | None = Field(None, description="sha256 of the adapter's weights file.")
    batch_images: int = Field(description="Images in the pipeline call this request ran in.")
    elapsed_s: float


class SDXLProgress(BaseModel):
    step: int
    total_steps: int


class SDXLLimits(BaseModel):
    """What a request may ask of this SDXL deployment, and its defaults: fixed when the app is built."""

    model_config = ConfigDict(frozen=True)

    model: str = Field(description="The served model's name (config `model_name`).")
    source: str = Field(description="Folder or hub id of the base pipeline (config `model`).")
    default_size: int
    min_size: int
    max_size: int
    size_multiple: int = SIZE_MULTIPLE
    default_steps: int
    max_steps: int
    default_guidance_scale: float
    allowed_n: tuple[int, ...] = ALLOWED_N
    max_seed: int = MAX_SEED
    styles: dict[str, StylePreset] = {}
    max_loras_per_replica: int = DEFAULT_MAX_LORAS_PER_REPLICA

    @classmethod
    def from_config(cls, config: SDXLConfig | Mapping[str, Any],
                    styles: Mapping[str, StylePreset] | None = None) -> SDXLLimits:
        """`styles`: the loaded presets; default: read from `config.styles_file` (configs/styles.yaml)."""
        config = SDXLConfig.model_validate(config)
        if styles is None:
            styles = load_styles(config.styles_file)
        return cls(model=config.model_name, source=config.model, default_size=config.default_size,
                   min_size=config.min_size, max_size=config.max_size, default_steps=config.default_steps,
                   max_steps=config.max_steps, default_guidance_scale=config.default_guidance_scale,
                   styles=dict(styles), max_loras_per_replica=config.max_loras_per_replica)

    @property
    def max_input_pixels(self) -> int:
        """An input image (edit modes) may have at most this many pixels."""
        return self.max_size**2

    def describe(self) -> dict:
        """SDXLDeployment.describe(): the limits as the ingress and GET /v1/models read them."""
        return {
            "model": self.model,
            "source": self.source,
            "default_size": self.default_size,
            "min_size": self.min_size,
            "max_size": self.max_size,
            "default_steps": self.default_steps,
            "max_steps": self.max_steps,
            "default_guidance_scale": self.default_guidance_scale,
            "allowed_n": list(self.allowed_n),
            "styles": {name: style.model_dump() for name, style in self.styles.items()},
            "max_loras_per_replica": self.max_loras_per_replica,
        }


def style_of(request: SDXLRequest, limits: SDXLLimits) -> StylePreset | None:
    """The request's style preset; an unknown one is the request's error."""
    if request.style is None:
        return None
    style = limits.styles.get(request.style)
    if style is None:
        raise InvalidRequestError(f"unknown style {request.style!r}; known: {sorted(limits.styles)}", "style")
    return style


def steps_of(request: SDXLRequest, limits: SDXLLimits) -> int:
    """Denoising steps the request runs: its own, else its style's, else the model's default."""
    style = style_of(request, limits)
    return request.steps or (style.steps if style and style.steps else limits.default_steps)


def size_of(request: SDXLRequest, limits: SDXLLimits) -> tuple[int, int] | None:
    """(width, height) the request runs at: both given, else the default for text-to-image; None
    when it comes from the input image (its size, rounded down to a multiple of 8)."""
    if request.width and request.height:
        return request.width, request.height
    if request.mode == "text_to_image":
        return limits.default_size, limits.default_size
    return None


def check_denoising_steps(mode: str, steps: int, strength: float) -> None:
    """An input image is denoised for int(steps × strength) of the steps (diffusers' get_timesteps);
    none left would fail inside the pipeline, so it is the request's error."""
    if mode != "text_to_image" and int(steps * strength) < 1:
        raise InvalidRequestError(
            f"steps={steps} at strength {strength:g} leaves no denoising step (int(steps × strength) = 0); "
            f"use at least {math.ceil(1 / strength)} steps or a higher strength", "steps")


def check(request: SDXLRequest, limits: SDXLLimits) -> None:
    """Every SDXL limit, in one place: the API, workflow validation and the deployment call this.

    Raises InvalidRequestError naming the field. The size is checked once it is known: given, the
    default, or (edit modes without one) the input image's, which the deployment checks again
    with `width`/`height` filled in once it has decoded the image.
    """
    if request.model is not None and request.model != limits.model:
        raise InvalidRequestError(f"unknown model {request.model!r}; available: [{limits.model!r}]", "model")
    if request.n not in limits.allowed_n:
        raise InvalidRequestError(f"n must be one of {list(limits.allowed_n)}", "n")
    steps = steps_of(request, limits)  # an unknown style is refused here
    if steps > limits.max_steps:
        raise InvalidRequestError(f"steps must be at most {limits.max_steps}; got {steps}", "steps")
    check_denoising_steps(request.mode, steps, request.strength)
    if request.seed is not None and request.seed + request.n - 1 > limits.max_seed:
        raise InvalidRequestError(f"seed + n - 1 must be at most {limits.max_seed}", "seed")
    size = size_of(request, limits)
    if size is not None:
        check_size(*size, min_size=limits.min_size, max_size=limits.max_size, multiple=limits.size_multiple)


def routed(handle, request: SDXLRequest):
    """The SDXL handle for a request: with a LoRA, routed to a replica that holds that adapter."""
    return handle.options(multiplexed_model_id=request.lora) if request.lora else handle
