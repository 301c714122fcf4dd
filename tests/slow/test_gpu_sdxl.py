"""GPU paths: fp16 on CUDA with a per-process memory cap. Skipped cleanly without a GPU."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

REPO = Path(__file__).resolve().parents[2]


def test_sdxl_fp16_on_cuda_with_memory_fraction(tmp_path):
    from local.tiny_models import ensure_tiny_models
    from deployments.sdxl.contract import SDXLRequest
    from deployments.sdxl.deployment import SDXLDeployment

    model = ensure_tiny_models(REPO / "models" / "tiny")["sdxl"]
    sdxl = SDXLDeployment.func_or_class({"model": str(model), "storage_root": str(tmp_path), "default_size": 64,
                                         "min_size": 32, "gpu_memory_fraction": 0.25})
    assert sdxl.pipe.unet.dtype == torch.float16 and sdxl.pipe.device.type == "cuda"
    loop = asyncio.new_event_loop()
    first = loop.run_until_complete(sdxl.generate(SDXLRequest(prompt="x", n=2, seed=1, steps=4)))
    again = loop.run_until_complete(sdxl.generate(SDXLRequest(prompt="x", n=2, seed=1, steps=4)))
    assert [i.png for i in first.images] == [i.png for i in again.images]
