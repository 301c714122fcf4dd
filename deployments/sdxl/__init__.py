"""SDXL: text-to-image, image-to-image and inpainting (contract.py, deployment.py, lora.py)."""

from __future__ import annotations

from ray.serve import Application

from deployments.sdxl.contract import SDXLConfig, SDXLLimits
from deployments.sdxl.deployment import SDXLDeployment
from deployments.spec import ModelSpec


def bind(config: SDXLConfig) -> Application:
    return SDXLDeployment.bind(config)


SPEC = ModelSpec(name="sdxl", config_cls=SDXLConfig, bind=bind, limits_cls=SDXLLimits, required=True, order=0)
