"""Tiny random-weight stand-ins for the four Atelier models.

Each builder writes a folder in the normal Hugging Face / diffusers layout with
`save_pretrained`, so the real `from_pretrained(path)` loading code runs against it
on a CPU machine with no hub access. Weights are random (images are noise, text is
gibberish) but deterministic: the same seed gives byte-identical safetensors files.

Usage:
    python -m local.tiny_models [--out models/tiny] [--seed 0] [--force]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Literal

import torch

MODEL_NAMES = ("sdxl", "svd", "upscaler", "gemma")

# Written last into a finished folder; a folder without it is treated as half-built.
COMPLETE_MARKER = ".complete"
# A builder whose output changed bumps its recipe here (the marker records it; absent means 1), so
# `make models` on an existing checkout rebuilds the folder. gemma: 1 was a text-only Gemma, 2 is
# Gemma 3 with its vision tower.
RECIPES = {"gemma": 2}

# Shared by every CLIP text encoder below: 256 byte chars x 2 (+ "</w>") + 2 specials.
CLIP_VOCAB_SIZE = 514


# ---------------------------------------------------------------------------
# Tokenizers, built in code (no downloads)
# ---------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode char map.

    Same table as transformers' `bytes_to_unicode`, copied here because transformers 5
    moved it out of `models.clip.tokenization_clip` (it now lives in
    `convert_slow_tokenizer`), and a private import path is not worth depending on.
    """
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    assert len(vocab) == CLIP_VOCAB_SIZE
    # transformers 5 ignores vocab_file/merges_file: pass the dict and list directly.
    # Without model_max_length the tokenizer thinks it is unbounded and prompts overflow
    # the 77 position embeddings.
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _clip_text_config(projection_dim: int):
    from transformers import CLIPTextConfig

    # Ids must match _clip_tokenizer(): CLIP pools at eos_token_id, and pads with eos.
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=5,
        layer_norm_eps=1e-05,
        hidden_act="gelu",
        projection_dim=projection_dim,
    )


GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
# Gemma 3's image markers: the chat template writes <start_of_image> where an image goes, and the
# processor (transformers' and vLLM's) expands it to "\n\n<start_of_image>" + <image_soft_token> x
# mm_tokens_per_image + "<end_of_image>\n\n".
GEMMA_IMAGE_SPECIALS = ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]
# Gemma's SentencePiece vocabulary has runs of newlines as single tokens, and vLLM's gemma3_mm looks
# these four up by text (it merges the "\n\n" around an image with its neighbours, as the tokenizer
# would). A byte-level BPE has no such entries, so they are added tokens here.
GEMMA_NEWLINES = ["\n", "\n\n", "\n\n\n", "\n\n\n\n"]

# Gemma 3's own template (image content parts become <start_of_image>), except that a system
# message, a string or text parts, is folded into the first user turn without the role alternation
# check, since OpenAI-style clients often send one.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% if messages[0]['content'] is string %}{% set ns.system = messages[0]['content'] | trim %}"
    "{% else %}{% for item in messages[0]['content'] %}{% if item['type'] == 'text' %}"
    "{% set ns.system = ns.system + item['text'] | trim %}{% endif %}{% endfor %}{% endif %}"
    "{% set ns.system = ns.system + '\n\n' %}{% set messages = messages[1:] %}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (ns.system if loop.first else '') }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# Enough varied text for a few hundred byte-level merges.
_GEMMA_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A photo of an astronaut riding a horse on the moon, highly detailed, 4k.",
    "Write a short poem about the sea, the wind and the lighthouse keeper.",
    "Hello! How are you today? I am fine, thank you for asking.",
    "Stable Diffusion XL generates images from text prompts in a few seconds.",
    "Upscale this picture four times and keep the fine details sharp.",
    "Turn the still image into a short video clip of twenty five frames.",
    "Summarize the following paragraph in one sentence, please.",
    "def main():\n    print('hello world')\n    return 0\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14 2.71 42",
    "user model assistant system prompt response question answer",
    "painting, watercolor, oil on canvas, cinematic lighting, portrait, landscape",
    "Ray Serve scales model deployments across replicas and nodes.",
    "Once upon a time there was a little cat who lived in a big old house.",
    "What is the capital of France? The capital of France is Paris.",
    "Explain how diffusion models remove noise step by step.",
]


