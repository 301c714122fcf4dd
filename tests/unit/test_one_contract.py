"""One contract per model: the API, a workflow node and the deployment refuse the same bad input
with the same message.

Each model's `check()` (deployments/<model>/contract.py) is the only place its limits are
enforced. Here the app is built as the ingress builds it: the typed app args, the models' Limits
derived from them once (`api.app.model_limits`), and every API service (`api.services.build_services`)
over handles that must never be reached, a tmp storage and a fake queue. The deployments are the
real classes on the tiny random-weight models, built from the same config sections. Then one bad
input per case goes through:

- the API service (images: `ImagesService.sdxl_request`; videos: `VideosService.create`;
  upscale: `UpscaleService.checked`): an InvalidRequestError;
- workflow validation (`WorkflowsService.check`): one issue on the node, its field prefixed
  (`params.steps`, `inputs.image`);
- the deployment's own entry point (`generate` / `upscale`): an InvalidRequestError;

and all three must carry the same message, and the same field.

"""

from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from PIL import Image

from api.app import AtelierArgs, model_limits
from api.images.protocol import ImageGenerationRequest, ImageUpscaleRequest
from api.services import Services, build_services
from api.videos.protocol import VideoCreateRequest
from deployments.errors import InvalidRequestError
from deployments.sdxl import contract as sdxl_contract
from deployments.sdxl.contract import SDXLLimits, SDXLRequest
from deployments.sdxl.deployment import SDXLDeployment
from deployments.svd import contract as svd_contract
from deployments.svd.contract import SVDLimits, SVDRequest
from deployments.svd.deployment import SVDDeployment
from deployments.upscaler import contract as upscaler_contract
from deployments.upscaler.contract import UpscaleMedia, UpscaleRequest, UpscalerLimits
from deployments.upscaler.deployment import UpscalerDeployment
from local.tiny_models import ensure_tiny_models
from tests.keyed_app import Unreachable  # a model handle the API must not reach

REPO = Path(__file__).resolve().parents[2]
BASE_URL = "http://testserver/"
PROMPT = "a red kite over the sea"

# The model sections of the app's args. The deployments are built from these same sections, as
# the app builder binds them; the tiny SVD's UNet makes 4 frames, the tiny upscaler's
# model_index.json sets max_noise_level 350, and its VAE scales x4.
SDXL = {"default_size": 64, "min_size": 32, "max_size": 256, "default_steps": 2, "max_steps": 50,
        "torch_num_threads": 1}
SVD = {"default_width": 64, "default_height": 64, "min_size": 32, "max_size": 256, "default_steps": 2,
       "max_steps": 50, "max_fps": 30, "torch_num_threads": 1}
UPSCALER = {"min_input_size": 16, "max_input_size": 256, "tile_size": 32, "tile_overlap": 8, "max_frames": 6,
            "default_steps": 2, "max_steps": 50, "max_batch_images": 4, "torch_num_threads": 1}

LIMITS_CLS = {"sdxl": SDXLLimits, "svd": SVDLimits, "upscaler": UpscalerLimits}
DEPLOYMENT_CLS = {"sdxl": SDXLDeployment, "svd": SVDDeployment, "upscaler": UpscalerDeployment}


# --- the app, built once per module ---------------------------------------------------------------


class FakeQueue:
    def enqueue_task_sync(self, name, kwargs, task_id, **options):
        raise AssertionError("the API enqueued a job for a bad input")


