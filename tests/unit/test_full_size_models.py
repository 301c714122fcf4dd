"""The full-size architectures benchmarks/gpu_check.py builds on a GPU are the released models': built
here on the meta device (no memory, no weights), their parameter counts are the published ones."""

from __future__ import annotations

import json

import pytest
import torch

from local.tiny_models import PIPELINES, write_llm_folder

# Parameter counts of the released checkpoints' modules.
RELEASED = {
    ("sdxl", "unet"): 2_567_463_684,  # stabilityai/stable-diffusion-xl-base-1.0
    ("sdxl", "vae"): 83_653_863,
    ("sdxl", "text_encoder"): 123_060_480,  # CLIP ViT-L/14 text
    ("sdxl", "text_encoder_2"): 694_659_840,  # OpenCLIP ViT-bigG/14 text, with projection
    ("svd", "unet"): 1_524_623_082,  # stabilityai/stable-video-diffusion-img2vid-xt
    ("svd", "image_encoder"): 632_076_800,  # OpenCLIP ViT-H/14 vision, with projection
    ("upscaler", "text_encoder"): 340_387_840,  # OpenCLIP ViT-H/14 text, 23 layers
}


@pytest.fixture(scope="module")
def full():
    return {name: build(scale="full", device="meta", dtype=torch.bfloat16) for name, build in PIPELINES.items()}


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("model, component", RELEASED)
def test_full_size_components_have_the_released_parameter_counts(full, model, component):
    module = getattr(full[model], component)
    assert count(module) == RELEASED[(model, component)]
    assert {p.dtype for p in module.parameters()} == {torch.bfloat16}


def test_full_size_pipelines_take_the_released_sizes(full):
    assert full["sdxl"].unet.config.sample_size * full["sdxl"].vae_scale_factor == 1024
    assert full["svd"].unet.config.num_frames == 25
    assert full["upscaler"].vae_scale_factor == 4 and full["upscaler"].config.max_noise_level == 350
    assert 470e6 < count(full["upscaler"].unet) < 480e6  # the x4 upscaler's UNet: 473 M


def test_the_language_model_folder_is_gemma_2_2b_without_weights(tmp_path):
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

    folder = write_llm_folder(tmp_path / "gemma2", "full")
    assert not list(folder.glob("*.safetensors"))  # vLLM makes the weights (load_format dummy)
    config = Gemma2Config.from_pretrained(folder)
    with torch.device("meta"):
        model = Gemma2ForCausalLM(config)
    assert count(model) == 2_614_341_888  # google/gemma-2-2b-it
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert len(tokenizer) == config.vocab_size == 256_000
    assert isinstance(tokenizer.decode([255_999, 70_000, 5]), str)  # every id the model can sample decodes
    assert tokenizer.decode(tokenizer("a fox who paints").input_ids, skip_special_tokens=True) == "a fox who paints"
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["Gemma2ForCausalLM"]
