"""SVD's contract: its config, request and response, the model's limits, and the one check.

`SVDLimits` is built from the deployment's config (`from_config`); the frame limit, when the
config sets none, is the UNet's `num_frames`, which the deployment passes from its loaded
pipeline and anyone else reads from the model's `unet/config.json`. `check(request, limits)` is
the only place the limits are enforced: the API, workflow validation and the deployment call it.
It reads nothing: the conditioning image (exactly one of `image` and `image_key`, its pixel
count) is the deployment's to check once it has it.

Long videos: one call makes at most `max_num_frames` frames (one clip). A video job may ask for
up to `max_seconds`; `check(..., chain=True)` allows that, and `SVDChain.plan` splits it into
clips. Each clip after the first starts from a frame of the one before (stored as a PNG, passed
by image_key), overlaps it by `segment_overlap` frames, and the overlap is crossfaded
(`deployments/media.py`'s `join_clips`, run by `SVDDeployment.join`).

No torch or diffusers import here: the API layer imports this.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.limits import MAX_SEED, pipeline_json
from deployments.errors import InvalidRequestError
from deployments.fast_paths import DiffusionFastPaths
from deployments.media import check_size

SIZE_MULTIPLE = 8  # the VAE's latents are 1/8 of the frame's sides


class SVDConfig(BaseModel):
    model: str = Field(description="Folder or hub id of a Stable Video Diffusion pipeline (diffusers layout).")
    model_name: str = "svd"
    storage_root: str = "var/storage"
    storage_options: dict[str, Any] = {}
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    variant: str | None = None
    default_width: int = 1024
    default_height: int = 576
    min_size: int = 64
    max_size: int = 1024
    max_input_pixels: int = Field(4096 * 4096, description="Largest conditioning image accepted, before resizing.")
    default_num_frames: int | None = Field(None, ge=1, description="Defaults to max_num_frames.")
    max_num_frames: int | None = Field(None, ge=1, description="Defaults to the UNet's num_frames (14 or 25).")
    default_fps: int = 7
    min_fps: int = Field(1, ge=1)
    max_fps: int = 60
    default_steps: int = 25
    max_steps: int = 100
    default_min_guidance_scale: float = 1.0
    default_max_guidance_scale: float = 3.0
    default_decode_chunk_size: int = Field(8, ge=1, description="Frames per VAE decode; lower saves memory.")
    max_seconds: float = Field(30.0, ge=0, allow_inf_nan=False, description=(
        "Longest video a job may ask for, in seconds. Past one clip (max_num_frames) the job chains clips; "
        "0 allows one clip only."))
    segment_overlap: int = Field(3, ge=0, description=(
        "Frames each chained clip overlaps the one before, crossfaded; at most half a clip."))
    torch_num_threads: int | None = None
    gpu_memory_fraction: float | None = Field(None, gt=0, le=1)
    stall_timeout_s: float | None = Field(600, gt=0, description="Fail the health check when a running request "
                                                                 "makes no progress for this long.")
    fast_paths: DiffusionFastPaths = Field(DiffusionFastPaths(), description=(
        "Speed switches (deployments/fast_paths.py); all off by default."))

    @model_validator(mode="after")
    def _check_ranges(self) -> "SVDConfig":
        if not self.min_fps <= self.default_fps <= self.max_fps:
            raise ValueError("default_fps must lie between min_fps and max_fps")
        if not self.min_size <= min(self.default_width, self.default_height) <= max(
            self.default_width, self.default_height
        ) <= self.max_size:
            raise ValueError("default_width and default_height must lie between min_size and max_size")
        return self


class SVDRequest(BaseModel):
    """Exactly one of `image` and `image_key` (when it runs). Frame count, fps, steps, guidance and
    size are checked against the model's limits by `check`, so an out-of-range value is an
    InvalidRequestError naming the field."""

    image: bytes | None = None
    image_key: str | None = Field(None, description="Storage key of a stored image, e.g. an SDXL output.")
    num_frames: int | None = None
    fps: int | None = None
    motion_bucket_id: int = Field(127, ge=0, le=255)
    noise_aug_strength: float = Field(0.02, ge=0, le=1)
    decode_chunk_size: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    width: int | None = None
    height: int | None = None
    steps: int | None = Field(None, ge=1)
    min_guidance_scale: float | None = Field(None, ge=0, le=30)
    max_guidance_scale: float | None = Field(None, ge=0, le=30)
    job_id: str | None = None
    output_id: str | None = None
    store: bool = False
    handoff_frame: int | None = Field(None, description=(
        "Also store this frame (0 is the first; -1 the last) as a PNG (`handoff_key`): the next clip of "
        "a chained video starts from it. With store only."))
    # Checked by `check`, never stored: a dump (a job's payload) stays as it was.
    model: str | None = Field(None, exclude=True, description="The model the caller named, if any.")
    seconds: float | None = Field(None, gt=0, exclude=True, description=(
        "Clip length: num_frames = round(seconds × fps) when num_frames is not given."))


class SVDProgress(BaseModel):
    step: int
    total_steps: int


class SVDResponse(BaseModel):
    model: str
    video_key: str | None = None
    poster_key: str | None = None
    mp4: bytes | None = None
    poster_png: bytes | None = None
    handoff_key: str | None = Field(None, description="The frame asked for by handoff_frame, stored as a PNG.")
    num_frames: int
    fps: int
    width: int
    height: int
    seed: int
    steps: int
    motion_bucket_id: int
    noise_aug_strength: float
    elapsed_s: float


class SVDJoinRequest(BaseModel):
    """Join stored clips into one video: clip i+1's first `overlap` frames are crossfaded with clip
    i's last `overlap` (`deployments/media.py`'s `join_clips`)."""

    video_keys: list[str] = Field(min_length=1, description="The clips' MP4s, in order.")
    overlap: int = Field(0, ge=0)
    fps: int = Field(ge=1)
    job_id: str | None = None
    output_id: str | None = None
    store: bool = False


class SVDJoinResponse(BaseModel):
    model: str
    video_key: str | None = None
    mp4: bytes | None = None
    num_frames: int
    fps: int
    width: int
    height: int
    elapsed_s: float


class SVDSegment(BaseModel):
    """One clip of a chained video: its place, its frame count (the overlap included) and its seed."""

    index: int
    num_frames: int
    seed: int


class SVDChain(BaseModel):
    """How a video longer than one clip is made (pinned in its job when it is submitted, so a retry
    or a replay plans the same clips): clips of up to `clip_frames`, each after the first
    overlapping the one before by `overlap` frames."""

    model_config = ConfigDict(extra="allow")  # kept whole, like the job's payload

    clip_frames: int = Field(ge=1)
    overlap: int = Field(0, ge=0)

    def plan(self, num_frames: int, seed: int) -> list[SVDSegment]:
        """The clips of a `num_frames` video: one when it fits; else the first makes `clip_frames`,
        every next one starts from the frame the crossfade begins at and adds `clip_frames - overlap`
        new frames, and the last makes what is left plus the overlap. Clip i's seed is seed + i, as
        image i of a batch has seed + i, so the whole video is reproducible under one seed."""
        if num_frames < 1:
            raise ValueError(f"a video needs at least one frame; got {num_frames}")
        size, overlap = self.clip_frames, self.overlap_frames()
        counts = [min(num_frames, size)]
        made = counts[0]
        while made < num_frames:
            new = min(size - overlap, num_frames - made)
            counts.append(new + overlap)
            made += new
        return [SVDSegment(index=i, num_frames=count, seed=segment_seed(seed, i)) for i, count in enumerate(counts)]

    def overlap_frames(self) -> int:
        """The overlap the clips are made with: at most half a clip, so each adds at least half."""
        return min(self.overlap, self.clip_frames // 2)


def segment_seed(seed: int, index: int) -> int:
    return (seed + index) % (MAX_SEED + 1)


class SVDLimits(BaseModel):
    """What a request may ask of this SVD deployment, and its defaults."""

    model_config = ConfigDict(frozen=True)

    model: str = Field(description="The served model's name (config `model_name`).")
    source: str = Field(description="Folder or hub id of the pipeline (config `model`).")
    default_width: int
    default_height: int
    min_size: int
    max_size: int
    size_multiple: int = SIZE_MULTIPLE
    default_num_frames: int
    max_num_frames: int
    default_fps: int
    min_fps: int
    max_fps: int
    default_steps: int
    max_steps: int
    default_min_guidance_scale: float
    default_max_guidance_scale: float
    default_decode_chunk_size: int
    max_input_pixels: int
    motion_bucket_id: tuple[int, int] = (0, 255)
    noise_aug_strength: tuple[float, float] = (0.0, 1.0)
    max_seconds: float = Field(30.0, description="Longest video a job may ask for; past one clip it chains clips.")
    segment_overlap: int = Field(3, description="Frames each chained clip overlaps the one before (crossfaded).")

    @classmethod
    def from_config(cls, config: SVDConfig | Mapping[str, Any], unet_num_frames: int | None = None) -> SVDLimits:
        """`unet_num_frames`: the loaded UNet's `num_frames`, the frame limit when the config sets
        none; default: read from the model's `unet/config.json` (needed only then)."""
        config = SVDConfig.model_validate(config)
        max_num_frames = config.max_num_frames or unet_num_frames
        if max_num_frames is None:
            max_num_frames = (pipeline_json(config.model, "unet/config.json") or {}).get("num_frames")
        if max_num_frames is None:
            raise ValueError(f"the frame limit of {config.model!r} is unknown: its unet/config.json could not be "
                             "read; set max_num_frames in the svd config")
        return cls(
            model=config.model_name, source=config.model, default_width=config.default_width,
            default_height=config.default_height, min_size=config.min_size, max_size=config.max_size,
            default_num_frames=min(config.default_num_frames or max_num_frames, max_num_frames),
            max_num_frames=max_num_frames, default_fps=config.default_fps, min_fps=config.min_fps,
            max_fps=config.max_fps, default_steps=config.default_steps, max_steps=config.max_steps,
            default_min_guidance_scale=config.default_min_guidance_scale,
            default_max_guidance_scale=config.default_max_guidance_scale,
            default_decode_chunk_size=config.default_decode_chunk_size, max_input_pixels=config.max_input_pixels,
            max_seconds=config.max_seconds, segment_overlap=min(config.segment_overlap, max_num_frames // 2),
        )

    def chain(self) -> SVDChain:
        """How this model chains clips for a long video (pinned in the job when it is submitted)."""
        return SVDChain(clip_frames=self.max_num_frames, overlap=self.segment_overlap)

    def describe(self) -> dict:
        """SVDDeployment.describe(): every limit and default, as the ingress reads them."""
        return self.model_dump(mode="json")


# --- what a request runs with: its own values, else the model's defaults ------------------------


def longest_video_s(limits: SVDLimits, fps: int) -> float:
    """The longest video a job may ask for at `fps`: `max_seconds`, or one clip if that is longer."""
    return max(limits.max_seconds, limits.max_num_frames / fps)


def fps_of(request: SVDRequest, limits: SVDLimits) -> int:
    return request.fps if request.fps is not None else limits.default_fps


def _frames_for_seconds(seconds: float, fps: int) -> int | None:
    # JSON's Infinity, a form's "inf", or a finite 1e308 that overflows once times fps: None, so it
    # is refused before round() (which raises on inf and nan) ever sees it.
    frames = seconds * fps
    return round(frames) if math.isfinite(frames) else None


def num_frames_of(request: SVDRequest, limits: SVDLimits) -> int:
    """num_frames, else round(seconds × fps), else the model's default. After `check`."""
    if request.num_frames is not None:
        return request.num_frames
    if request.seconds is not None:
        return _frames_for_seconds(request.seconds, fps_of(request, limits))
    return limits.default_num_frames


def steps_of(request: SVDRequest, limits: SVDLimits) -> int:
    return request.steps or limits.default_steps


def guidance_of(request: SVDRequest, limits: SVDLimits) -> tuple[float, float]:
    low, high = request.min_guidance_scale, request.max_guidance_scale
    return (float(limits.default_min_guidance_scale if low is None else low),
            float(limits.default_max_guidance_scale if high is None else high))


def size_of(request: SVDRequest, limits: SVDLimits) -> tuple[int, int]:
    return request.width or limits.default_width, request.height or limits.default_height


# --- the check ------------------------------------------------------------------------------------


def check(request: SVDRequest, limits: SVDLimits, *, chain: bool = False) -> None:
    """Every SVD limit, in one place. Raises InvalidRequestError naming the field.

    `chain`: the caller (a video job) chains clips, so `seconds` may ask for up to the longest
    video (`longest_video_s`); one call, and `num_frames`, stay within one clip."""
    if request.model is not None and request.model != limits.model:
        raise InvalidRequestError(f"unknown model {request.model!r}; available: [{limits.model!r}]", "model")
    fps = fps_of(request, limits)
    if not limits.min_fps <= fps <= limits.max_fps:
        raise InvalidRequestError(f"fps must be between {limits.min_fps} and {limits.max_fps}; got {fps}", "fps")
    limit = limits.max_num_frames
    if request.num_frames is not None or request.seconds is None:
        num_frames = num_frames_of(request, limits)
        if not 1 <= num_frames <= limit:
            raise InvalidRequestError(f"num_frames must be between 1 and {limit}; got {num_frames}", "num_frames")
    else:  # num_frames wins over seconds
        num_frames = _frames_for_seconds(request.seconds, fps)
        if chain and (num_frames is None or num_frames > limit):  # past one clip: a chained video
            longest = longest_video_s(limits, fps)
            if num_frames is None or request.seconds > longest:
                raise InvalidRequestError(
                    f"seconds must be at most {longest:g} (the longest video, chained from clips of up to "
                    f"{limit} frames); got {request.seconds:g}", "seconds")
        elif num_frames is None or not 1 <= num_frames <= limit:
            raise InvalidRequestError(
                f"seconds={request.seconds:g} at {fps} fps is "
                f"{num_frames if num_frames is not None else 'too many'} frames; the model makes 1 to {limit} "
                f"frames (at most {limit / fps:.2f} s at this fps; lower fps for longer clips)", "seconds")
    if request.handoff_frame is not None and not -num_frames <= request.handoff_frame < num_frames:
        raise InvalidRequestError(f"handoff_frame must be between {-num_frames} and {num_frames - 1}; "
                                  f"got {request.handoff_frame}", "handoff_frame")
    steps = steps_of(request, limits)
    if steps > limits.max_steps:
        raise InvalidRequestError(f"steps must be at most {limits.max_steps}; got {steps}", "steps")
    min_guidance, max_guidance = guidance_of(request, limits)
    if min_guidance > max_guidance:
        raise InvalidRequestError(
            f"min_guidance_scale ({min_guidance}) must not exceed max_guidance_scale ({max_guidance})",
            "min_guidance_scale")
    check_size(*size_of(request, limits), min_size=limits.min_size, max_size=limits.max_size,
               multiple=limits.size_multiple)
