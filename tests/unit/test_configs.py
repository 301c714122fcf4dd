"""Both configs are valid Ray Serve configs whose args build the app."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from api.app import AtelierArgs

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", ["serve_config.yaml", "configs/local.yaml"])
def test_config_validates_against_ray_serve_schema(path):
    config = yaml.safe_load((REPO / path).read_text())
    schema = ServeDeploySchema.model_validate(config) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(config)
    app = schema.applications[0]
    assert app.import_path == "api.app:build_app"
    names = {d.name for d in app.deployments}
    assert {"SDXLDeployment", "JobRunnerDeployment", "IngressDeployment"} <= names
    AtelierArgs.model_validate(app.args)


def test_production_config_uses_real_models_gpus_s3_and_redis():
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    app = config["applications"][0]
    args = AtelierArgs.model_validate(app["args"])
    assert args.sdxl["model"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert args.sdxl["dtype"] == "float16"
    assert args.storage_root.startswith("s3://")
    assert args.queue.broker_url.startswith("redis://")
    sdxl = next(d for d in app["deployments"] if d["name"] == "SDXLDeployment")
    assert 0 < sdxl["ray_actor_options"]["num_gpus"] < 1
    assert sdxl["autoscaling_config"]["max_replicas"] > sdxl["autoscaling_config"]["min_replicas"]
    assert args.sdxl["gpu_memory_fraction"] <= sdxl["ray_actor_options"]["num_gpus"]


def test_relative_paths_resolve_against_base_dir(tmp_path):
    (tmp_path / "models" / "tiny" / "sdxl").mkdir(parents=True)
    args = AtelierArgs.model_validate({
        "base_dir": str(tmp_path), "storage_root": "var/storage",
        "queue": {"broker_url": "sqla+sqlite:///var/queue/broker.db", "backend_url": "db+sqlite:///var/q/r.db"},
        "sdxl": {"model": "models/tiny/sdxl"},
    }).resolved()
    assert args.storage_root == str(tmp_path / "var" / "storage")
    assert args.sdxl["model"] == str(tmp_path / "models" / "tiny" / "sdxl")
    assert args.queue.broker_url == f"sqla+sqlite:///{tmp_path}/var/queue/broker.db"
    assert (tmp_path / "var" / "queue").is_dir()


def test_hub_ids_and_urls_are_left_alone(tmp_path):
    args = AtelierArgs.model_validate({
        "base_dir": str(tmp_path), "storage_root": "s3://bucket/prefix",
        "queue": {"broker_url": "redis://${HOST}:6379/0", "backend_url": "redis://${HOST}:6379/1"},
        "sdxl": {"model": "stabilityai/stable-diffusion-xl-base-1.0"},
    }).resolved()
    assert args.storage_root == "s3://bucket/prefix"
    assert args.sdxl["model"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert args.queue.broker_url == "redis://${HOST}:6379/0"


def test_queue_urls_expand_environment_variables(monkeypatch):
    from graphs.job_runner import JobQueueConfig

    monkeypatch.setenv("ATELIER_REDIS_HOST", "redis.internal")
    config = JobQueueConfig(broker_url="redis://${ATELIER_REDIS_HOST}:6379/0", backend_url="redis://x/1")
    assert config.task_processor_config().adapter_config.broker_url == "redis://redis.internal:6379/0"


@pytest.mark.parametrize("path", ["serve_config.yaml", "configs/local.yaml"])
def test_every_model_section_validates_and_fits_its_resources(path):
    from deployments.llm.contract import GemmaConfig
    from deployments.sdxl.deployment import SDXLConfig
    from deployments.svd.deployment import SVDConfig
    from deployments.upscaler.deployment import UpscalerConfig

    app = yaml.safe_load((REPO / path).read_text())["applications"][0]
    args = AtelierArgs.model_validate(app["args"])
    deployments = {d["name"]: d for d in app["deployments"]}
    gpu_total = 0.0
    for name, cls, section in (("SDXLDeployment", SDXLConfig, args.sdxl), ("SVDDeployment", SVDConfig, args.svd),
                               ("UpscalerDeployment", UpscalerConfig, args.upscaler)):
        config = cls.model_validate(section)
        gpus = deployments[name].get("ray_actor_options", {}).get("num_gpus", 0)
        gpu_total += gpus
        if config.gpu_memory_fraction is not None:
            assert config.gpu_memory_fraction <= gpus, name
    llm = GemmaConfig.model_validate(args.llm)
    llm_gpus = sum(b.get("GPU", 0) for b in (llm.placement_group_config or {}).get("bundles", []))
    gpu_total += llm_gpus
    if llm_gpus:
        assert llm.engine_kwargs["gpu_memory_utilization"] <= llm_gpus
    # One replica of each model fits on one GPU (production) or on no GPU (local).
    assert gpu_total <= 1.0 + 1e-9
    if path == "serve_config.yaml":
        assert args.svd["model"] == "stabilityai/stable-video-diffusion-img2vid-xt"
        assert args.upscaler["model"] == "stabilityai/stable-diffusion-x4-upscaler"
        assert args.llm["model_source"].startswith("google/gemma")
        assert gpu_total > 0.9


MODEL_DEPLOYMENTS = ("SDXLDeployment", "SVDDeployment", "UpscalerDeployment")


def serve_options(path: str) -> dict[str, dict]:
    """Each deployment's Serve options by name: the `deployments:` entries, and Gemma's from the LLM
    config's deployment_config (ray.serve.llm builds that deployment from it)."""
    app = yaml.safe_load((REPO / path).read_text())["applications"][0]
    options = {d["name"]: d for d in app["deployments"]}
    options["GemmaDeployment"] = app["args"]["llm"]["deployment_config"]
    return options


