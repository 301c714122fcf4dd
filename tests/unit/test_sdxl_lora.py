"""Per-request LoRA adapters in the SDXL deployment (without Ray): loading by registered name,
switching without reloading the base pipeline, LRU eviction, batching and bad references."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from local.tiny_models import build_random_lora, ensure_tiny_models
from deployments.errors import InvalidRequestError
from deployments.sdxl.contract import SDXLRequest
from deployments.sdxl.deployment import SDXLDeployment
from storage import Storage
from storage.registry import LoraRegistry

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def loop():
    # One loop for the module, as in a replica; closing it cancels the batcher's worker task.
    with asyncio.Runner() as runner:
        yield runner


@pytest.fixture(scope="module")
def model() -> Path:
    return ensure_tiny_models(REPO / "models" / "tiny")["sdxl"]


@pytest.fixture(scope="module")
def storage_root(tmp_path_factory, model) -> Path:
    root = tmp_path_factory.mktemp("storage")
    registry = LoraRegistry(Storage(str(root)))
    for name, seed, trigger in (("corgi", 1, "sks"), ("style.ink", 2, None), ("third", 3, None)):
        folder = build_random_lora(model, tmp_path_factory.mktemp(name), seed)
        registry.register(name, {"base_model": str(model), "rank": 4, "trigger_word": trigger}, folder)
    return root


@pytest.fixture(scope="module")
def sdxl(storage_root, model):
    cls = SDXLDeployment.func_or_class
    return cls({"model": str(model), "storage_root": str(storage_root), "default_size": 64, "min_size": 32,
                "max_size": 256, "default_steps": 2, "max_steps": 50, "torch_num_threads": 2,
                "batch_wait_timeout_s": 0.2, "max_loras_per_replica": 2})


@pytest.fixture()
def run(loop):
    return loop.run


def pixels(response) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(response.images[0].png)))


def generate(sdxl, run, **fields):
    return run(sdxl.generate(SDXLRequest(prompt="a dog", seed=7, width=64, height=64, **fields)))


def test_adapters_change_the_image_and_switching_back_restores_the_base(sdxl, run):
    pipe, unet = sdxl.pipe, sdxl.pipe.unet
    base = pixels(generate(sdxl, run))
    corgi = generate(sdxl, run, lora="corgi")
    ink = generate(sdxl, run, lora="style.ink:1")
    assert (corgi.lora, ink.lora) == ("corgi:1", "style.ink:1")
    assert not np.array_equal(pixels(corgi), base)
    assert not np.array_equal(pixels(ink), base)
    assert not np.array_equal(pixels(corgi), pixels(ink))
    again = generate(sdxl, run)
    assert again.lora is None
    assert np.array_equal(pixels(again), base)  # bit-identical: the adapters are off, not approximately undone
    assert np.array_equal(pixels(generate(sdxl, run, lora="corgi")), pixels(corgi))
    # the base pipeline and its modules were never reloaded
    assert sdxl.pipe is pipe and sdxl.pipe.unet is unet and sdxl.img2img.unet is unet


def test_lora_scale_weights_the_adapter(sdxl, run):
    full = pixels(generate(sdxl, run, lora="corgi"))
    half = pixels(generate(sdxl, run, lora="corgi", lora_scale=0.5))
    assert not np.array_equal(full, half)


def test_trigger_word_is_added_when_absent(sdxl, run):
    assert generate(sdxl, run, lora="corgi").prompt == "sks, a dog"
    present = run(sdxl.generate(SDXLRequest(prompt="a photo of SKS dog", seed=1, width=64, height=64, lora="corgi")))
    assert present.prompt == "a photo of SKS dog"
    assert generate(sdxl, run, lora="style.ink").prompt == "a dog"  # no trigger word


def test_unknown_or_bad_lora_names_the_field(sdxl, run):
    for ref in ("nope", "corgi:9", "a/b", "corgi:zero"):
        with pytest.raises(InvalidRequestError) as raised:
            generate(sdxl, run, lora=ref)
        assert raised.value.param == "lora", ref


def test_lru_evicts_and_deletes_adapters(sdxl, run):
    for ref in ("corgi", "style.ink", "third"):  # capacity 2: corgi goes
        generate(sdxl, run, lora=ref)
    assert sdxl.loaded_loras() == ["style.ink:1", "third:1"]
    adapters = {a for names in sdxl.pipe.get_list_adapters().values() for a in names}
    assert len(adapters) == 2 and not any(a.startswith("corgi") for a in adapters)
    # two references to one version share one adapter ("third:1" evicts "style.ink")
    generate(sdxl, run, lora="third:1")
    assert sdxl.loaded_loras() == ["third:1"]
    adapters = {a for names in sdxl.pipe.get_list_adapters().values() for a in names}
    assert sum(a.startswith("third") for a in adapters) == 1


def test_requests_with_different_loras_never_share_a_pipeline_call(sdxl, run):
    async def go():
        requests = [SDXLRequest(prompt="x", seed=1, width=64, height=64, lora="corgi"),
                    SDXLRequest(prompt="y", seed=2, width=64, height=64, lora="corgi"),
                    SDXLRequest(prompt="z", seed=3, width=64, height=64, lora="style.ink"),
                    SDXLRequest(prompt="w", seed=4, width=64, height=64)]
        return await asyncio.gather(*(sdxl.generate(r) for r in requests))

    same_a, same_b, other, plain = run(go())
    assert (same_a.batch_images, same_b.batch_images) == (2, 2)  # one adapter: one call
    assert (other.batch_images, plain.batch_images) == (1, 1)
    assert (same_a.lora, other.lora, plain.lora) == ("corgi:1", "style.ink:1", None)


def test_multiplexed_model_id_selects_the_adapter(sdxl, run, monkeypatch):
    import deployments.sdxl.lora as module

    base = pixels(generate(sdxl, run))
    monkeypatch.setattr(module.serve, "get_multiplexed_model_id", lambda: "corgi")
    routed = generate(sdxl, run)  # as if called through handle.options(multiplexed_model_id="corgi")
    assert routed.lora == "corgi:1" and not np.array_equal(pixels(routed), base)
    with pytest.raises(InvalidRequestError) as raised:
        generate(sdxl, run, lora="third")
    assert raised.value.param == "lora"
