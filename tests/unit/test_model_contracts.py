"""The model contracts (SVD, upscaler, LLM): each `check` refuses bad input naming the field, with
the message the API has always given, and lets good input through. No model is loaded: the
limits come from configs, with what the weights decide given as the deployments give it."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from deployments.errors import InvalidRequestError
from deployments.llm import contract as llm
from deployments.svd import contract as svd
from deployments.upscaler import contract as upscaler

REPO = Path(__file__).resolve().parents[2]

SVD_CONFIG = {"model": "svd-folder", "default_width": 64, "default_height": 64, "min_size": 32, "max_size": 256,
              "min_fps": 1, "max_fps": 30, "default_steps": 3, "max_steps": 50}
UPSCALER_CONFIG = {"model": "upscaler-folder", "min_input_size": 16, "max_input_size": 256, "tile_size": 30,
                   "tile_overlap": 8, "max_steps": 50, "default_steps": 2, "max_frames": 6}


@pytest.fixture
def svd_limits() -> svd.SVDLimits:
    return svd.SVDLimits.from_config(SVD_CONFIG, unet_num_frames=14)


@pytest.fixture
def upscaler_limits() -> upscaler.UpscalerLimits:
    return upscaler.UpscalerLimits.from_config(UPSCALER_CONFIG, scale=4, max_noise_level=250)


def refused(check, *args, **kwargs) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as raised:
        check(*args, **kwargs)
    return raised.value


# --- contracts stay light ------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["deployments/svd/contract.py", "deployments/upscaler/contract.py",
                                  "deployments/llm/contract.py", "deployments/limits.py"])
def test_contracts_import_no_torch_diffusers_or_vllm(path):
    """Anywhere in the module, as import-linter counts them (lint-imports checks the chains)."""
    tree = ast.parse((REPO / path).read_text())
    nodes = list(ast.walk(tree))
    names = [alias.name for node in nodes if isinstance(node, ast.Import) for alias in node.names]
    names += [node.module for node in nodes if isinstance(node, ast.ImportFrom) and node.module]
    heavy = [n for n in names if n.split(".")[0] in ("torch", "diffusers", "vllm", "transformers")]
    assert heavy == [], path


# --- SVD -----------------------------------------------------------------------------------------


def test_svd_limits_take_the_frame_limit_from_the_unet_unless_the_config_sets_one():
    assert svd.SVDLimits.from_config(SVD_CONFIG, unet_num_frames=14).max_num_frames == 14
    assert svd.SVDLimits.from_config(SVD_CONFIG, unet_num_frames=14).default_num_frames == 14
    limits = svd.SVDLimits.from_config({**SVD_CONFIG, "max_num_frames": 8, "default_num_frames": 20},
                                       unet_num_frames=14)
    assert (limits.max_num_frames, limits.default_num_frames) == (8, 8)


def test_svd_limits_read_the_unets_frames_from_a_model_folder(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"num_frames": 25}))
    assert svd.SVDLimits.from_config({**SVD_CONFIG, "model": str(tmp_path)}).max_num_frames == 25
    with pytest.raises(ValueError, match="max_num_frames"):
        svd.SVDLimits.from_config({**SVD_CONFIG, "model": str(tmp_path / "missing")})


def test_svd_describe_is_every_limit_and_round_trips(svd_limits):
    described = svd_limits.describe()
    assert described["motion_bucket_id"] == [0, 255] and described["size_multiple"] == 8
    assert svd.SVDLimits.model_validate(described) == svd_limits


@pytest.mark.parametrize("fields", [
    {},
    {"num_frames": 14, "fps": 30, "steps": 50, "width": 256, "height": 32},
    {"num_frames": 1, "fps": 1},
    {"seconds": 2, "fps": 7},  # 14 frames
    {"seconds": 100, "num_frames": 3},  # num_frames wins over seconds
    {"min_guidance_scale": 2.0, "max_guidance_scale": 2.0},
    {"model": "svd"},
])
def test_svd_check_passes_good_requests(svd_limits, fields):
    svd.check(svd.SVDRequest(**fields), svd_limits)


@pytest.mark.parametrize("fields, param, message", [
    ({"model": "sora"}, "model", "unknown model 'sora'; available: ['svd']"),
    ({"fps": 0}, "fps", "fps must be between 1 and 30; got 0"),
    ({"fps": 31}, "fps", "fps must be between 1 and 30; got 31"),
    ({"num_frames": 0}, "num_frames", "num_frames must be between 1 and 14; got 0"),
    ({"num_frames": 15}, "num_frames", "num_frames must be between 1 and 14; got 15"),
    ({"seconds": 3, "fps": 7}, "seconds",
     "seconds=3 at 7 fps is 21 frames; the model makes 1 to 14 frames (at most 2.00 s at this fps; lower fps "
     "for longer clips)"),
    ({"seconds": 1e-9}, "seconds",
     "seconds=1e-09 at 7 fps is 0 frames; the model makes 1 to 14 frames (at most 2.00 s at this fps; lower "
     "fps for longer clips)"),
    ({"seconds": float("inf")}, "seconds",
     "seconds=inf at 7 fps is too many frames; the model makes 1 to 14 frames (at most 2.00 s at this fps; "
     "lower fps for longer clips)"),
    ({"steps": 51}, "steps", "steps must be at most 50; got 51"),
    ({"min_guidance_scale": 3.0, "max_guidance_scale": 2.0}, "min_guidance_scale",
     "min_guidance_scale (3.0) must not exceed max_guidance_scale (2.0)"),
    ({"width": 60, "height": 64}, "size", "size sides must be multiples of 8; got 60x64"),
    ({"width": 512, "height": 512}, "size", "size sides must be between 32 and 256 pixels; got 512x512"),
    ({"fps": 0, "num_frames": 99}, "fps", "fps must be between 1 and 30; got 0"),  # the API's order: fps first
])
def test_svd_check_refuses_naming_the_field(svd_limits, fields, param, message):
    error = refused(svd.check, svd.SVDRequest(**fields), svd_limits)
    assert (error.param, error.message) == (param, message)


def test_svd_defaults_fill_what_a_request_leaves(svd_limits):
    request = svd.SVDRequest(seconds=1, fps=6)
    assert svd.num_frames_of(request, svd_limits) == 6 and svd.fps_of(request, svd_limits) == 6
    empty = svd.SVDRequest()
    assert svd.num_frames_of(empty, svd_limits) == 14 and svd.steps_of(empty, svd_limits) == 3
    assert svd.size_of(empty, svd_limits) == (64, 64) and svd.guidance_of(empty, svd_limits) == (1.0, 3.0)


def test_svd_request_dump_keeps_the_checked_only_fields_out():
    """A job's stored payload stays as it was: `model` and `seconds` are checked, never stored."""
    dumped = svd.SVDRequest(model="svd", seconds=2, num_frames=14).model_dump()
    assert "model" not in dumped and "seconds" not in dumped and dumped["num_frames"] == 14


