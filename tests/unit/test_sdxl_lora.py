"""Per-request LoRA adapters in the SDXL deployment (without Ray): loading by registered name,
switching without reloading the base pipeline, LRU eviction, batching and bad references."""

from __future__ import annotations

import asyncio
import io
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from local.tiny_models import build_random_lora, ensure_tiny_models
from deployments.errors import InvalidRequestError
from deployments.sdxl.contract import SDXLRequest
from deployments.sdxl.deployment import SDXLDeployment
from deployments.sdxl.lora import UnknownLoraError
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
    for ref, status in (("nope", 404), ("corgi:9", 404), ("a/b", 400), ("corgi:zero", 400)):
        with pytest.raises(InvalidRequestError) as raised:
            generate(sdxl, run, lora=ref)
        assert (raised.value.param, raised.value.status_code) == ("lora", status), ref


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


def test_a_lora_deleted_while_a_generation_runs_with_it(sdxl, run, storage_root, model, tmp_path, monkeypatch):
    """DELETE /v1/models/{id} while a replica holds the adapter and a request runs with it: that
    request finishes with the adapter, the adapter goes after it, and new requests are refused."""
    monkeypatch.setattr(sdxl.adapters, "recheck_s", 0.0)  # every request rechecks (2 s in service)
    registry = LoraRegistry(Storage(str(storage_root)))
    registry.register("doomed", {"base_model": str(model), "rank": 4}, build_random_lora(model, tmp_path, 4))
    request = SDXLRequest(prompt="a dog", seed=7, width=64, height=64, lora="doomed:1")
    undisturbed = run(sdxl.generate(request))  # also leaves the adapter loaded in this replica
    assert "doomed:1" in sdxl.loaded_loras()
    deleted, resume = threading.Event(), threading.Event()
    beat = sdxl.stall_watch.beat

    def delete_mid_run(token):  # the first denoising step, on the torch thread: the adapter is active
        if not deleted.is_set():
            registry.delete("doomed", 1)
            deleted.set()
            assert resume.wait(60)
        beat(token)

    monkeypatch.setattr(sdxl.stall_watch, "beat", delete_mid_run)

    async def scenario():
        in_flight = asyncio.ensure_future(sdxl.generate(request))
        assert await asyncio.to_thread(deleted.wait, 60)
        with pytest.raises(UnknownLoraError) as refused:  # a new request, while the first one runs
            await sdxl.generate(request)
        held = sdxl.loaded_loras()
        resume.set()
        return await in_flight, refused.value, held

    finished, refused, held = run(scenario())
    assert (refused.status_code, refused.param, refused.to_body()["error"]["code"]) == (404, "lora", "model_not_found")
    assert "doomed:1" in held  # still in the pipeline while the first request ran with it
    assert finished.lora == "doomed:1" and finished.images[0].png == undisturbed.images[0].png
    assert not np.array_equal(pixels(finished), pixels(generate(sdxl, run)))  # the adapter was applied
    # gone from the pipeline once that request ended, and refused under either reference since
    assert "doomed:1" not in sdxl.loaded_loras()
    assert not any(a.startswith("doomed") for names in sdxl.pipe.get_list_adapters().values() for a in names)
    for ref in ("doomed:1", "doomed"):
        with pytest.raises(UnknownLoraError):
            generate(sdxl, run, lora=ref)
    assert np.array_equal(pixels(generate(sdxl, run, lora="corgi")), pixels(generate(sdxl, run, lora="corgi")))