def _gemma_tokenizer(vocab_size: int = 512):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    # Byte-level, so any input text (and any byte the model emits) round-trips.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        # ids 0..8: Gemma's order (pad=0, eos=1, bos=2), then the turn and image markers
        special_tokens=GEMMA_SPECIALS + GEMMA_IMAGE_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_GEMMA_CORPUS * 4, trainer=trainer)
    # Like Gemma: plain encode() prepends <bos>; the chat template writes its own, and
    # apply_chat_template encodes with add_special_tokens=False, so it is not doubled.
    bos_id = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos_id)]
    )
    tok.add_tokens([AddedToken(text, normalized=False, special=False) for text in GEMMA_NEWLINES])
    return _gemma_fast_tokenizer(tok, model_max_length=1024)


def _gemma_fast_tokenizer(tok, model_max_length: int):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=GEMMA_SPECIALS[4:] + GEMMA_IMAGE_SPECIALS,
        # Gemma3Processor reads these three by name (tokenizer.image_token, ...), as vLLM does.
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"},
        chat_template=GEMMA_CHAT_TEMPLATE,
        model_max_length=model_max_length,
        padding_side="left",  # decoder-only: batch generation needs left padding
    )


# ---------------------------------------------------------------------------
# Architectures: each model's tiny stand-in, and the released model's real dimensions
# ---------------------------------------------------------------------------
#
# "tiny" is what `make models` writes (random weights, seconds on a CPU). "full" is the released
# model's architecture, its dimensions copied from the model's own config files on the hub (named
# above each), written here because nothing may reach the hub: random weights at full size have the
# real compute cost, which is how benchmarks/gpu_check.py measures speed on a GPU.

Scale = Literal["tiny", "full"]
SCALES = ("tiny", "full")


def _clip_text_full(hidden: int, layers: int, heads: int, intermediate: int, act: str, projection_dim: int):
    from transformers import CLIPTextConfig

    # Ids as _clip_tokenizer()'s (CLIP pools at eos_token_id); the vocabulary stays CLIP's 49408.
    return CLIPTextConfig(vocab_size=49408, bos_token_id=512, eos_token_id=513, pad_token_id=513,
                          hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                          num_hidden_layers=layers, layer_norm_eps=1e-05, hidden_act=act, projection_dim=projection_dim,
                          max_position_embeddings=77)


