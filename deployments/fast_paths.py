"""The diffusion models' speed switches: one config shape, set per model in its contract's Config
(`fast_paths:`), applied to the loaded pipeline by `deployments.diffusion.apply_fast_paths`.

Every switch defaults to off, which is the pipeline exactly as diffusers loads it; the values worth
running in production are measured on a GPU by benchmarks/gpu_check.py (`make gpu-check`). No
torch import here: the contracts, which the API imports, import this.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


class DiffusionFastPaths(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    attention: Literal["sdpa", "flash", "cudnn", "classic"] = Field("sdpa", description=(
        "sdpa: diffusers' default processor, torch's scaled_dot_product_attention choosing its kernel; "
        "flash / cudnn: the same, with only that fused kernel left on CUDA (the others off for this "
        "process; math stays as the fallback); classic: diffusers' unfused "
        "AttnProcessor (the attention matrix materialised), the baseline SDPA is measured against."))
    channels_last: bool = Field(False, description="UNet and VAE convolution weights in channels-last layout.")
    fuse_qkv: bool = Field(False, description=(
        "Fused QKV projections (diffusers' fuse_qkv_projections) in the UNet and an AutoencoderKL VAE. A "
        "pipeline call with a LoRA active runs unfused (the adapter sits on to_q/to_k/to_v)."))
    vae_upcast: bool | None = Field(None, description=(
        "Decode in float32 when the pipeline is float16 (diffusers' force_upcast). None: the VAE's own "
        "config (SDXL's and SVD's say true). bfloat16 never upcasts: its range does not overflow."))
    vae_model: str | None = Field(None, description=(
        "Folder or hub id of a replacement VAE in the diffusers layout, e.g. madebyollin/sdxl-vae-fp16-fix "
        "(with vae_upcast: false)."))
    vae_tiling: bool = Field(False, description="Decode (and encode) in overlapping tiles: large sizes in bounded memory.")
    vae_slicing: bool = Field(False, description="Decode a batch one image at a time: large batches in bounded memory.")
    compile: Literal["off", "regional", "full"] = Field("off", description=(
        "torch.compile of the UNet: regional compiles its repeated transformer blocks (diffusers' "
        "compile_repeated_blocks; seconds to compile), full the whole UNet (longer, sometimes faster). "
        "The first call of each new shape pays the compile."))
    compile_mode: CompileMode = Field("default", description=(
        "torch.compile mode; reduce-overhead adds CUDA graphs (one recording per shape)."))
    compile_fullgraph: bool = Field(True, description="Fail on a graph break instead of silently splitting.")
    compile_dynamic: bool | None = Field(False, description=(
        "torch.compile's dynamic: False compiles once per batch size and image size."))
    compile_backend: str = Field("inductor", description="torch.compile backend (tests trace with 'eager').")

    @model_validator(mode="after")
    def _check(self) -> "DiffusionFastPaths":
        if self.attention == "classic" and self.fuse_qkv:
            raise ValueError("fuse_qkv runs diffusers' fused SDPA processor; it cannot go with attention: classic")
        return self

    def enabled(self) -> dict:
        """The switches that differ from the defaults (what a report prints)."""
        return self.model_dump(exclude_defaults=True)
