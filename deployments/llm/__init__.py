"""The language model (Gemma on vLLM through Ray LLM) and prompt refinement (contract.py,
deployment.py, server.py)."""

from __future__ import annotations

from deployments.llm.contract import GemmaConfig, GemmaLimits
from deployments.llm.deployment import build_gemma_deployment
from deployments.spec import ModelSpec

# GemmaConfig takes no storage; its model is `model_source`.
SPEC = ModelSpec(name="llm", config_cls=GemmaConfig, bind=build_gemma_deployment, limits_cls=GemmaLimits,
                 model_field="model_source", takes_storage=False, order=30)