SDXL_UNET: dict[str, dict[str, Any]] = {
    "tiny": dict(
        sample_size=32,  # latent size; x2 VAE scale factor -> 64x64 default images
        in_channels=4,  # 4-channel: the inpaint pipeline then blends latents itself
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,  # 6 time ids x 8 + pooled text (32)
        cross_attention_dim=64,  # both text encoders' hidden states concatenated (32 + 32)
        norm_num_groups=1,
    ),
    # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (2.57 B parameters)
    "full": dict(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(5, 10, 20),
        transformer_layers_per_block=(1, 2, 10),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_embed_type_num_heads=64,
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + pooled text (1280)
        cross_attention_dim=2048,  # 768 + 1280
        norm_num_groups=32,
    ),
}
SDXL_VAE: dict[str, dict[str, Any]] = {
    "tiny": dict(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                 down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                 latent_channels=4, sample_size=64,
                 force_upcast=False),  # the real SDXL VAE upcasts fp16; pointless on CPU fp32
    # stabilityai/stable-diffusion-xl-base-1.0 vae/config.json
    "full": dict(block_out_channels=[128, 256, 512, 512], in_channels=3, out_channels=3,
                 down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                 latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=1024,
                 scaling_factor=0.13025, force_upcast=True),
}
SVD_UNET: dict[str, dict[str, Any]] = {
    "tiny": dict(
        sample_size=32,  # x2 VAE scale factor -> 64x64 default frames
        in_channels=8,  # noisy latents + image latents
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=32,  # = image encoder projection_dim
        num_attention_heads=8,
        projection_class_embeddings_input_dim=96,  # 3 added time ids (fps, motion, noise) x 32
        addition_time_embed_dim=32,
        num_frames=4,  # only the pipeline's default num_frames
    ),
    # stabilityai/stable-video-diffusion-img2vid-xt unet/config.json (1.52 B parameters)
    "full": dict(
        sample_size=96,
        in_channels=8,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "CrossAttnDownBlockSpatioTemporal",
                          "CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal",
                        "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=1024,
        num_attention_heads=(5, 10, 20, 20),
        transformer_layers_per_block=1,
        projection_class_embeddings_input_dim=768,  # 3 added time ids x 256
        addition_time_embed_dim=256,
        num_frames=25,
    ),
}
SVD_VAE: dict[str, dict[str, Any]] = {
    "tiny": dict(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                 down_block_types=["DownEncoderBlock2D"] * 2, latent_channels=4, sample_size=64),
    # stabilityai/stable-video-diffusion-img2vid-xt vae/config.json
    "full": dict(block_out_channels=[128, 256, 512, 512], in_channels=3, out_channels=3,
                 down_block_types=["DownEncoderBlock2D"] * 4, latent_channels=4, layers_per_block=2,
                 sample_size=768, scaling_factor=0.18215, force_upcast=True),
}
# The pipeline always resizes the conditioning image to 224, so the vision encoder must take 224
# inputs; the tiny one's patch 32 keeps that to 49 patches.
SVD_IMAGE_ENCODER: dict[str, dict[str, Any]] = {
    "tiny": dict(image_size=224, patch_size=32, hidden_size=32, projection_dim=32, num_hidden_layers=5,
                 num_attention_heads=4, intermediate_size=37),
    # stabilityai/stable-video-diffusion-img2vid-xt image_encoder/config.json (OpenCLIP ViT-H/14)
    "full": dict(image_size=224, patch_size=14, hidden_size=1280, projection_dim=1024, num_hidden_layers=32,
                 num_attention_heads=16, intermediate_size=5120, hidden_act="gelu", layer_norm_eps=1e-05),
}
UPSCALER_UNET: dict[str, dict[str, Any]] = {
    "tiny": dict(
        sample_size=32,
        in_channels=7,  # 4 noisy latents + 3 low-res RGB channels
        out_channels=4,
        block_out_channels=(32, 32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        use_linear_projection=True,
        only_cross_attention=(True, True, False),
        num_class_embeds=100,  # noise level conditioning
    ),
    # stabilityai/stable-diffusion-x4-upscaler unet/config.json
    "full": dict(
        sample_size=128,
        in_channels=7,
        out_channels=4,
        block_out_channels=(256, 512, 512, 1024),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=1024,
        attention_head_dim=8,
        use_linear_projection=True,
        only_cross_attention=(True, True, True, False),
        num_class_embeds=1000,
        norm_num_groups=32,
    ),
}
UPSCALER_VAE: dict[str, dict[str, Any]] = {
    "tiny": dict(block_out_channels=[32, 32, 64],  # 3 blocks -> x4 scale factor
                 in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
                 up_block_types=["UpDecoderBlock2D"] * 3, latent_channels=4,
                 scaling_factor=0.08333),  # the upscaler's value; otherwise the pipeline warns and patches it
    # stabilityai/stable-diffusion-x4-upscaler vae/config.json
    "full": dict(block_out_channels=[128, 256, 512], in_channels=3, out_channels=3,
                 down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                 latent_channels=4, layers_per_block=2, norm_num_groups=32, sample_size=256, scaling_factor=0.08333),
}


def _sdxl_text_configs(scale: Scale):
    if scale == "tiny":
        return _clip_text_config(projection_dim=32), _clip_text_config(projection_dim=32)
    # stabilityai/stable-diffusion-xl-base-1.0 text_encoder/ (CLIP ViT-L/14) and text_encoder_2/ (OpenCLIP bigG/14)
    return (_clip_text_full(768, 12, 12, 3072, "quick_gelu", 768),
            _clip_text_full(1280, 32, 20, 5120, "gelu", 1280))


def _upscaler_text_config(scale: Scale):
    if scale == "tiny":
        return _clip_text_config(projection_dim=512)
    # stabilityai/stable-diffusion-x4-upscaler text_encoder/config.json (OpenCLIP ViT-H/14 text, 23 layers)
    return _clip_text_full(1024, 23, 16, 4096, "gelu", 512)


@contextlib.contextmanager
def on_device(device: str | torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Modules built inside are created on `device` in `dtype`, initialised there: no CPU copy.

    Only for modules: schedulers build their float32 tables on the CPU and stay outside."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _seeded(seed: int):
    """Re-seed before a component, so each one's weights do not depend on what was built before it."""
    torch.manual_seed(seed)  # also seeds every CUDA device


def _models(device: str | torch.device | None, dtype: torch.dtype | None):
    return on_device(device, dtype) if device is not None else contextlib.nullcontext()


def sdxl_pipeline(scale: Scale = "tiny", seed: int = 0, device=None, dtype=None):
    """A StableDiffusionXLPipeline with random weights, in memory. With `device` (and `dtype`) its
    models are built there; else on the CPU in float32."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    text_config, text_config_2 = _sdxl_text_configs(scale)
    with _models(device, dtype):
        _seeded(seed)
        unet = UNet2DConditionModel(**SDXL_UNET[scale])
        _seeded(seed)
        vae = AutoencoderKL(**SDXL_VAE[scale])
        _seeded(seed)
        text_encoder = CLIPTextModel(text_config)
        _seeded(seed)
        text_encoder_2 = CLIPTextModelWithProjection(text_config_2)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=_clip_tokenizer(),
        tokenizer_2=_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
    )


def svd_pipeline(scale: Scale = "tiny", seed: int = 0, device=None, dtype=None):
    """A StableVideoDiffusionPipeline with random weights, in memory (see `sdxl_pipeline`)."""
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    with _models(device, dtype):
        _seeded(seed)
        unet = UNetSpatioTemporalConditionModel(**SVD_UNET[scale])
        _seeded(seed)
        vae = AutoencoderKLTemporalDecoder(**SVD_VAE[scale])
        _seeded(seed)
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**SVD_IMAGE_ENCODER[scale]))
    feature_extractor = CLIPImageProcessor(crop_size=224, size=224)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        interpolation_type="linear",
        num_train_timesteps=1000,
        prediction_type="v_prediction",
        sigma_max=700.0,
        sigma_min=0.002,
        steps_offset=1,
        timestep_spacing="leading",
        timestep_type="continuous",
        use_karras_sigmas=True,
    )
    pipe = StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=image_encoder,
        unet=unet,
        scheduler=scheduler,
        feature_extractor=feature_extractor,
    )
    # Without torchvision, transformers 5 hands back CLIPImageProcessorPil and diffusers would
    # record that class in model_index.json; record the generic name so the folder loads with
    # whichever backend the loading environment has.
    pipe.register_to_config(feature_extractor=("transformers", "CLIPImageProcessor"))
    return pipe


def upscaler_pipeline(scale: Scale = "tiny", seed: int = 0, device=None, dtype=None):
    """A StableDiffusionUpscalePipeline with random weights, in memory (see `sdxl_pipeline`)."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionUpscalePipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel

    with _models(device, dtype):
        _seeded(seed)
        unet = UNet2DConditionModel(**UPSCALER_UNET[scale])
        _seeded(seed)
        vae = AutoencoderKL(**UPSCALER_VAE[scale])
        _seeded(seed)
        text_encoder = CLIPTextModel(_upscaler_text_config(scale))
    if scale == "tiny":
        low_res_scheduler, scheduler = DDPMScheduler(), DDIMScheduler(prediction_type="v_prediction")
    else:  # stabilityai/stable-diffusion-x4-upscaler low_res_scheduler/ and scheduler/
        low_res_scheduler = DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear",
                                          num_train_timesteps=1000)
        scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                  prediction_type="v_prediction", num_train_timesteps=1000)
    return StableDiffusionUpscalePipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_clip_tokenizer(),
        unet=unet,
        low_res_scheduler=low_res_scheduler,
        scheduler=scheduler,
        max_noise_level=350,
    )