@pytest.mark.parametrize("path", ["serve_config.yaml", "configs/local.yaml"])
def test_every_deployment_bounds_its_ongoing_and_queued_requests(path):
    options = serve_options(path)
    for name in (*MODEL_DEPLOYMENTS, "GemmaDeployment", "IngressDeployment", "JobRunnerDeployment"):
        assert options[name].get("max_ongoing_requests", 0) >= 1, name
        # -1 (Serve's default) queues without bound: a bound is what turns overload into a 503
        assert options[name].get("max_queued_requests", -1) >= 1, name
    # The ingress admits more than any one model, so the models refuse first, in the JSON error shape.
    ingress = options["IngressDeployment"]["max_ongoing_requests"]
    assert all(options[name]["max_ongoing_requests"] < ingress for name in (*MODEL_DEPLOYMENTS, "GemmaDeployment"))


@pytest.mark.parametrize("path", ["serve_config.yaml", "configs/local.yaml"])
def test_job_runner_serve_concurrency_is_the_queue_concurrency(path):
    # Serve sizes the task consumer's thread pool with max_ongoing_requests; the config's value wins
    # over api.app's, so the two must agree.
    args = AtelierArgs.model_validate(yaml.safe_load((REPO / path).read_text())["applications"][0]["args"])
    assert serve_options(path)["JobRunnerDeployment"]["max_ongoing_requests"] == args.queue.concurrency


@pytest.mark.parametrize("path", ["serve_config.yaml", "configs/local.yaml"])
def test_refusals_past_max_queued_requests_carry_retry_after(path):
    """What Serve answers with these configs when a queue is full: the proxy's own response for the
    ingress (get_http_response_status is what the proxy calls), the BackPressureError the ingress
    turns into JSON for the models."""
    from ray.serve._private.config import DeploymentConfig
    from ray.serve._private.http_util import get_http_response_status
    from ray.serve.exceptions import BackPressureError

    for name, options in serve_options(path).items():
        if name == "JobRunnerDeployment":  # fed by the queue; no HTTP or handle caller queues at it
            continue
        config = DeploymentConfig(**{k: v for k, v in options.items() if k in ("max_queued_requests",
                                                                                 "backpressure_config")})
        refused = BackPressureError(num_queued_requests=config.max_queued_requests,
                                    max_queued_requests=config.max_queued_requests,
                                    status_code=config.backpressure_config.status_code,
                                    retry_after_s=config.backpressure_config.retry_after_s)
        status = get_http_response_status(refused, None, "request-id")
        assert status.code in (503, 429), name
        assert int(dict(status.headers or [])[b"retry-after"]) >= 1, f"{name}: no Retry-After"
