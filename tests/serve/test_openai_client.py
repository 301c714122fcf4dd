"""The official openai client against the images endpoints."""

from __future__ import annotations

import base64
import io

import openai
import pytest
from PIL import Image

from tests.serve.helpers import noise_image

pytestmark = pytest.mark.serve


@pytest.fixture()
def oai(atelier):
    return openai.OpenAI(base_url=f"{atelier.base_url}/v1", api_key="unused-locally", max_retries=0)


def test_images_generate(oai):
    result = oai.images.generate(model="sdxl", prompt="a paper boat", n=4, size="64x64",
                                 response_format="b64_json", extra_body={"seed": 5, "steps": 2})
    assert len(result.data) == 4
    for item in result.data:
        image = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
        assert image.size == (64, 64) and image.format == "PNG"


def test_images_generate_url(oai):
    result = oai.images.generate(model="sdxl", prompt="a paper boat", size="64x64", extra_body={"steps": 1})
    assert result.data[0].url.endswith(".png")


def test_images_edit(oai):
    result = oai.images.edit(image=("in.png", noise_image(64, 64), "image/png"), prompt="watercolor", n=2,
                             response_format="b64_json", extra_body={"steps": 2, "seed": 1})
    assert len(result.data) == 2


def test_bad_request_raises_the_typed_error(oai):
    with pytest.raises(openai.BadRequestError) as raised:
        oai.images.generate(model="sdxl", prompt="x", n=3, size="64x64")
    assert raised.value.status_code == 400
    assert raised.value.body["param"] == "n"