PIPELINES = {"sdxl": sdxl_pipeline, "svd": svd_pipeline, "upscaler": upscaler_pipeline}


def build_pipeline(name: str, scale: Scale, device: str | torch.device, dtype: torch.dtype, seed: int = 0):
    """Model `name`'s pipeline with random weights at `scale`, its models built directly on `device`
    in `dtype` (no CPU copy, no download): what benchmarks/gpu_check.py measures. The caller's RNG
    state (CPU and CUDA) is left as it was."""
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        pipe = PIPELINES[name](scale, seed, device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------
# Builders: one plain function per model, writing the tiny stand-in's folder
# ---------------------------------------------------------------------------


def build_tiny_sdxl(path: str | Path, seed: int = 0) -> Path:
    """StableDiffusionXLPipeline folder; default output 64x64. Also usable through
    StableDiffusionXLImg2ImgPipeline / StableDiffusionXLInpaintPipeline.from_pipe."""
    path = Path(path)
    with torch.random.fork_rng(devices=[]):  # don't disturb the caller's RNG
        sdxl_pipeline("tiny", seed).save_pretrained(path)
    return path


def build_tiny_svd(path: str | Path, seed: int = 0) -> Path:
    """StableVideoDiffusionPipeline folder; default 64x64, 4 frames."""
    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        svd_pipeline("tiny", seed).save_pretrained(path)
    return path


def build_tiny_upscaler(path: str | Path, seed: int = 0) -> Path:
    """StableDiffusionUpscalePipeline folder: 32x32 in -> 128x128 out (x4)."""
    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        upscaler_pipeline("tiny", seed).save_pretrained(path)
    return path


def build_tiny_gemma(path: str | Path, seed: int = 0) -> Path:
    """Gemma 3 with its SigLIP vision tower (Gemma3ForConditionalGeneration), its processor (64x64
    images, 16 tokens each) and generation config, saved as float32 in the released checkpoints'
    layout."""
    from transformers import Gemma3ForConditionalGeneration

    path = Path(path)
    config, processor, generation_config = gemma3_parts("tiny", dtype="float32")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Gemma3ForConditionalGeneration(config)
        # transformers initialises the image-to-text projection at zero (training starts there), which
        # would leave the model blind: random, like every other weight, so images change the output.
        model.model.multi_modal_projector.mm_input_projection_weight.data.normal_(0, config.initializer_range)
    model.generation_config = generation_config
    model.save_pretrained(path)
    _vision_keys_as_released(path / "model.safetensors")
    processor.save_pretrained(path)  # the tokenizer, the image processor and the chat template
    return path


def _vision_keys_as_released(weights: Path) -> None:
    """transformers 5 saves the vision tower's weights as `vision_tower.embeddings...`, while the
    released checkpoints, and vLLM's loader (its SiglipVisionModel holds a `vision_model`), name them
    `vision_tower.vision_model.embeddings...`; transformers loads either. Rewritten in place."""
    from safetensors.torch import load_file, save_file

    prefix, released = "vision_tower.", "vision_tower.vision_model."
    state = load_file(weights)
    state = {released + key[len(prefix):] if key.startswith(prefix) and not key.startswith(released) else key: tensor
             for key, tensor in state.items()}
    save_file(state, weights, metadata={"format": "pt"})


# The production language model (serve_config.yaml's llm.model_source, google/gemma-3-4b-it), as its
# config.json and processor config give it (4.3 B parameters: the Gemma 3 text model and a SigLIP
# so400m vision tower); the tiny one has the same features at a size a CPU runs in seconds.
GEMMA3: dict[str, dict[str, Any]] = {
    "tiny": dict(
        text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, head_dim=64,  # vLLM's CPU attention wants a regular head size
                  query_pre_attn_scalar=64, sliding_window=256, max_position_embeddings=1024,
                  layer_types=["sliding_attention", "full_attention"]),  # both kinds of layer
        vision=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                    image_size=64, patch_size=8),  # 8x8 patches, pooled to 4x4 = 16 tokens
        mm_tokens_per_image=16),
    "full": dict(
        text=dict(vocab_size=262_208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                  sliding_window=1024, max_position_embeddings=131_072, rms_norm_eps=1e-06,
                  hidden_activation="gelu_pytorch_tanh",  # five sliding-window layers to one global
                  rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                                   "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}),
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                    image_size=896, patch_size=14, layer_norm_eps=1e-06, hidden_act="gelu_pytorch_tanh"),
        mm_tokens_per_image=256),  # 64x64 patches, pooled to 16x16
}


