"""The SDXL deployment class without Ray: input checks, batching, seeds, progress, cancel."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from configs.tiny_models import ensure_tiny_models
from deployments.errors import InvalidRequestError, JobCancelledError
from deployments.sdxl import SDXLDeployment, SDXLProgress, SDXLRequest, SDXLResponse
from storage.jobs import JobStore

REPO = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("batching_outside_a_replica")


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory, loop):
    model = ensure_tiny_models(REPO / "models" / "tiny")["sdxl"]
    storage_root = tmp_path_factory.mktemp("storage")
    cls = SDXLDeployment.func_or_class
    return cls({"model": str(model), "storage_root": str(storage_root), "default_size": 64, "min_size": 32,
                "max_size": 256, "default_steps": 2, "max_steps": 50, "torch_num_threads": 2,
                "batch_wait_timeout_s": 0.2})


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture()
def run(loop):
    # One loop for the module: the batch queue lives on the loop of its first call.
    return loop.run_until_complete


@pytest.mark.parametrize("fields, param", [
    ({"width": 60, "height": 64}, "size"),
    ({"width": 1024, "height": 1024}, "size"),
    ({"steps": 51}, "steps"),
    ({"style": "unknown"}, "style"),
    ({"mode": "image_to_image"}, "image"),
    ({"seed": 2**32 - 1, "n": 2}, "seed"),
])
def test_check_inputs_names_the_field(sdxl, fields, param):
    with pytest.raises(InvalidRequestError) as raised:
        sdxl.check_inputs(SDXLRequest(prompt="x", **fields))
    assert raised.value.param == param


def test_inpaint_mask_must_match_the_image(sdxl):
    image = png(Image.new("RGB", (64, 64)))
    mask = png(Image.new("L", (32, 32)))
    with pytest.raises(InvalidRequestError) as raised:
        sdxl.check_inputs(SDXLRequest(prompt="x", mode="inpaint", image=image, mask=mask))
    assert raised.value.param == "mask"


def test_style_template_negative_and_defaults(sdxl):
    prepared = sdxl.check_inputs(SDXLRequest(prompt="a cat", style="line-art", negative_prompt="red"))
    assert prepared.prompt.startswith("line art drawing of a cat")
    assert prepared.negative_prompt.endswith(", red")
    assert prepared.guidance_scale == 7.0 and prepared.steps == 2


def test_concurrent_compatible_requests_share_one_pipeline_call(sdxl, run):
    async def go():
        requests = [SDXLRequest(prompt=f"p{i}", n=n, seed=10 * i, width=64, height=64) for i, n in
                    enumerate((1, 2, 4))]
        return await asyncio.gather(*(sdxl.generate(r) for r in requests))

    responses = run(go())
    assert [len(r.images) for r in responses] == [1, 2, 4]
    assert {r.batch_images for r in responses} == {7}  # one call carried all seven images
    assert [image.seed for image in responses[2].images] == [20, 21, 22, 23]


def test_images_do_not_depend_on_their_batch(sdxl, run):
    async def alone():
        return await sdxl.generate(SDXLRequest(prompt="fox", seed=5, width=64, height=64))

    async def batched():
        results = await asyncio.gather(
            sdxl.generate(SDXLRequest(prompt="fox", seed=5, width=64, height=64)),
            sdxl.generate(SDXLRequest(prompt="other", n=4, seed=99, width=64, height=64)))
        assert results[0].batch_images == 5
        return results[0]

    a = np.asarray(Image.open(io.BytesIO(run(alone()).images[0].png)), dtype=np.int16)
    b = np.asarray(Image.open(io.BytesIO(run(batched()).images[0].png)), dtype=np.int16)
    assert np.abs(a - b).max() <= 1


def test_incompatible_requests_run_as_separate_calls(sdxl, run):
    async def go():
        return await asyncio.gather(sdxl.generate(SDXLRequest(prompt="a", width=64, height=64)),
                                    sdxl.generate(SDXLRequest(prompt="b", width=32, height=32)))

    small, tiny = run(go())
    assert (small.batch_images, tiny.batch_images) == (1, 1)
    assert Image.open(io.BytesIO(tiny.images[0].png)).size == (32, 32)


def test_stream_reports_every_step_then_the_response(sdxl, run):
    async def go():
        return [event async for event in sdxl.generate_stream(SDXLRequest(prompt="x", steps=5, width=64, height=64))]

    events = run(go())
    assert [e.step for e in events if isinstance(e, SDXLProgress)] == [1, 2, 3, 4, 5]
    assert isinstance(events[-1], SDXLResponse)


def test_store_writes_pngs_to_storage(sdxl, run):
    response = run(sdxl.generate(SDXLRequest(prompt="x", n=2, seed=1, store=True, output_id="img_test")))
    for image in response.images:
        assert image.png is None and image.key.startswith("outputs/")
        assert sdxl.storage.get_bytes(image.key)[:4] == b"\x89PNG"


def test_cancel_marker_interrupts_the_pipeline(sdxl, run):
    jobs = JobStore(sdxl.storage)
    record = jobs.create("images.generations", {})
    jobs.update(record.id, status="in_progress")
    jobs.request_cancel(record.id)
    with pytest.raises(JobCancelledError):
        run(sdxl.generate(SDXLRequest(prompt="x", steps=40, job_id=record.id)))
