"""vLLM general plugin (pyproject.toml, entry point group `vllm.general_plugins`): lets the CPU build
serve Gemma 3 without torchvision.

vLLM 0.32's `gemma3_mm.py` imports `transformers.models.gemma3.image_processing_gemma3`, the
torchvision image processor, only to name a type. The CPU venv has no torchvision (its wheels are
CUDA builds that cannot load beside the CPU torch; constraints/cpu-overrides.txt), so the import
fails and vLLM reports "Model architectures ['Gemma3ForConditionalGeneration'] failed to be
inspected". vLLM calls `load_general_plugins()` in every process it starts (the engine, its workers,
the registry's inspection subprocess), so `register()` runs before that import anywhere.

With torchvision installed (GPU hosts) it does nothing. Without, it puts a stand-in module in
`sys.modules` whose `Gemma3ImageProcessor` is transformers' PIL backend, the class transformers itself
loads for a Gemma 3 folder when torchvision is missing. Idempotent, and no vLLM import.
"""

from __future__ import annotations

import importlib.util
import sys
import types

STANDIN = "transformers.models.gemma3.image_processing_gemma3"


def register() -> None:
    if STANDIN in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    module = types.ModuleType(STANDIN, "Stand-in for the torchvision Gemma 3 image processor "
                                       "(deployments/llm/vllm_plugin.py).")
    module.Gemma3ImageProcessor = Gemma3ImageProcessorPil
    sys.modules[STANDIN] = module