def _padded_tokenizer(tokenizer, vocab_size: int):
    """`tokenizer` grown to `vocab_size` ids with filler tokens that encoding never produces and
    decoding turns into plain text, so every id a full-size model samples decodes (detokenizing the
    stream is part of serving's cost)."""
    from tokenizers import Tokenizer

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    alphabet = sorted(c for c in vocab if len(c) == 1 and c.isascii() and c.isalpha())
    width = 3
    while len(alphabet) ** width < vocab_size:
        width += 1
    index = 0
    # Added tokens outside the model's vocabulary (the newlines) take the ids after it when loaded.
    extra = sum(1 for t in state["added_tokens"] if t["content"] not in vocab)
    next_id = max(vocab.values()) + 1
    while next_id < vocab_size - extra:
        token, rest = "", index
        for _ in range(width):
            token, rest = alphabet[rest % len(alphabet)] + token, rest // len(alphabet)
        index += 1
        if token not in vocab:
            vocab[token] = next_id
            next_id += 1
    return _gemma_fast_tokenizer(Tokenizer.from_str(json.dumps(state)), model_max_length=tokenizer.model_max_length)


def gemma3_parts(scale: Scale = "tiny", dtype: str = "bfloat16"):
    """Gemma 3 at `scale`: (Gemma3Config, Gemma3Processor, GenerationConfig), the processor with the
    locally built tokenizer (grown to the real vocabulary at full size) and the chat template."""
    from transformers import Gemma3Config, Gemma3ImageProcessorPil, Gemma3Processor, GenerationConfig

    dims = GEMMA3[scale]
    tokenizer = _gemma_tokenizer()
    if scale == "full":
        tokenizer = _padded_tokenizer(tokenizer, dims["text"]["vocab_size"])
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in GEMMA_SPECIALS + GEMMA_IMAGE_SPECIALS}
    special_ids = dict(pad_token_id=ids["<pad>"], eos_token_id=ids["<eos>"], bos_token_id=ids["<bos>"])
    config = Gemma3Config(
        # vocab_size must equal the tokenizer's, or vLLM/HF index out of range
        text_config={"vocab_size": len(tokenizer), **dims["text"], **special_ids},
        vision_config={**dims["vision"], "vision_use_head": False},
        mm_tokens_per_image=dims["mm_tokens_per_image"],
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
        **special_ids,
        dtype=dtype,
        architectures=["Gemma3ForConditionalGeneration"],
    )
    size = dims["vision"]["image_size"]
    # The released preprocessor config: a square resize, [-1, 1] pixels, no pan-and-scan. Saved as
    # "Gemma3ImageProcessor", so transformers loads its torchvision backend where torchvision is.
    image_processor = Gemma3ImageProcessorPil(size={"height": size, "width": size}, do_pan_and_scan=False,
                                              image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                chat_template=GEMMA_CHAT_TEMPLATE, image_seq_length=dims["mm_tokens_per_image"])
    generation_config = GenerationConfig(bos_token_id=ids["<bos>"], pad_token_id=ids["<pad>"],
                                         # chat turns end with <end_of_turn>
                                         eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]])
    return config, processor, generation_config