def png(width: int, height: int) -> bytes:
    pixels = (np.random.default_rng(0).random((height, width, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


GOOD_IMAGE = png(64, 64)  # fits SDXL, SVD and the upscaler
WIDE_IMAGE = png(300, 20)  # 300 > the upscaler's max_input_size
IMAGE_KEYS = {GOOD_IMAGE: "outputs/one-contract/good.png", WIDE_IMAGE: "outputs/one-contract/wide.png"}


@pytest.fixture(scope="module")
def loop():
    with asyncio.Runner() as runner:
        yield runner


@pytest.fixture(scope="module")
def args(tmp_path_factory):
    tiny = ensure_tiny_models(REPO / "models" / "tiny")
    return AtelierArgs.model_validate({
        "storage_root": str(tmp_path_factory.mktemp("storage")),
        "queue": {"broker_url": "memory://", "backend_url": "cache+memory://"},
        "ingress": {},
        "sdxl": {"model": str(tiny["sdxl"]), **SDXL},
        "svd": {"model": str(tiny["svd"]), **SVD},
        "upscaler": {"model": str(tiny["upscaler"]), **UPSCALER},
    })


@pytest.fixture(scope="module")
def limits(args) -> dict[str, Any]:
    """Each model's Limits, derived from its section once, as build_app hands them to the ingress."""
    return model_limits(args)


@pytest.fixture(scope="module")
def services(args, limits) -> Services:
    handles = {name: Unreachable(name) for name in limits}
    built = build_services(args.ingress, handles, limits, queue=FakeQueue())
    for data, key in IMAGE_KEYS.items():  # what a workflow's image nodes name
        built.workflows.storage.put_bytes(key, data)
    return built


@pytest.fixture(scope="module")
def deployments(args) -> dict[str, Any]:
    """The real deployment classes on the tiny models, without Ray Serve, from the same sections."""
    return {name: cls.func_or_class(getattr(args, name)) for name, cls in DEPLOYMENT_CLS.items()}


# --- the three layers -------------------------------------------------------------------------------


def node(id: str, type: str, **params: Any) -> dict[str, Any]:
    return {"id": id, "type": type, "params": params}


def edge(src: str, dst: str) -> dict[str, str]:
    (s, sp), (t, tp) = src.split("."), dst.split(".")
    return {"source": s, "source_port": sp, "target": t, "target_port": tp}


@dataclass(frozen=True)
class Case:
    """One bad input, as each layer takes it."""

    id: str
    model: str
    field: str  # the field every layer names (a workflow prefixes it)
    message: str  # what every layer says
    contract_request: Callable[[], Any]  # the model's request, as check() takes it
    api: Callable[[Services], Any]  # a coroutine that must raise InvalidRequestError
    workflow: Callable[[], dict[str, Any]]  # the workflow document, the bad node is "bad"
    deployment: Callable[[Any], Any]  # a coroutine on the deployment that must raise
    media: UpscaleMedia | None = None  # the input's size, for the upscaler's check


def sdxl_case(id: str, field: str, message: str, *, size: str | None = None, **fields: Any) -> Case:
    width, height = map(int, size.split("x")) if size else (None, None)
    body = {"prompt": PROMPT, **({"size": size} if size else {}), **fields}
    return Case(
        id=id, model="sdxl", field=field, message=message,
        contract_request=lambda: SDXLRequest(prompt=PROMPT, width=width, height=height, **fields),
        api=lambda s: s.images.sdxl_request(ImageGenerationRequest(**body), mode="text_to_image"),
        workflow=lambda: {
            "nodes": [node("p", "prompt", text=PROMPT),
                      node("bad", "text_to_image", **({"size": size} if size else {}), **fields),
                      node("o", "output")],
            "edges": [edge("p.text", "bad.prompt"), edge("bad.images", "o.value")]},
        deployment=lambda d: d.generate(SDXLRequest(prompt=PROMPT, width=width, height=height, **fields)),
    )


def svd_case(id: str, field: str, message: str, *, size: str | None = None, **fields: Any) -> Case:
    width, height = map(int, size.split("x")) if size else (None, None)
    body = {**({"size": size} if size else {}), **fields}
    return Case(
        id=id, model="svd", field=field, message=message,
        contract_request=lambda: SVDRequest(width=width, height=height, **fields),
        api=lambda s: s.videos.create(VideoCreateRequest(**body), GOOD_IMAGE, BASE_URL),  # image-to-video
        workflow=lambda: {
            "nodes": [node("img", "image", key=IMAGE_KEYS[GOOD_IMAGE]),
                      node("bad", "image_to_video", **({"size": size} if size else {}), **fields),
                      node("o", "output")],
            "edges": [edge("img.image", "bad.image"), edge("bad.video", "o.value")]},
        deployment=lambda d: d.generate(SVDRequest(image=GOOD_IMAGE, width=width, height=height, **fields)),
    )


def upscaler_case(id: str, field: str, message: str, *, image: bytes = GOOD_IMAGE, **fields: Any) -> Case:
    size = Image.open(io.BytesIO(image)).size
    return Case(
        id=id, model="upscaler", field=field, message=message,
        contract_request=lambda: UpscaleRequest(**fields),
        media=UpscaleMedia(width=size[0], height=size[1]),
        api=lambda s: s.upscale.checked(ImageUpscaleRequest(**fields), image),  # the multipart file `image`
        workflow=lambda: {
            "nodes": [node("img", "image", key=IMAGE_KEYS[image]), node("bad", "upscale", **fields),
                      node("o", "output")],
            "edges": [edge("img.image", "bad.image"), edge("bad.image", "o.value")]},
        deployment=lambda d: d.upscale(UpscaleRequest(image=image, **fields)),
    )


CASES = [
    sdxl_case("sdxl-steps-over-max", "steps", "steps must be at most 50; got 51", steps=51),
    sdxl_case("sdxl-size-over-max", "size", "size sides must be between 32 and 256 pixels; got 512x512",
              size="512x512"),
    sdxl_case("sdxl-size-under-min", "size", "size sides must be between 32 and 256 pixels; got 16x16",
              size="16x16"),
    sdxl_case("sdxl-size-not-multiple-of-8", "size", "size sides must be multiples of 8; got 60x64", size="60x64"),
    sdxl_case("sdxl-steps-over-any-fixed-cap", "steps", "steps must be at most 50; got 201", steps=201),
    svd_case("svd-num-frames-over-max", "num_frames", "num_frames must be between 1 and 4; got 5", num_frames=5),
    svd_case("svd-fps-over-max", "fps", "fps must be between 1 and 30; got 45", fps=45),
    svd_case("svd-steps-over-max", "steps", "steps must be at most 50; got 51", steps=51),
    svd_case("svd-size-over-max", "size", "size sides must be between 32 and 256 pixels; got 512x512",
             size="512x512"),
    svd_case("svd-fps-over-any-fixed-cap", "fps", "fps must be between 1 and 30; got 61", fps=61),
    svd_case("svd-fps-zero", "fps", "fps must be between 1 and 30; got 0", fps=0),
    svd_case("svd-num-frames-over-any-fixed-cap", "num_frames",
             "num_frames must be between 1 and 4; got 65", num_frames=65),
    upscaler_case("upscaler-steps-over-max", "steps", "steps must be at most 50; got 51", steps=51),
    upscaler_case("upscaler-noise-level-over-max", "noise_level",
                  "noise_level must be at most 350; got 351", noise_level=351),
    upscaler_case("upscaler-input-too-large", "image",
                  "image is 300x20; each side must be between 16 and 256 pixels to upscale "
                  "(the output is 4x each side)", image=WIDE_IMAGE),
]
CHECK = {"sdxl": lambda c, limits: sdxl_contract.check(c.contract_request(), limits),
         "svd": lambda c, limits: svd_contract.check(c.contract_request(), limits),
         "upscaler": lambda c, limits: upscaler_contract.check(c.contract_request(), limits, c.media)}


def case_id(case: Any) -> str:
    return case.id if isinstance(case, Case) else str(case)


def refusal(loop, coroutine) -> tuple[str, str]:
    with pytest.raises(InvalidRequestError) as raised:
        loop.run(coroutine)
    return raised.value.param, raised.value.message


def workflow_refusal(loop, services: Services, doc: dict[str, Any]) -> tuple[str, str]:
    report, workflow = loop.run(services.workflows.check(doc))
    assert workflow is None and not report.valid, "the workflow was accepted"
    issues = [(e.node, e.field, e.message) for e in report.errors]
    assert len(issues) == 1 and issues[0][0] == "bad", issues  # the bad node, and nothing else
    return issues[0][1], issues[0][2]


# --- the tests -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_api_workflow_and_deployment_refuse_the_same_input_with_the_same_message(
        case: Case, loop, services, deployments, limits):
    # What the contract itself says, against the limits the app was built with.
    with pytest.raises(InvalidRequestError) as by_contract:
        CHECK[case.model](case, limits[case.model])
    assert (by_contract.value.param, by_contract.value.message) == (case.field, case.message)

    api = refusal(loop, case.api(services))
    workflow_field, workflow_message = workflow_refusal(loop, services, case.workflow())
    deployment = refusal(loop, case.deployment(deployments[case.model]))

    by_layer = {"api": api, "workflow": (workflow_field, workflow_message), "deployment": deployment}
    assert {layer: message for layer, (_, message) in by_layer.items()} == dict.fromkeys(by_layer, case.message)
    assert api[0] == deployment[0] == case.field, by_layer
    assert workflow_field.rpartition(".")[2] == case.field and workflow_field.count(".") == 1, by_layer


@pytest.mark.parametrize("name", list(LIMITS_CLS))
def test_every_layer_holds_limits_built_by_from_config_from_the_same_section(name, args, limits, services,
                                                                            deployments):
    expected = LIMITS_CLS[name].from_config(getattr(args, name))
    api = services.models.limits_of(name)  # what the images, videos and upscale services read
    workflow = services.workflows.models.limits_of(name)  # what workflow validation reads
    deployment = deployments[name].limits
    assert type(api) is type(workflow) is type(deployment) is LIMITS_CLS[name]
    assert api is limits[name] and workflow is api  # one object, derived once when the app was built
    assert deployment == api == expected  # the deployment's own, from the same section (and its weights)
    assert deployments[name].describe() == api.describe()
    if name == "sdxl":
        assert services.images.limits is api
