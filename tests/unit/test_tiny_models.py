"""The tiny random-weight models load through the real from_pretrained code and run.

Random weights give noise images and gibberish text, so these tests assert on shapes,
formats, determinism under a seed and the builder's bookkeeping, never on content.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from local.tiny_models import (
    COMPLETE_MARKER,
    MODEL_NAMES,
    RECIPES,
    build_all,
    build_model,
    build_tiny_gemma,
    build_tiny_sdxl,
    ensure_tiny_models,
    is_complete,
)

STEPS = 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return ensure_tiny_models(tmp_path_factory.mktemp("tiny"), seed=0)


def _image(size: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images])


def test_layout(tiny):
    assert set(tiny) == set(MODEL_NAMES)
    for name, folder in tiny.items():
        assert folder.name == name
        recipe = {"recipe": RECIPES[name]} if name in RECIPES else {}
        assert json.loads((folder / COMPLETE_MARKER).read_text()) == {"model": name, "seed": 0, **recipe}
    for name in ("sdxl", "svd", "upscaler"):
        assert (tiny[name] / "model_index.json").is_file()
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
              "processor_config.json", "chat_template.jinja"):
        assert (tiny["gemma"] / f).is_file(), f
    assert json.loads((tiny["gemma"] / "config.json").read_text())["architectures"] == ["Gemma3ForConditionalGeneration"]


# --- SDXL -------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl(tiny):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny["sdxl"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_clip_tokenizer_round_trip(tiny):
    from transformers import CLIPTokenizer

    for sub in ("tokenizer", "tokenizer_2"):
        tok = CLIPTokenizer.from_pretrained(tiny["sdxl"] / sub)
        assert len(tok) == 514 and tok.model_max_length == 77
        ids = tok("a photo of a cat", padding="max_length", truncation=True).input_ids
        assert len(ids) == 77
        assert ids[0] == tok.bos_token_id == 512 and ids[-1] == tok.eos_token_id == 513
        assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == "aphotoofacat"
        long_ids = tok("word " * 200, truncation=True, max_length=77).input_ids
        assert len(long_ids) == 77


def test_sdxl_text_to_image_deterministic(sdxl):
    def run(seed):
        return sdxl(
            prompt=["a red fox", "a blue bird"],
            num_inference_steps=STEPS,
            generator=torch.Generator().manual_seed(seed),
            output_type="pil",
        ).images

    first = run(1)
    assert len(first) == 2 and all(im.size == (64, 64) for im in first)  # default size
    assert np.array_equal(_pixels(first), _pixels(run(1)))
    assert not np.array_equal(_pixels(first), _pixels(run(2)))


def test_sdxl_img2img_and_inpaint_from_pipe(sdxl):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline

    img2img = StableDiffusionXLImg2ImgPipeline.from_pipe(sdxl)
    out = img2img(
        prompt="a castle",
        image=_image(64),
        strength=0.75,
        num_inference_steps=3,  # x strength 0.75 -> 2 actual steps
        generator=torch.Generator().manual_seed(0),
    ).images
    assert len(out) == 1 and out[0].size == (64, 64)

    inpaint = StableDiffusionXLInpaintPipeline.from_pipe(sdxl)
    assert inpaint.unet.config.in_channels == 4
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    out = inpaint(
        prompt="a window",
        image=_image(64),
        mask_image=mask,
        height=64,
        width=64,
        strength=0.99,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(0),
    ).images
    assert len(out) == 1 and out[0].size == (64, 64)


# --- SVD and upscaler --------------------------------------------------------


def test_svd_four_frames(tiny):
    from diffusers import StableVideoDiffusionPipeline

    pipe = StableVideoDiffusionPipeline.from_pretrained(tiny["svd"])
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(
        _image(64),
        height=64,
        width=64,
        num_frames=4,
        num_inference_steps=3,
        decode_chunk_size=2,
        generator=torch.Generator().manual_seed(0),
        output_type="pil",
    ).frames
    assert len(frames) == 1 and len(frames[0]) == 4
    assert all(f.size == (64, 64) for f in frames[0])


def test_upscaler_x4(tiny):
    from diffusers import StableDiffusionUpscalePipeline

    pipe = StableDiffusionUpscalePipeline.from_pretrained(tiny["upscaler"])
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt="a sharp photo",
        image=_image(32),
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(0),
        output_type="pil",
    ).images
    assert len(out) == 1 and out[0].size == (128, 128)


# --- Gemma --------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma(tiny):
    from transformers import AutoProcessor, Gemma3ForConditionalGeneration

    model, info = Gemma3ForConditionalGeneration.from_pretrained(tiny["gemma"], output_loading_info=True)
    return model, info, AutoProcessor.from_pretrained(tiny["gemma"])


def test_gemma3_loads_with_every_weight_in_the_released_layout(tiny, gemma):
    from safetensors import safe_open

    model, info, processor = gemma
    assert {k: set(v) if isinstance(v, (set, list)) else v for k, v in info.items()} == {
        "missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": set()}
    assert model.dtype == torch.float32
    assert model.config.vision_config.image_size == 64 and model.config.mm_tokens_per_image == 16
    with safe_open(tiny["gemma"] / "model.safetensors", "pt") as weights:
        keys = list(weights.keys())
    # The hub's (and vLLM's loader's) names, not transformers 5's own `vision_tower.embeddings...`
    vision = [k for k in keys if k.startswith("vision_tower.")]
    assert vision and all(k.startswith("vision_tower.vision_model.") for k in vision)
    assert any(k.startswith("language_model.model.layers.") for k in keys)
    assert any(k.startswith("multi_modal_projector.") for k in keys)
    assert type(processor).__name__ == "Gemma3Processor"
    assert len(processor.tokenizer) == model.config.text_config.vocab_size


def test_gemma_tokenizer_has_gemmas_special_and_newline_tokens(gemma):
    tok = gemma[2].tokenizer
    assert [tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id] == [0, 1, 2, 3]
    assert (tok.boi_token, tok.eoi_token, tok.image_token) == ("<start_of_image>", "<end_of_image>", "<image_soft_token>")
    vocab = tok.get_vocab()
    newlines = [vocab["\n" * k] for k in (1, 2, 3, 4)]  # vLLM's gemma3_mm looks these up by text
    assert len(set(newlines)) == 4
    assert tok("a\n\n\nb", add_special_tokens=False).input_ids[1:-1] == [newlines[2]]
    assert tok.decode(tok("line one\n\nline two\n", add_special_tokens=False).input_ids) == "line one\n\nline two\n"
    assert tok("hi").input_ids[0] == tok.bos_token_id  # plain encode adds <bos>, like Gemma


def test_gemma_chat_template_folds_the_system_message_and_takes_images(gemma):
    processor = gemma[2]
    text = processor.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
        tokenize=False, add_generation_prompt=True)
    assert text == "<bos><start_of_turn>user\nBe brief.\n\nHello there<end_of_turn>\n<start_of_turn>model\n"
    parts = processor.apply_chat_template(  # OpenAI-style parts, as vLLM hands them to the template
        [{"role": "system", "content": [{"type": "text", "text": "Judge it."}]},
         {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " Score this "}]},
         {"role": "assistant", "content": [{"type": "text", "text": "7"}]}],
        tokenize=False)
    assert parts == ("<bos><start_of_turn>user\nJudge it.\n\n<start_of_image>Score this<end_of_turn>\n"
                     "<start_of_turn>model\n7<end_of_turn>\n")


def test_gemma_processor_expands_one_image_to_16_soft_tokens_and_generates(gemma):
    model, _, processor = gemma
    tok = processor.tokenizer
    chat = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe"}]}],
        tokenize=False, add_generation_prompt=True)
    inputs = processor(text=chat, images=[_image(100)], return_tensors="pt", add_special_tokens=False)
    ids = inputs.input_ids[0].tolist()
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id  # the template's <bos> only
    image = tok.convert_tokens_to_ids(tok.image_token)
    assert ids.count(image) == 16 == model.config.mm_tokens_per_image
    start = ids.index(tok.convert_tokens_to_ids(tok.boi_token))
    assert ids[start + 1 : start + 17] == [image] * 16 and ids[start + 17] == tok.convert_tokens_to_ids(tok.eoi_token)
    assert tuple(inputs.pixel_values.shape) == (1, 3, 64, 64)

    def generate(pixels):
        out = model.generate(**{**inputs, "pixel_values": pixels}, max_new_tokens=8, do_sample=False)
        return out[0, len(ids) :]

    new = generate(inputs.pixel_values)
    assert new.shape == (8,)
    assert torch.equal(new, generate(inputs.pixel_values))
    assert isinstance(tok.decode(new), str)
    with torch.no_grad():  # the image reaches the logits
        logits = [model(**{**inputs, "pixel_values": p}).logits[0, -1] for p in (inputs.pixel_values, -inputs.pixel_values)]
    assert not torch.allclose(*logits)


# --- Builder bookkeeping --------------------------------------------------------


def test_builder_is_deterministic(tiny, tmp_path):
    weights = "unet/diffusion_pytorch_model.safetensors"
    reference = (tiny["sdxl"] / weights).read_bytes()
    rng_before = torch.get_rng_state()
    assert (build_tiny_sdxl(tmp_path / "same", seed=0) / weights).read_bytes() == reference
    assert (build_tiny_sdxl(tmp_path / "other", seed=1) / weights).read_bytes() != reference
    gemma = (tiny["gemma"] / "model.safetensors").read_bytes()  # written twice: saved, then keys renamed
    assert (build_tiny_gemma(tmp_path / "gemma", seed=0) / "model.safetensors").read_bytes() == gemma
    assert torch.equal(torch.get_rng_state(), rng_before)  # builders leave the global RNG alone


def test_a_folder_from_an_older_recipe_is_rebuilt(tmp_path):
    """A checkout whose models/tiny/gemma was built as text-only Gemma (its marker has no recipe)
    gets Gemma 3 from `make models` / `make serve`, without --force."""
    old = tmp_path / "gemma"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"architectures": ["GemmaForCausalLM"]}))
    (old / COMPLETE_MARKER).write_text(json.dumps({"model": "gemma", "seed": 0}) + "\n")
    assert not is_complete(old, 0) and not is_complete(old)
    folder, built = build_model("gemma", tmp_path, seed=0)
    assert built and is_complete(folder, 0)
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["Gemma3ForConditionalGeneration"]
    assert build_model("gemma", tmp_path, seed=0) == (folder, False)
    # Models without a recipe bump keep their old markers.
    (tmp_path / "sdxl").mkdir()
    (tmp_path / "sdxl" / COMPLETE_MARKER).write_text(json.dumps({"model": "sdxl", "seed": 0}))
    assert is_complete(tmp_path / "sdxl", 0)


def test_build_all_skips_complete_and_rebuilds_incomplete(tmp_path):
    root = tmp_path / "models"

    def stamps():
        return {n: (root / n / COMPLETE_MARKER).stat().st_mtime_ns for n in MODEL_NAMES}

    build_all(root)
    first = stamps()
    assert build_all(root) == {n: root / n for n in MODEL_NAMES}
    assert stamps() == first  # nothing rebuilt

    # A half-built folder (no marker) is replaced wholesale; the others are left alone.
    (root / "upscaler" / COMPLETE_MARKER).unlink()
    (root / "upscaler" / "junk.bin").write_bytes(b"partial")
    build_all(root)
    after = stamps()
    assert not (root / "upscaler" / "junk.bin").exists()
    assert {n: after[n] == first[n] for n in MODEL_NAMES} == {
        "sdxl": True,
        "svd": True,
        "upscaler": False,
        "gemma": True,
    }
    # No temp or trash siblings are left behind.
    assert sorted(p.name for p in root.iterdir()) == sorted(MODEL_NAMES)

    # force, or asking for another seed, rebuilds.
    build_all(root, force=True)
    forced = stamps()
    assert all(forced[n] != after[n] for n in MODEL_NAMES)
    build_all(root, seed=1)
    assert json.loads((root / "gemma" / COMPLETE_MARKER).read_text())["seed"] == 1
