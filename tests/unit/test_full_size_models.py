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


def test_the_language_model_folder_is_gemma_3_4b_without_weights(tmp_path):
    from PIL import Image
    from transformers import AutoProcessor, Gemma3Config, Gemma3ForConditionalGeneration

    folder = write_llm_folder(tmp_path / "gemma3", "full")
    assert not list(folder.glob("*.safetensors"))  # vLLM makes the weights (load_format dummy)
    config = Gemma3Config.from_pretrained(folder)
    with torch.device("meta"):
        model = Gemma3ForConditionalGeneration(config)
    assert count(model) == 4_300_079_472  # google/gemma-3-4b-it
    assert count(model.model.vision_tower) == 416_866_032  # SigLIP so400m/14 at 896, without its head
    text = config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.sliding_window) == (2560, 34, 1024)
    assert text.layer_types.count("full_attention") == 34 // 6  # five sliding-window layers to one global
    assert text.rope_parameters["full_attention"] == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0}
    assert text.rope_parameters["sliding_attention"]["rope_theta"] == 10_000.0
    processor = AutoProcessor.from_pretrained(folder)
    tokenizer = processor.tokenizer
    assert len(tokenizer) == text.vocab_size == 262_208
    assert len(set(tokenizer.get_vocab().values())) == 262_208  # no id twice, none missing
    assert isinstance(tokenizer.decode([262_207, 255_999, 70_000, 5]), str)  # every id the model can sample decodes
    assert tokenizer.decode(tokenizer("a fox who paints").input_ids, skip_special_tokens=True) == "a fox who paints"
    inputs = processor(text="<start_of_image>What is this?", images=[Image.new("RGB", (300, 200))], return_tensors="pt")
    assert tuple(inputs.pixel_values.shape) == (1, 3, 896, 896)
    assert int((inputs.input_ids == config.image_token_index).sum()) == config.mm_tokens_per_image == 256
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["Gemma3ForConditionalGeneration"]
