"""The fast paths and the full-size builders on a real GPU. Skipped cleanly without CUDA.

benchmarks/gpu_check.py measures speed; these check what a CPU cannot: modules built directly on the
device in half precision, the flash / cuDNN attention kernels, inductor's compile of the UNet's blocks,
and a float16 VAE decode that upcasts instead of overflowing. Tiny architectures keep them short.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

REPO = Path(__file__).resolve().parents[2]


def test_a_full_size_sdxl_unet_is_built_on_the_device_in_bf16_without_a_cpu_copy():
    from diffusers import UNet2DConditionModel

    from local.tiny_models import SDXL_UNET, on_device

    torch.cuda.reset_peak_memory_stats()
    with on_device("cuda", torch.bfloat16):
        unet = UNet2DConditionModel(**SDXL_UNET["full"])
    params = list(unet.parameters())
    assert sum(p.numel() for p in params) == 2_567_463_684  # SDXL base 1.0's UNet
    assert {p.device.type for p in params} == {"cuda"} and {p.dtype for p in params} == {torch.bfloat16}
    assert torch.cuda.max_memory_allocated() < 1.3 * 2 * 2_567_463_684  # never a float32 copy


@pytest.mark.parametrize("fast", [
    {"attention": "flash", "channels_last": True, "fuse_qkv": True},
    {"attention": "cudnn"},
    {"compile": "regional", "compile_mode": "default"},
    {"vae_upcast": True},
], ids=["flash+channels_last+fuse", "cudnn", "regional-inductor", "fp16-vae-upcast"])
def test_fast_paths_on_cuda_give_finite_deterministic_images(tmp_path, fast):
    from deployments.diffusion import set_sdpa_backends
    from deployments.sdxl.contract import SDXLRequest
    from deployments.sdxl.deployment import SDXLDeployment
    from local.tiny_models import build_pipeline

    pipe = build_pipeline("sdxl", "tiny", "cuda", torch.float16)
    sdxl = SDXLDeployment.func_or_class({"model": "random-weights:tiny", "storage_root": str(tmp_path), "dtype": "float16",
                                         "default_size": 64, "min_size": 32, "fast_paths": fast},
                                        pipeline_factory=lambda _config: pipe)
    try:
        loop = asyncio.new_event_loop()
        request = SDXLRequest(prompt="x", n=2, seed=1, steps=4)
        first = loop.run_until_complete(sdxl.generate(request))
        again = loop.run_until_complete(sdxl.generate(request))
        assert [i.png for i in first.images] == [i.png for i in again.images]
        from PIL import Image
        import io

        pixels = np.asarray(Image.open(io.BytesIO(first.images[0].png)))
        assert pixels.shape == (64, 64, 3) and np.isfinite(pixels).all()
    finally:
        set_sdpa_backends("sdpa")  # process-wide flags: leave torch's own choice for the next test
