"""The SDXL deployment class without Ray: input checks, batching, seeds, progress, cancel."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from local.tiny_models import ensure_tiny_models
from deployments.errors import InvalidRequestError
from deployments.sdxl import contract
from deployments.sdxl.contract import SDXLProgress, SDXLRequest, SDXLResponse
from deployments.sdxl.deployment import SDXLDeployment

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def loop():
    # One loop for the module, as in a replica; closing it cancels the batcher's worker task.
    with asyncio.Runner() as runner:
        yield runner


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    model = ensure_tiny_models(REPO / "models" / "tiny")["sdxl"]
    storage_root = tmp_path_factory.mktemp("storage")
    cls = SDXLDeployment.func_or_class
    return cls({"model": str(model), "storage_root": str(storage_root), "default_size": 64, "min_size": 32,
                "max_size": 256, "default_steps": 2, "max_steps": 50, "torch_num_threads": 2})


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture()
def run(loop):
    return loop.run


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


@pytest.mark.parametrize("fields", [
    {"model": "dall-e-3"}, {"style": "baroque"}, {"steps": 51}, {"width": 60, "height": 64},
    {"mode": "image_to_image", "steps": 1, "strength": 0.5, "image": b"unread"}, {"seed": 2**32 - 1, "n": 2},
])
def test_the_deployment_refuses_what_the_contract_refuses_with_the_same_message(sdxl, fields):
    request = SDXLRequest(prompt="x", **fields)
    with pytest.raises(InvalidRequestError) as by_contract:
        contract.check(request, sdxl.limits)
    with pytest.raises(InvalidRequestError) as by_deployment:
        sdxl.check_inputs(request)
    assert (by_deployment.value.param, by_deployment.value.message) == (by_contract.value.param,
                                                                        by_contract.value.message)


def test_an_input_image_gives_the_size_and_the_contract_checks_it(sdxl):
    small = png(Image.new("RGB", (23, 20)))  # 16x16 once rounded down to multiples of 8: under min_size
    with pytest.raises(InvalidRequestError) as raised:
        sdxl.check_inputs(SDXLRequest(prompt="x", mode="image_to_image", image=small))
    assert (raised.value.param, raised.value.message) == ("size", "size sides must be between 32 and 256 pixels; "
                                                                  "got 16x16")
    prepared = sdxl.check_inputs(SDXLRequest(prompt="x", mode="image_to_image", image=png(Image.new("RGB", (70, 41)))))
    assert (prepared.width, prepared.height) == (64, 40) and prepared.image.size == (64, 40)


def test_a_random_seed_leaves_room_for_every_image(sdxl, monkeypatch):
    import deployments.sdxl.deployment as module

    monkeypatch.setattr(module, "random_seed", lambda: 2**32 - 1)
    assert sdxl.check_inputs(SDXLRequest(prompt="x", n=8)).seed == 2**32 - 8


def test_describe_is_the_limits(sdxl):
    assert sdxl.describe() == sdxl.limits.describe()
    assert sdxl.describe()["max_steps"] == 50 and sdxl.describe()["allowed_n"] == [1, 2, 4, 8]


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


async def first_step(stream) -> None:
    """Consume a stream until its pipeline call has run a step: the model is busy."""
    async for event in stream:
        if isinstance(event, SDXLProgress):
            return


def test_a_lone_request_runs_at_once_and_the_next_ones_collect_while_it_runs(sdxl, run):
    async def go():
        busy = sdxl.generate_stream(SDXLRequest(prompt="long", steps=12, seed=1, width=64, height=64))
        await first_step(busy)
        # Arrivals while the model is busy wait for it, then run as one call, oldest first; an
        # incompatible one (another size) runs in the call after.
        later = [asyncio.ensure_future(sdxl.generate(SDXLRequest(prompt=f"p{i}", n=n, seed=i, width=w, height=w)))
                 for i, (n, w) in enumerate([(2, 64), (1, 32), (4, 64)])]
        first = [event async for event in busy][-1]
        return first, await asyncio.gather(*later)

    first, (a, small, c) = run(go())
    assert first.batch_images == 1  # it found the model idle and did not wait for company
    assert (a.batch_images, c.batch_images, small.batch_images) == (6, 6, 1)
    assert Image.open(io.BytesIO(small.images[0].png)).size == (32, 32)


def test_no_negative_prompt_is_encoded_when_none_was_given(sdxl, run, monkeypatch):
    seen = []
    encode = sdxl.pipe.encode_prompt

    def spy(*args, **kwargs):
        seen.append(kwargs.get("negative_prompt"))
        return encode(*args, **kwargs)

    monkeypatch.setattr(sdxl.pipe, "encode_prompt", spy)
    plain = run(sdxl.generate(SDXLRequest(prompt="x", seed=3, width=64, height=64)))
    with_negative = run(sdxl.generate(SDXLRequest(prompt="x", seed=3, width=64, height=64, negative_prompt="blur")))
    assert seen == [None, ["blur"]]
    assert plain.negative_prompt == "" and with_negative.negative_prompt == "blur"
    assert plain.images[0].png != with_negative.images[0].png


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


def test_a_caller_that_goes_away_stops_the_pipeline_at_the_next_step(sdxl, run):
    """A job cancel reaches the replica as the cancel of its handle call (graphs/pipelines.py
    drain_stream), a hang-up as the cancel of the HTTP request's: no storage read per step."""
    async def go():
        stream = sdxl.generate_stream(SDXLRequest(prompt="x", steps=40, width=64, height=64))
        await first_step(stream)
        await stream.aclose()  # the caller is gone
        # the call ends well before its 40 steps, interrupted by the step callback
        await asyncio.to_thread(sdxl.adapters.pipe_lock.acquire)
        sdxl.adapters.pipe_lock.release()
        return sdxl.pipe.interrupt

    assert run(go()) is True
    # and the next request is unaffected
    assert len(run(sdxl.generate(SDXLRequest(prompt="after", width=64, height=64))).images) == 1


def test_a_waiting_request_whose_caller_goes_away_never_runs(sdxl, run):
    async def go():
        busy = sdxl.generate_stream(SDXLRequest(prompt="long", steps=12, width=64, height=64))
        await first_step(busy)
        gone = asyncio.ensure_future(sdxl.generate(SDXLRequest(prompt="gone", width=64, height=64)))
        while sdxl.batcher.queued == 0:  # until it waits behind the busy call
            await asyncio.sleep(0.01)
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        assert sdxl.batcher.queued == 0
        sizes_before = len(sdxl.batcher.batch_sizes)
        [event async for event in busy]
        return len(sdxl.batcher.batch_sizes) - sizes_before

    assert run(go()) == 0  # no call ran after the busy one


def test_a_failed_call_does_not_poison_the_next(sdxl, run, monkeypatch):
    calls = []
    real = sdxl._run_group_locked

    def flaky(group, beat=lambda: None):
        calls.append(len(group))
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory")
        return real(group, beat)

    monkeypatch.setattr(sdxl, "_run_group_locked", flaky)
    with pytest.raises(RuntimeError, match="out of memory"):
        run(sdxl.generate(SDXLRequest(prompt="x", width=64, height=64)))
    assert len(run(sdxl.generate(SDXLRequest(prompt="y", width=64, height=64))).images) == 1