# --- upscaler -------------------------------------------------------------------------------------


def test_upscaler_limits_round_the_tile_to_the_scale(upscaler_limits):
    assert (upscaler_limits.scale, upscaler_limits.tile_size, upscaler_limits.max_noise_level) == (4, 28, 250)
    assert upscaler_limits.max_input_pixels == 256 * 256
    assert upscaler.UpscalerLimits.model_validate(upscaler_limits.describe()) == upscaler_limits


def test_upscaler_limits_read_the_scale_and_noise_levels_from_a_model_folder(tmp_path):
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [32, 32, 64]}))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionUpscalePipeline"}))
    limits = upscaler.UpscalerLimits.from_config({**UPSCALER_CONFIG, "model": str(tmp_path)})
    assert (limits.scale, limits.max_noise_level) == (4, upscaler.DEFAULT_MAX_NOISE_LEVEL)
    (tmp_path / "model_index.json").write_text(json.dumps({"max_noise_level": 300}))
    assert upscaler.UpscalerLimits.from_config({**UPSCALER_CONFIG, "model": str(tmp_path)}).max_noise_level == 300
    with pytest.raises(ValueError, match="upscale factor"):
        upscaler.UpscalerLimits.from_config({**UPSCALER_CONFIG, "model": str(tmp_path / "missing")})


@pytest.mark.parametrize("fields, media", [
    ({}, None),
    ({"steps": 50, "noise_level": 250, "model": "upscaler"}, None),
    ({}, upscaler.UpscaleMedia(width=16, height=256)),
    ({}, upscaler.UpscaleMedia(width=64, height=64, num_frames=6, param="video", what="video")),
])
def test_upscaler_check_passes_good_requests(upscaler_limits, fields, media):
    upscaler.check(upscaler.UpscaleRequest(**fields), upscaler_limits, media)


