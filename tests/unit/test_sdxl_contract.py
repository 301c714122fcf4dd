"""SDXL's one check: every limit refused with its field and message, a good request passes.

No model and no I/O: `check(request, limits)` is pure, so the API, workflow validation and the
deployment can all call it. That the contract loads no torch is import-linter's to hold
(pyproject.toml, `model-contracts`).
"""

from __future__ import annotations

import pytest

from deployments.errors import InvalidRequestError
from deployments.sdxl.contract import (ALLOWED_N, MAX_SEED, SDXLConfig, SDXLLimits, SDXLRequest, check,
                                       size_of, steps_of)
from deployments.styles import StylePreset, load_styles

STYLES = {
    "noir": StylePreset(prompt="noir photo of {prompt}", negative_prompt="color", steps=3, guidance_scale=6.0),
    "slow": StylePreset(prompt="{prompt}", steps=80),
}
CONFIG = SDXLConfig(model="models/tiny/sdxl", model_name="sdxl-tiny", default_size=64, min_size=32,
                    max_size=256, default_steps=2, max_steps=50, max_loras_per_replica=3)
LIMITS = SDXLLimits.from_config(CONFIG, STYLES)


def refused(**fields) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as raised:
        check(SDXLRequest(prompt="a fox", **fields), LIMITS)
    return raised.value


def test_limits_come_from_the_config():
    assert LIMITS.model_dump() == {
        "model": "sdxl-tiny", "source": "models/tiny/sdxl", "default_size": 64, "min_size": 32, "max_size": 256,
        "size_multiple": 8, "default_steps": 2, "max_steps": 50, "default_guidance_scale": 5.0,
        "allowed_n": ALLOWED_N, "max_seed": MAX_SEED, "styles": {k: v.model_dump() for k, v in STYLES.items()},
        "max_loras_per_replica": 3}
    assert LIMITS.max_input_pixels == 256 * 256


def test_limits_are_frozen():
    with pytest.raises(Exception):
        LIMITS.max_steps = 1000


def test_styles_default_to_the_configured_file():
    assert SDXLLimits.from_config(CONFIG).styles == load_styles(None)
    assert SDXLLimits.from_config(CONFIG.model_dump()).model == "sdxl-tiny"  # a dict config too


def test_describe_keeps_its_keys():
    info = LIMITS.describe()
    assert list(info) == ["model", "source", "default_size", "min_size", "max_size", "default_steps", "max_steps",
                          "default_guidance_scale", "allowed_n", "styles", "max_loras_per_replica"]
    assert info["allowed_n"] == [1, 2, 4, 8]
    assert info["styles"]["noir"] == STYLES["noir"].model_dump()


@pytest.mark.parametrize("fields", [
    {},
    {"model": "sdxl-tiny", "n": 8, "width": 256, "height": 32, "steps": 50, "style": "noir", "seed": MAX_SEED - 7},
    {"mode": "image_to_image", "steps": 2, "strength": 0.5},  # int(2 × 0.5) = 1 step left
    {"mode": "inpaint"},  # the size comes from the image: checked once it is known
    {"lora": "not-checked-here"},  # the registry is the API's to ask
])
def test_a_good_request_passes(fields):
    check(SDXLRequest(prompt="a fox", **fields), LIMITS)


@pytest.mark.parametrize("fields, param, message", [
    ({"model": "dall-e-3"}, "model", "unknown model 'dall-e-3'; available: ['sdxl-tiny']"),
    ({"style": "baroque"}, "style", "unknown style 'baroque'; known: ['noir', 'slow']"),
    ({"steps": 51}, "steps", "steps must be at most 50; got 51"),
    ({"style": "slow"}, "steps", "steps must be at most 50; got 80"),  # the style's steps count too
    ({"mode": "image_to_image", "steps": 1, "strength": 0.5}, "steps",
     "steps=1 at strength 0.5 leaves no denoising step (int(steps × strength) = 0); "
     "use at least 2 steps or a higher strength"),
    ({"mode": "inpaint", "strength": 0.3}, "steps",  # the default steps (2) at 0.3: none left
     "steps=2 at strength 0.3 leaves no denoising step (int(steps × strength) = 0); "
     "use at least 4 steps or a higher strength"),
    ({"seed": MAX_SEED, "n": 2}, "seed", f"seed + n - 1 must be at most {MAX_SEED}"),
    ({"width": 60, "height": 64}, "size", "size sides must be multiples of 8; got 60x64"),
    ({"width": 1024, "height": 1024}, "size", "size sides must be between 32 and 256 pixels; got 1024x1024"),
    ({"width": 16, "height": 64}, "size", "size sides must be between 32 and 256 pixels; got 16x64"),
    ({"mode": "image_to_image", "width": 512, "height": 512}, "size",
     "size sides must be between 32 and 256 pixels; got 512x512"),
])
def test_each_bad_input_is_refused_with_its_field_and_message(fields, param, message):
    error = refused(**fields)
    assert (error.param, error.message) == (param, message)


def test_n_outside_the_limits_is_refused():
    # SDXLRequest's type already holds n to ALLOWED_N; check() holds it to the limits as well.
    narrow = LIMITS.model_copy(update={"allowed_n": (1, 2)})
    with pytest.raises(InvalidRequestError) as raised:
        check(SDXLRequest(prompt="a fox", n=4), narrow)
    assert (raised.value.param, raised.value.message) == ("n", "n must be one of [1, 2]")


def test_a_default_size_outside_the_limits_is_refused():
    odd = LIMITS.model_copy(update={"default_size": 300})
    with pytest.raises(InvalidRequestError) as raised:
        check(SDXLRequest(prompt="a fox"), odd)
    assert raised.value.param == "size"


def test_the_first_problem_is_reported_in_a_fixed_order():
    error = refused(model="other", style="baroque", steps=99, width=7, height=7)
    assert error.param == "model"
    assert refused(style="baroque", steps=99, width=7, height=7).param == "style"
    assert refused(steps=99, width=7, height=7).param == "steps"


def test_steps_and_size_resolve_as_the_deployment_runs_them():
    assert steps_of(SDXLRequest(prompt="x"), LIMITS) == 2
    assert steps_of(SDXLRequest(prompt="x", style="noir"), LIMITS) == 3
    assert steps_of(SDXLRequest(prompt="x", style="noir", steps=7), LIMITS) == 7
    assert size_of(SDXLRequest(prompt="x"), LIMITS) == (64, 64)
    assert size_of(SDXLRequest(prompt="x", width=32, height=48), LIMITS) == (32, 48)
    assert size_of(SDXLRequest(prompt="x", width=32), LIMITS) == (64, 64)  # both sides or neither
    assert size_of(SDXLRequest(prompt="x", mode="image_to_image"), LIMITS) is None  # the image's


def test_the_model_a_caller_named_is_checked_but_never_stored():
    request = SDXLRequest(prompt="x", model="sdxl-tiny")
    assert "model" not in request.model_dump()
    assert "model" not in request.model_dump(mode="json")

