"""GPU memory caps: each diffusion deployment caps its CUDA allocator to its config's fraction,
and the production config's caps fit the GPUs Ray may place them on together.

No GPU is needed: torch.cuda is monkeypatched. tests/unit/test_configs.py already checks each
cap against its own deployment's GPU share; this file checks the caller side and the sums.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import yaml

from deployments import diffusion as runtime
from api.app import AtelierArgs

REPO = Path(__file__).resolve().parents[2]
EPSILON = 1e-9
UNCAPPED = 1.0  # torch without a per-process fraction may take the whole GPU
VLLM_DEFAULT_UTILIZATION = 0.9  # vLLM's gpu_memory_utilization when none is given


class CudaSpy:
    """Stands in for torch.cuda: says whether a GPU is there and records the caps set."""

    def __init__(self, available: bool):
        self.available = available
        self.fractions: list[tuple] = []

    def install(self, monkeypatch) -> "CudaSpy":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: self.available)
        monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                            lambda fraction, device=None: self.fractions.append((fraction, device)))
        monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # keep this process's threads as they are
        return self


# --- configure_torch ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.09, 0.28, 0.38, 1.0])
def test_fraction_is_set_when_cuda_is_available(monkeypatch, fraction):
    cuda = CudaSpy(available=True).install(monkeypatch)
    runtime.configure_torch(num_threads=2, gpu_memory_fraction=fraction)
    assert cuda.fractions == [(fraction, None)]


def test_no_cap_without_cuda(monkeypatch):
    cuda = CudaSpy(available=False).install(monkeypatch)
    runtime.configure_torch(num_threads=2, gpu_memory_fraction=0.4)
    assert cuda.fractions == []


def test_no_cap_without_a_fraction(monkeypatch):
    cuda = CudaSpy(available=True).install(monkeypatch)
    runtime.configure_torch(num_threads=2, gpu_memory_fraction=None)
    assert cuda.fractions == []


# --- each deployment passes its config's fraction ----------------------------------------------------


class PipelineNotBuilt(Exception):
    """Raised by the pipeline factory: the constructor got as far as loading the model."""


def _stop(config):
    raise PipelineNotBuilt(config)


def _production_section(name: str) -> dict:
    args = yaml.safe_load((REPO / "serve_config.yaml").read_text())["applications"][0]["args"]
    return args[name]


@pytest.mark.parametrize("module, cls, section", [
    ("deployments.sdxl.deployment", "SDXLDeployment", "sdxl"),
    ("deployments.svd.deployment", "SVDDeployment", "svd"),
    ("deployments.upscaler.deployment", "UpscalerDeployment", "upscaler"),
])
@pytest.mark.parametrize("available", [True, False])
def test_each_model_deployment_caps_memory_to_its_config(monkeypatch, tmp_path, module, cls, section, available):
    import importlib

    cuda = CudaSpy(available=available).install(monkeypatch)
    deployment = getattr(importlib.import_module(module), cls).func_or_class
    config = {**_production_section(section), "storage_root": str(tmp_path)}
    fraction = config["gpu_memory_fraction"]
    assert 0 < fraction < 1
    # The cap is set before the model loads (the first CUDA allocation), so the factory stops it there.
    with pytest.raises(PipelineNotBuilt):
        deployment(config, pipeline_factory=_stop)
    assert cuda.fractions == ([(fraction, None)] if available else [])


@pytest.mark.parametrize("module, cls", [("deployments.sdxl.deployment", "SDXLDeployment"), ("deployments.svd.deployment", "SVDDeployment"),
                                         ("deployments.upscaler.deployment", "UpscalerDeployment")])
def test_a_deployment_without_a_fraction_sets_no_cap(monkeypatch, tmp_path, module, cls):
    import importlib

    cuda = CudaSpy(available=True).install(monkeypatch)
    with pytest.raises(PipelineNotBuilt):
        getattr(importlib.import_module(module), cls).func_or_class(
            {"model": "unused", "storage_root": str(tmp_path)}, pipeline_factory=_stop)
    assert cuda.fractions == []


# --- serve_config.yaml: the caps of what can share a GPU fit it ---------------------------------------


def _gpu_tenants(path: str) -> dict[str, dict]:
    """Each model that takes a GPU share: its share (num_gpus or GPU bundle), its memory cap
    (gpu_memory_fraction, or vLLM's gpu_memory_utilization; without one, what it may take then),
    and how many replicas it may run."""
    from deployments.llm.contract import GemmaConfig

    app = yaml.safe_load((REPO / path).read_text())["applications"][0]
    args = AtelierArgs.model_validate(app["args"])
    deployments = {d["name"]: d for d in app["deployments"]}
    tenants = {}
    for name, section in (("SDXLDeployment", args.sdxl), ("SVDDeployment", args.svd),
                          ("UpscalerDeployment", args.upscaler)):
        spec = deployments.get(name, {})
        share = spec.get("ray_actor_options", {}).get("num_gpus", 0)
        replicas = spec.get("autoscaling_config", {}).get("max_replicas", spec.get("num_replicas", 1))
        cap = getattr(section, "gpu_memory_fraction", None)
        tenants[name] = {"share": share, "explicit": cap is not None, "cap": UNCAPPED if cap is None else cap,
                         "replicas": replicas}
    if args.llm:
        llm = GemmaConfig.model_validate(args.llm)
        share = sum(b.get("GPU", 0) for b in (llm.placement_group_config or {}).get("bundles", []))
        autoscaling = (llm.deployment_config or {}).get("autoscaling_config", {})
        cap = llm.engine_kwargs.get("gpu_memory_utilization")
        tenants["GemmaDeployment"] = {"share": share, "explicit": cap is not None,
                                      "cap": VLLM_DEFAULT_UTILIZATION if cap is None else cap,
                                      "replicas": autoscaling.get("max_replicas", 1)}
    return {name: t for name, t in tenants.items() if t["share"]}


def test_production_puts_every_model_on_a_gpu_share():
    assert set(_gpu_tenants("serve_config.yaml")) == {"SDXLDeployment", "SVDDeployment", "UpscalerDeployment",
                                                       "GemmaDeployment"}
    assert _gpu_tenants("configs/local.yaml") == {}  # the local default runs on CPU


def test_every_model_sharing_a_gpu_caps_its_memory():
    """An uncapped tenant could take the memory its neighbours were promised (vLLM alone would
    take 0.9 of the GPU by default)."""
    for name, tenant in _gpu_tenants("serve_config.yaml").items():
        if tenant["share"] < 1:
            assert tenant["explicit"], f"{name} shares a GPU without a memory cap"
            assert 0 < tenant["cap"] <= tenant["share"] + EPSILON, name


def test_one_replica_of_each_model_fits_one_gpu():
    """The layout the config is written for: SDXL + SVD + upscaler + Gemma on one GPU."""
    tenants = _gpu_tenants("serve_config.yaml")
    assert sum(t["share"] for t in tenants.values()) <= 1 + EPSILON
    assert sum(t["cap"] for t in tenants.values()) <= 1 + EPSILON


def test_every_packing_ray_may_choose_keeps_the_caps_within_one_gpu():
    """Ray places replicas on a GPU while their shares add up to at most 1, in any mix (two SDXL
    replicas and an upscaler, say); the memory caps of every such mix must fit too."""
    tenants = list(_gpu_tenants("serve_config.yaml").values())
    ranges = [range(min(t["replicas"], int((1 + EPSILON) // t["share"])) + 1) for t in tenants]
    packings = 0
    for counts in itertools.product(*ranges):
        if sum(c * t["share"] for c, t in zip(counts, tenants)) <= 1 + EPSILON:
            packings += 1
            caps = sum(c * t["cap"] for c, t in zip(counts, tenants))
            assert caps <= 1 + EPSILON, (counts, caps)
    assert packings > len(tenants)  # mixes beyond one of each were checked