@pytest.mark.parametrize("fields, media, steps_param, param, message", [
    ({"model": "esrgan"}, None, "steps", "model", "unknown model 'esrgan'; available: ['upscaler']"),
    ({"steps": 51}, None, "steps", "steps", "steps must be at most 50; got 51"),
    ({"steps": 51}, None, "upscale_steps", "upscale_steps", "upscale_steps must be at most 50; got 51"),
    ({"noise_level": 251}, None, "steps", "noise_level", "noise_level must be at most 250; got 251"),
    ({}, upscaler.UpscaleMedia(width=8, height=32), "steps", "image",
     "image is 8x32; each side must be between 16 and 256 pixels to upscale (the output is 4x each side)"),
    ({}, upscaler.UpscaleMedia(width=300, height=20, param="image_key"), "steps", "image_key",
     "image is 300x20; each side must be between 16 and 256 pixels to upscale (the output is 4x each side)"),
    ({}, upscaler.UpscaleMedia(width=512, height=512, param="upscale_video", what="the video"), "steps",
     "upscale_video",
     "the video is 512x512; each side must be between 16 and 256 pixels to upscale (the output is 4x each side)"),
    ({}, upscaler.UpscaleMedia(width=64, height=64, num_frames=7, param="upscale", what="the video"), "steps",
     "upscale", "the video has 7 frames; the upscaler takes at most 6"),
    ({}, upscaler.UpscaleMedia(width=512, height=64, param="inputs.image", what="the input image"), "steps",
     "inputs.image", "the input image is 512x64; each side must be between 16 and 256 pixels to upscale "
                     "(the output is 4x each side)"),
])
def test_upscaler_check_refuses_naming_the_field(upscaler_limits, fields, media, steps_param, param, message):
    error = refused(upscaler.check, upscaler.UpscaleRequest(**fields), upscaler_limits, media,
                    steps_param=steps_param)
    assert (error.param, error.message) == (param, message)


def test_upscaler_defaults_fill_what_a_request_leaves(upscaler_limits):
    empty = upscaler.UpscaleRequest()
    assert upscaler.steps_of(empty, upscaler_limits) == 2 and upscaler.noise_level_of(empty, upscaler_limits) == 20
    assert upscaler.noise_level_of(upscaler.UpscaleRequest(noise_level=0), upscaler_limits) == 0
    assert "model" not in upscaler.UpscaleRequest(model="upscaler").model_dump()


# --- LLM ------------------------------------------------------------------------------------------


def test_gemma_limits_are_what_the_ingress_reads():
    config = llm.GemmaConfig(model_id="gemma", model_source="google/gemma-2-2b-it", max_model_len=4096)
    limits = llm.GemmaLimits.from_config(config)
    assert config.describe() == limits.describe() == {"model": "gemma", "source": "google/gemma-2-2b-it",
                                                      "max_model_len": 4096}
    assert llm.GemmaLimits.model_validate(config.describe()) == limits


@pytest.mark.parametrize("max_tokens", [None, 1, 512])
def test_max_tokens_within_the_context_pass(max_tokens):
    llm.check_max_tokens(max_tokens, llm.GemmaLimits(model="gemma", source="m", max_model_len=512))


def test_max_tokens_beyond_the_context_are_refused():
    error = refused(llm.check_max_tokens, 513, llm.GemmaLimits(model="gemma", source="m", max_model_len=512))
    assert (error.param, error.message) == ("max_tokens", "max_tokens must be at most the context length 512; "
                                                          "got 513")


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
    [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}],
])
def test_good_messages_pass(messages):
    llm.check_messages(messages)


@pytest.mark.parametrize("messages, param, message", [
    ([], "messages", "messages must contain at least one message"),
    ([{"role": "robot", "content": "x"}], "messages.0.role",
     "messages[0].role must be one of ['system', 'developer', 'user', 'assistant', 'tool']; got 'robot'"),
    ([{"role": "user", "content": "x"}, {"role": "user"}], "messages.1.content",
     "messages[1].content is required for a user message"),
    ([{"role": "assistant", "content": None}], "messages.0.content",
     "messages[0].content is required for a assistant message"),
])
def test_bad_messages_are_refused_naming_the_message(messages, param, message):
    error = refused(llm.check_messages, messages)
    assert (error.param, error.message) == (param, message)
