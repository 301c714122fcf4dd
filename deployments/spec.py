"""How the app builder finds a model: each `deployments/<name>/__init__.py` defines `SPEC`.

Adding a model is a folder here (contract.py, deployment.py, __init__.py with its SPEC), a
section in the configs, and tests; the app builder (`api/app.py`) discovers it, types its config
section with `config_cls`, binds it with `bind`, and hands its handle to the ingress and the job
runner by `name`.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel
from ray.serve import Application

import deployments


@dataclass(frozen=True)
class ModelSpec:
    name: str  # the app-args section, the handle's name, and the key in /readyz
    config_cls: type[BaseModel]  # the section's typed config
    bind: Callable[[Any], Application]  # config -> the bound deployment
    limits_cls: type[BaseModel] | None = None  # the contract's Limits (`Limits.from_config(config)`)
    required: bool = False  # the app refuses to build without this section (SDXL)
    model_field: str = "model"  # the config field holding a local folder or a hub id
    takes_storage: bool = True  # storage_root / storage_options are filled in from the app's args
    order: int = 100  # discovery order (sections are listed and bound in this order)


def discover() -> dict[str, ModelSpec]:
    """Every model package under deployments/ that defines SPEC, by name, in `order`."""
    specs = []
    for module in pkgutil.iter_modules(deployments.__path__):
        if not module.ispkg:
            continue
        spec = getattr(importlib.import_module(f"deployments.{module.name}"), "SPEC", None)
        if isinstance(spec, ModelSpec):
            specs.append(spec)
    return {spec.name: spec for spec in sorted(specs, key=lambda s: (s.order, s.name))}
