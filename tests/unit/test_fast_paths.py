"""The diffusion fast paths (deployments/fast_paths.py) on CPU with the tiny models: every switch that
can run on a CPU still gives a valid image (or video), the same bytes twice under a seed, and, where
the switch only changes how the same numbers are computed, nearly the pixels of the plain pipeline.

What needs a GPU (flash/cuDNN kernels, inductor compile, CUDA graphs, fp16 VAE overflow) is measured
by benchmarks/gpu_check.py; here compile traces with torch.compile's "eager" backend, which checks
that the blocks compile as one graph each (fullgraph) without generating code.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from deployments.fast_paths import DiffusionFastPaths
from deployments.sdxl.contract import SDXLConfig, SDXLRequest
from deployments.sdxl.deployment import SDXLDeployment
from deployments.svd.contract import SVDRequest
from deployments.svd.deployment import SVDDeployment
from deployments.upscaler.contract import UpscalerConfig, UpscaleRequest
from deployments.upscaler.deployment import UpscalerDeployment
from local.tiny_models import build_pipeline, build_random_lora, ensure_tiny_models
from storage import Storage
from storage.registry import LoraRegistry

REPO = Path(__file__).resolve().parents[2]
STEPS = 2
# Mean absolute difference (of 255) allowed between a switch that computes the same function and the
# plain pipeline: float reordering only, amplified a little by random weights over the steps.
SAME_FUNCTION_MEAN_DIFF = 1.0


@pytest.fixture(scope="module")
def loop():
    with asyncio.Runner() as runner:
        yield runner


@pytest.fixture(scope="module")
def models() -> dict[str, Path]:
    return ensure_tiny_models(REPO / "models" / "tiny")


@pytest.fixture(scope="module")
def storage_root(tmp_path_factory, models) -> Path:
    root = tmp_path_factory.mktemp("storage")
    folder = build_random_lora(models["sdxl"], tmp_path_factory.mktemp("lora"), seed=1)
    LoraRegistry(Storage(str(root))).register("ink", {"base_model": str(models["sdxl"]), "rank": 4}, folder)
    return root


def sdxl_with(models, storage_root, **fast) -> SDXLDeployment:
    return SDXLDeployment.func_or_class({
        "model": str(models["sdxl"]), "storage_root": str(storage_root), "default_size": 64, "min_size": 32,
        "max_size": 256, "default_steps": STEPS, "torch_num_threads": 2, "fast_paths": fast})


def decoded(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    image.load()
    return np.asarray(image.convert("RGB")).astype(np.int16)


def generate(loop, sdxl, **request) -> list[bytes]:
    response = loop.run(sdxl.generate(SDXLRequest(prompt="a lighthouse", seed=7, **request)))
    return [image.png for image in response.images]


@pytest.fixture(scope="module")
def plain(loop, models, storage_root):
    """The plain pipeline's images, the reference for every switch."""
    sdxl = sdxl_with(models, storage_root)
    return {"one": generate(loop, sdxl), "two": generate(loop, sdxl, n=2), "large": generate(loop, sdxl, width=96, height=96),
            "lora": generate(loop, sdxl, lora="ink")}


SAME_FUNCTION = {
    "channels_last": {"channels_last": True},
    "fuse_qkv": {"fuse_qkv": True},
    "classic attention": {"attention": "classic"},
    "vae_slicing": {"vae_slicing": True},
    "vae_upcast": {"vae_upcast": True},  # float32 on CPU: nothing to upcast, and nothing breaks
    "all of them": {"channels_last": True, "fuse_qkv": True, "vae_slicing": True, "attention": "flash"},
    "regional compile": {"compile": "regional", "compile_backend": "eager"},
}


@pytest.mark.parametrize("fast", SAME_FUNCTION.values(), ids=SAME_FUNCTION.keys())
def test_a_switch_that_computes_the_same_function_gives_the_same_image(loop, models, storage_root, plain, fast):
    sdxl = sdxl_with(models, storage_root, **fast)
    assert sdxl.pipe.atelier_fast_paths, "nothing was applied"
    size = "two" if fast.get("vae_slicing") else "one"
    first = generate(loop, sdxl, n=2) if size == "two" else generate(loop, sdxl)
    again = generate(loop, sdxl, n=2) if size == "two" else generate(loop, sdxl)
    assert first == again  # deterministic under the seed
    for png, reference in zip(first, plain[size]):
        pixels = decoded(png)
        assert pixels.shape == (64, 64, 3)
        assert np.abs(pixels - decoded(reference)).mean() <= SAME_FUNCTION_MEAN_DIFF


def test_vae_tiling_decodes_a_large_image_in_tiles(loop, models, storage_root, plain):
    sdxl = sdxl_with(models, storage_root, vae_tiling=True)
    assert sdxl.pipe.vae.use_tiling and sdxl.pipe.vae.tile_sample_min_size < 96  # so 96² is decoded in tiles
    first = generate(loop, sdxl, width=96, height=96)
    assert first == generate(loop, sdxl, width=96, height=96)
    pixels = decoded(first[0])
    assert pixels.shape == (96, 96, 3) and pixels.std() > 0
    # Tiles are blended at their seams, so the image differs a little from the one-piece decode.
    assert np.abs(pixels - decoded(plain["large"][0])).mean() < 32


