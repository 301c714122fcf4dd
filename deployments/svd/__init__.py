"""SVD: image-to-video with Stable Video Diffusion (contract.py, deployment.py)."""

from __future__ import annotations

from ray.serve import Application

from deployments.spec import ModelSpec
from deployments.svd.contract import SVDConfig, SVDLimits
from deployments.svd.deployment import SVDDeployment


def bind(config: SVDConfig) -> Application:
    return SVDDeployment.bind(config)


SPEC = ModelSpec(name="svd", config_cls=SVDConfig, bind=bind, limits_cls=SVDLimits, order=10)
