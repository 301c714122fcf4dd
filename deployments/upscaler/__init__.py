"""The Stable Diffusion x4 upscaler, on images and video frames (contract.py, deployment.py)."""

from __future__ import annotations

from ray.serve import Application

from deployments.spec import ModelSpec
from deployments.upscaler.contract import UpscalerConfig, UpscalerLimits
from deployments.upscaler.deployment import UpscalerDeployment


def bind(config: UpscalerConfig) -> Application:
    return UpscalerDeployment.bind(config)


SPEC = ModelSpec(name="upscaler", config_cls=UpscalerConfig, bind=bind, limits_cls=UpscalerLimits, order=20)
