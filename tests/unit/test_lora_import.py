"""Issue 22, item 1: importing an external LoRA (diffusers or kohya format) through diffusers' own
loaders, checked against the base model's layers; the imported adapter changes the output."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file, save

from deployments.errors import InvalidRequestError
from deployments.sdxl.contract import SDXLRequest
from deployments.sdxl.deployment import SDXLDeployment
from local.tiny_models import build_random_lora, ensure_tiny_models
from storage import Storage
from storage.registry import LoraRegistry

REPO = Path(__file__).resolve().parents[2]


def kohya_from_diffusers(state: dict, alpha: float) -> dict:
    """The same adapter under kohya's names (`lora_unet_<module>.lora_down.weight` and an `alpha`)."""
    out = {}
    for key, tensor in state.items():
        module = key.rpartition(".lora")[0][len("unet."):].replace(".", "_")
        part = "lora_down" if ".lora.down." in key else "lora_up"
        out[f"lora_unet_{module}.{part}.weight"] = tensor.contiguous()
        out[f"lora_unet_{module}.alpha"] = torch.tensor(alpha)
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = ensure_tiny_models(REPO / "models" / "tiny")["sdxl"]
    root = tmp_path_factory.mktemp("storage")
    lora = build_random_lora(model, tmp_path_factory.mktemp("lora"), seed=5)
    diffusers_file = (lora / "pytorch_lora_weights.safetensors").read_bytes()
    sdxl = SDXLDeployment.func_or_class({
        "model": str(model), "storage_root": str(root), "default_size": 64, "min_size": 32, "max_size": 256,
        "default_steps": 2, "max_steps": 50, "torch_num_threads": 2, "batch_wait_timeout_s": 0.05})
    with asyncio.Runner() as runner:
        yield runner.run, sdxl, diffusers_file, LoraRegistry(Storage(str(root))), model


def pixels(response) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(response.images[0].png))).astype(np.int16)


def test_diffusers_and_kohya_files_convert_to_the_same_adapter(setup):
    run, sdxl, diffusers_file, _, _ = setup
    state = load_safetensors(diffusers_file)
    plain = run(sdxl.import_lora(diffusers_file))
    kohya = run(sdxl.import_lora(save(kohya_from_diffusers(state, alpha=4.0))))
    assert (plain.source_format, kohya.source_format) == ("diffusers", "kohya")
    assert plain.layers == kohya.layers == len(state) // 2 and plain.rank == kohya.rank == 4
    assert plain.target_modules == kohya.target_modules == ["to_k", "to_out.0", "to_q", "to_v"]
    a, b = load_safetensors(plain.weights), load_safetensors(kohya.weights)
    assert sorted(a) == sorted(b) and all(torch.allclose(a[k], b[k]) for k in a)
    assert sdxl.loaded_loras() == []  # the temporary adapter is gone


def test_an_imported_kohya_lora_changes_the_output(setup):
    run, sdxl, diffusers_file, registry, model = setup
    kohya = kohya_from_diffusers(load_safetensors(diffusers_file), alpha=4.0)
    imported = run(sdxl.import_lora(save(kohya)))
    registry.register("imported", {"base_model": str(model), "rank": imported.rank, "alpha": imported.alpha},
                      imported.weights)
    request = dict(prompt="a red square", seed=3, steps=2, width=64, height=64)
    base = pixels(run(sdxl.generate(SDXLRequest(**request))))
    with_lora = pixels(run(sdxl.generate(SDXLRequest(**request, lora="imported"))))
    again = pixels(run(sdxl.generate(SDXLRequest(**request, lora="imported"))))
    assert np.abs(base - with_lora).mean() > 1.0 and np.array_equal(with_lora, again)


@pytest.mark.parametrize("damage", ["shape", "foreign_layer", "not_safetensors", "no_lora"])
def test_files_that_do_not_fit_the_base_model_are_refused(setup, damage):
    run, sdxl, diffusers_file, _, _ = setup
    kohya = kohya_from_diffusers(load_safetensors(diffusers_file), alpha=4.0)
    if damage == "shape":
        kohya = {k: torch.zeros(v.shape[0], v.shape[1] + 3) if k.endswith("lora_down.weight") else v
                 for k, v in kohya.items()}
    elif damage == "foreign_layer":
        kohya["lora_unet_not_a_layer_of_sdxl.lora_down.weight"] = torch.zeros(4, 8)
        kohya["lora_unet_not_a_layer_of_sdxl.lora_up.weight"] = torch.zeros(8, 4)
    elif damage == "no_lora":
        kohya = {"some.weight": torch.zeros(2)}
    data = b"not a safetensors file" * 3 if damage == "not_safetensors" else save(kohya)
    adapters = set(getattr(sdxl.pipe.unet, "peft_config", {}))
    with pytest.raises(InvalidRequestError) as refused:
        run(sdxl.import_lora(data))
    assert refused.value.param == "file"
    assert set(getattr(sdxl.pipe.unet, "peft_config", {})) == adapters  # nothing of it stays in the pipeline