def test_a_lora_still_applies_with_fused_qkv(loop, models, storage_root, plain):
    """The adapter sits on to_q/to_k/to_v: a LoRA call runs unfused, and the fused projections come back after."""
    sdxl = sdxl_with(models, storage_root, fuse_qkv=True)
    fused_processors = {type(p).__name__ for p in sdxl.pipe.unet.attn_processors.values()}
    assert fused_processors == {"FusedAttnProcessor2_0"}
    with_lora = generate(loop, sdxl, lora="ink")
    assert np.abs(decoded(with_lora[0]) - decoded(plain["lora"][0])).mean() <= SAME_FUNCTION_MEAN_DIFF
    assert np.abs(decoded(with_lora[0]) - decoded(plain["one"][0])).mean() > 2 * SAME_FUNCTION_MEAN_DIFF
    assert {type(p).__name__ for p in sdxl.pipe.unet.attn_processors.values()} == fused_processors
    assert np.abs(decoded(generate(loop, sdxl)[0]) - decoded(plain["one"][0])).mean() <= SAME_FUNCTION_MEAN_DIFF


def test_a_replacement_vae_is_loaded_in_the_pipelines_precision(loop, models, storage_root, plain):
    # The tiny SDXL's own VAE folder stands in for e.g. madebyollin/sdxl-vae-fp16-fix.
    sdxl = sdxl_with(models, storage_root, vae_model=str(models["sdxl"] / "vae"), vae_upcast=False)
    assert sdxl.pipe.vae.config.force_upcast is False
    assert sdxl.img2img.vae is sdxl.pipe.vae  # the edit pipelines share it
    assert generate(loop, sdxl) == plain["one"]


def test_svd_takes_channels_last_with_its_5d_convolutions(loop, models, tmp_path):
    image = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(image, "PNG")
    svd = SVDDeployment.func_or_class({
        "model": str(models["svd"]), "storage_root": str(tmp_path), "default_width": 64, "default_height": 64,
        "min_size": 32, "default_steps": STEPS, "torch_num_threads": 2,
        "fast_paths": {"channels_last": True, "fuse_qkv": True, "vae_tiling": True}})
    applied = svd.pipe.atelier_fast_paths
    assert applied["channels_last"] is True and applied["fuse_qkv"] == "unet"
    assert applied["vae_tiling"].startswith("skipped")  # the temporal decoder has none: decode_chunk_size bounds it
    request = SVDRequest(image=image.getvalue(), seed=3, num_frames=4, fps=7)
    first = loop.run(svd.generate(request))
    assert first.num_frames == 4 and first.mp4 and first.mp4 == loop.run(svd.generate(request)).mp4


def test_upscaler_tiles_its_vae_by_default_and_takes_the_switches(loop, models, tmp_path):
    assert UpscalerConfig(model="x").fast_paths.vae_tiling is True
    assert UpscalerConfig(model="x", fast_paths={"channels_last": True}).fast_paths.vae_tiling is True
    image = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(image, "PNG")
    upscaler = UpscalerDeployment.func_or_class({
        "model": str(models["upscaler"]), "storage_root": str(tmp_path), "default_steps": STEPS,
        "torch_num_threads": 2, "fast_paths": {"channels_last": True, "fuse_qkv": True}})
    assert upscaler.pipe.vae.use_tiling
    assert upscaler.pipe.atelier_fast_paths["fuse_qkv"] == "unet and vae"
    request = UpscaleRequest(image=image.getvalue(), seed=2)
    first = loop.run(upscaler.upscale(request))
    assert (first.width, first.height) == (128, 128)
    assert decoded(first.png).shape == (128, 128, 3)
    assert first.png == loop.run(upscaler.upscale(request)).png


def test_defaults_change_nothing_and_bad_combinations_are_refused():
    assert SDXLConfig(model="x").fast_paths == DiffusionFastPaths()
    assert DiffusionFastPaths().enabled() == {}
    with pytest.raises(ValidationError, match="fuse_qkv"):
        DiffusionFastPaths(attention="classic", fuse_qkv=True)
    with pytest.raises(ValidationError):
        DiffusionFastPaths(channels_lats=True)  # a typo is an error, not a silent no-op


def test_pipelines_are_built_on_a_device_in_its_dtype_and_run(models):
    """What gpu_check does at full size on CUDA (there in bfloat16), at tiny size on the CPU."""
    rng_before = torch.get_rng_state()
    pipe = build_pipeline("sdxl", "tiny", device="cpu", dtype=torch.bfloat16, seed=0)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert {p.dtype for p in pipe.unet.parameters()} == {torch.bfloat16}
    assert pipe.text_encoder_2.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    assert pipe.scheduler.sigmas.dtype == torch.float32  # schedulers stay out of the device context
    image = pipe("a lighthouse", num_inference_steps=STEPS, width=64, height=64,
                 generator=torch.Generator("cpu").manual_seed(0)).images[0]
    assert image.size == (64, 64) and np.asarray(image).std() > 0