def write_llm_folder(path: str | Path, scale: Scale = "tiny") -> Path:
    """A Gemma 3 model folder without weights: config.json, generation config and processor (the
    locally built tokenizer, grown to the vocabulary at full size). vLLM serves it with
    `load_format="dummy"` (random weights, created on its device): no download, no weight file."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config, processor, generation_config = gemma3_parts(scale)
    config.save_pretrained(path)
    generation_config.save_pretrained(path)
    processor.save_pretrained(path)
    return path


BUILDERS = {
    "sdxl": build_tiny_sdxl,
    "svd": build_tiny_svd,
    "upscaler": build_tiny_upscaler,
    "gemma": build_tiny_gemma,
}


# ---------------------------------------------------------------------------
# Idempotent, crash-safe building of the whole set
# ---------------------------------------------------------------------------


def build_random_lora(sdxl: str | Path, folder: str | Path, seed: int, rank: int = 4) -> Path:
    """A UNet LoRA with random (non-zero) weights for an SDXL folder, saved as diffusers saves
    trained ones (`pytorch_lora_weights.safetensors`): a stand-in adapter for tests and benchmarks."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from training.config import DEFAULT_TARGET_MODULES

    unet = UNet2DConditionModel.from_pretrained(sdxl, subfolder="unet")
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                target_modules=DEFAULT_TARGET_MODULES))
    StableDiffusionXLPipeline.save_lora_weights(
        folder, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
    return Path(folder)


def save_random_unet_lora(unet, folder: str | Path, seed: int, rank: int = 16,
                          target_modules: list[str] | None = None) -> Path:
    """A random (non-zero) LoRA for `unet`'s architecture, saved as diffusers saves trained ones
    (`pytorch_lora_weights.safetensors`), without touching `unet`: the tensors are made for its
    target Linear layers' shapes on the CPU (a full-size SDXL LoRA of rank 16 is about 46 MB)."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig

    from training.config import DEFAULT_TARGET_MODULES

    targets = list(target_modules or DEFAULT_TARGET_MODULES)
    generator = torch.Generator("cpu").manual_seed(seed)
    state = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            state[f"{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator) / module.in_features ** 0.5
            state[f"{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) / rank
    if not state:
        raise ValueError(f"no Linear layer of the UNet matches {targets}")
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets)
    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=convert_state_dict_to_diffusers(state),
                                                unet_lora_adapter_metadata=config.to_dict())
    return Path(folder)


def _marker(name: str, seed: int) -> dict:
    return {"model": name, "seed": seed, **({"recipe": RECIPES[name]} if name in RECIPES else {})}


def is_complete(folder: str | Path, seed: int | None = None) -> bool:
    """True if `folder` was finished by this module with its model's current recipe (and, if given,
    with this seed)."""
    marker = Path(folder) / COMPLETE_MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
        recipe = info.get("recipe", 1) == RECIPES.get(info.get("model", Path(folder).name), 1)
        return recipe and (seed is None or info.get("seed") == seed)
    except (ValueError, AttributeError):
        return seed is None


def build_model(name: str, root: str | Path, seed: int = 0, force: bool = False) -> tuple[Path, bool]:
    """Build root/<name> unless already complete. Returns (folder, built)."""
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; expected one of {MODEL_NAMES}")
    root = Path(root)
    final = root / name
    if not force and is_complete(final, seed):
        return final, False

    root.mkdir(parents=True, exist_ok=True)
    # Build in a unique sibling so a crash leaves only a stray `.name.tmp-*` folder, and a
    # concurrent builder (another replica) cannot see or clobber our half-written files.
    tmp = root / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        BUILDERS[name](tmp, seed=seed)
        (tmp / COMPLETE_MARKER).write_text(json.dumps(_marker(name, seed)) + "\n")
        if final.exists():
            # Stale (no marker), other seed, or forced: move it aside, then swap in.
            trash = root / f".{name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(final, trash)
            except FileNotFoundError:  # a concurrent builder moved it first
                pass
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(tmp, final)  # atomic: `final` is either absent or complete
        except OSError:
            if not is_complete(final, seed):  # someone else won the race with a good copy?
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final, True


def build_all(root: str | Path, seed: int = 0, force: bool = False) -> dict[str, Path]:
    """Write root/sdxl, root/svd, root/upscaler, root/gemma, skipping complete folders."""
    return {name: build_model(name, root, seed=seed, force=force)[0] for name in MODEL_NAMES}


def ensure_tiny_models(root: str | Path, seed: int = 0) -> dict[str, Path]:
    return build_all(root, seed=seed, force=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="models/tiny", help="root folder (default: models/tiny)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if complete")
    args = parser.parse_args(argv)

    for name in MODEL_NAMES:
        start = time.perf_counter()
        folder, built = build_model(name, args.out, seed=args.seed, force=args.force)
        took = time.perf_counter() - start
        print(f"{name:9s} {'built' if built else 'skipped':8s} {folder}  ({took:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
