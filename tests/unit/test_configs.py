"""Both configs are valid Ray Serve configs whose args build the app, as typed config objects."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ValidationError
from ray.serve.schema import ServeDeploySchema

import api.app
from api.app import SPECS, AtelierArgs, model_limits
from api.config import IngressConfig
from graphs.job_runner import JobQueueConfig

REPO = Path(__file__).resolve().parents[2]
CONFIGS = ["serve_config.yaml", "configs/local.yaml"]


def app_args(path: str) -> dict:
    return yaml.safe_load((REPO / path).read_text())["applications"][0]["args"]


def minimal_args(tmp_path: Path, **sections) -> dict:
    return {"base_dir": str(tmp_path), "storage_root": "var/storage",
            "queue": {"broker_url": "sqla+sqlite:///var/queue/broker.db", "backend_url": "db+sqlite:///var/q/r.db"},
            "sdxl": {"model": "models/tiny/sdxl"}, **sections}


@pytest.mark.parametrize("path", CONFIGS)
def test_config_validates_against_ray_serve_schema(path):
    config = yaml.safe_load((REPO / path).read_text())
    schema = ServeDeploySchema.model_validate(config) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(config)
    app = schema.applications[0]
    # production builds the app as is; the local default has the tiny models built first
    assert app.import_path == {"serve_config.yaml": "api.app:build_app",
                               "configs/local.yaml": "local.app:build_app"}[path]
    names = {d.name for d in app.deployments}
    assert {"SDXLDeployment", "JobRunnerDeployment", "IngressDeployment"} <= names
    AtelierArgs.model_validate(app.args)


def test_the_model_sections_come_from_the_model_packages():
    # Each deployments/<name>/__init__.py declares its SPEC; the config keys stay what they were.
    assert set(SPECS) == {"sdxl", "svd", "upscaler", "llm"}
    assert list(SPECS)[0] == "sdxl" and SPECS["sdxl"].required
    for name, spec in SPECS.items():
        field = AtelierArgs.model_fields[name]
        assert field.is_required() == spec.required, name


@pytest.mark.parametrize("path", CONFIGS)
def test_every_section_is_its_typed_config(path):
    args = AtelierArgs.model_validate(app_args(path))
    for name, spec in SPECS.items():
        assert isinstance(getattr(args, name), spec.config_cls), name
    assert isinstance(args.queue, JobQueueConfig)
    assert isinstance(args.ingress, IngressConfig)


@pytest.mark.parametrize("path", CONFIGS)
def test_storage_and_queue_are_filled_into_the_sections_that_take_them(path):
    args = AtelierArgs.model_validate(app_args(path))
    for name, spec in SPECS.items():
        if spec.takes_storage:
            section = getattr(args, name)
            assert (section.storage_root, section.storage_options) == (args.storage_root, args.storage_options), name
    assert args.ingress.storage_root == args.storage_root
    assert args.ingress.queue == args.queue
    if "llm" in IngressConfig.model_fields:  # the ingress refines prompts with the deployed Gemma
        assert args.ingress.llm == args.llm


def test_the_apps_storage_wins_over_a_sections_own(tmp_path):
    args = AtelierArgs.model_validate(minimal_args(
        tmp_path, sdxl={"model": "m", "storage_root": "elsewhere"}, ingress={"storage_root": "elsewhere"}))
    assert args.sdxl.storage_root == args.ingress.storage_root == "var/storage"


def test_a_bad_value_is_refused_where_it_is_written(tmp_path):
    with pytest.raises(ValidationError) as refused:
        AtelierArgs.model_validate(minimal_args(tmp_path, sdxl={"model": "m", "max_steps": "many"}))
    assert ("sdxl", "max_steps") in [error["loc"] for error in refused.value.errors()]


def test_sdxl_is_required_and_the_other_models_are_optional(tmp_path):
    args = minimal_args(tmp_path)
    del args["sdxl"]
    with pytest.raises(ValidationError):
        AtelierArgs.model_validate(args)
    args = AtelierArgs.model_validate(minimal_args(tmp_path))
    assert all(getattr(args, name) is None for name in SPECS if name != "sdxl")


@pytest.mark.parametrize("name", sorted(SPECS))
def test_unknown_keys_in_a_section_get_what_its_config_class_gives_them(tmp_path, name):
    spec = SPECS[name]
    section = {**app_args("configs/local.yaml")[name], "not_a_setting": 1}
    try:
        spec.config_cls.model_validate(section)
    except ValidationError:
        with pytest.raises(ValidationError):
            AtelierArgs.model_validate(minimal_args(tmp_path, **{name: section}))
    else:  # pydantic's default: ignored
        args = AtelierArgs.model_validate(minimal_args(tmp_path, **{name: section}))
        assert "not_a_setting" not in getattr(args, name).model_dump()


def test_production_config_uses_real_models_gpus_s3_and_redis():
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    app = config["applications"][0]
    args = AtelierArgs.model_validate(app["args"])
    assert args.sdxl.model == "stabilityai/stable-diffusion-xl-base-1.0"
    assert args.sdxl.dtype == "float16"
    assert args.storage_root.startswith("s3://")
    assert args.queue.broker_url.startswith("redis://")
    assert args.ingress.auth.mode == "keys"
    sdxl = next(d for d in app["deployments"] if d["name"] == "SDXLDeployment")
    assert 0 < sdxl["ray_actor_options"]["num_gpus"] < 1
    assert sdxl["autoscaling_config"]["max_replicas"] > sdxl["autoscaling_config"]["min_replicas"]
    assert args.sdxl.gpu_memory_fraction <= sdxl["ray_actor_options"]["num_gpus"]


def test_relative_paths_resolve_against_base_dir(tmp_path):
    (tmp_path / "models" / "tiny" / "sdxl").mkdir(parents=True)
    (tmp_path / "models" / "tiny" / "gemma").mkdir(parents=True)
    args = AtelierArgs.model_validate(minimal_args(
        tmp_path, llm={"model_source": "models/tiny/gemma"})).resolved()
    assert args.storage_root == str(tmp_path / "var" / "storage")
    assert args.sdxl.model == str(tmp_path / "models" / "tiny" / "sdxl")
    assert args.llm.model_source == str(tmp_path / "models" / "tiny" / "gemma")  # the spec's model_field
    assert args.queue.broker_url == f"sqla+sqlite:///{tmp_path}/var/queue/broker.db"
    assert (tmp_path / "var" / "queue").is_dir()
    # the sections see the resolved storage and queue
    assert args.sdxl.storage_root == args.ingress.storage_root == args.storage_root
    assert args.ingress.queue.broker_url == args.queue.broker_url


def test_models_shipped_in_a_working_dir_stay_relative(tmp_path, monkeypatch):
    """Under a runtime_env working_dir each node unpacks its own copy (each replica's cwd): a relative
    model path must not become the building node's absolute path. Local storage still resolves."""
    import api.app

    (tmp_path / "models" / "tiny" / "sdxl").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(api.app, "shipped_working_dir", lambda: "s3://bucket/releases/atelier-1.zip")
    args = minimal_args(tmp_path)
    del args["base_dir"]
    shipped = AtelierArgs.model_validate(args).resolved()
    assert shipped.sdxl.model == "models/tiny/sdxl"
    assert shipped.storage_root == str(tmp_path / "var" / "storage")
    # an explicit base_dir still pins every path to it, shipped or not
    pinned = AtelierArgs.model_validate(minimal_args(tmp_path)).resolved()
    assert pinned.sdxl.model == str(tmp_path / "models" / "tiny" / "sdxl")
    # and without a working_dir (a checkout on each node), relative paths resolve against the cwd
    monkeypatch.setattr(api.app, "shipped_working_dir", lambda: None)
    assert AtelierArgs.model_validate(args).resolved().sdxl.model == str(tmp_path / "models" / "tiny" / "sdxl")


def test_outside_ray_nothing_counts_as_shipped():
    from api.app import shipped_working_dir

    assert shipped_working_dir() is None


def test_hub_ids_and_urls_are_left_alone(tmp_path):
    args = AtelierArgs.model_validate({
        "base_dir": str(tmp_path), "storage_root": "s3://bucket/prefix",
        "queue": {"broker_url": "redis://${HOST}:6379/0", "backend_url": "redis://${HOST}:6379/1"},
        "sdxl": {"model": "stabilityai/stable-diffusion-xl-base-1.0"},
    }).resolved()
    assert args.storage_root == "s3://bucket/prefix"
    assert args.sdxl.model == "stabilityai/stable-diffusion-xl-base-1.0"
    assert args.queue.broker_url == "redis://${HOST}:6379/0"


def test_queue_urls_expand_environment_variables(monkeypatch):
    monkeypatch.setenv("ATELIER_REDIS_HOST", "redis.internal")
    config = JobQueueConfig(broker_url="redis://${ATELIER_REDIS_HOST}:6379/0", backend_url="redis://x/1")
    assert config.task_processor_config().adapter_config.broker_url == "redis://redis.internal:6379/0"


def test_model_limits_are_derived_once_from_the_typed_sections(tmp_path):
    # SDXL and Gemma: limits from the config alone (the diffusion models' read their model's files).
    args = AtelierArgs.model_validate(minimal_args(tmp_path, llm={"model_source": "hub/gemma"}))
    limits = model_limits(args)
    assert set(limits) == {name for name in ("sdxl", "llm") if SPECS[name].limits_cls}
    for name, value in limits.items():
        assert isinstance(value, SPECS[name].limits_cls)
    assert limits["sdxl"].max_steps == args.sdxl.max_steps
    assert limits["sdxl"].styles  # the presets of configs/styles.yaml, loaded when the app is built


def test_build_app_binds_each_present_section_and_hands_the_ingress_its_limits(monkeypatch, tmp_path):
    bound = {}
    for name, spec in SPECS.items():
        monkeypatch.setitem(SPECS, name, replace(spec, bind=lambda config, name=name: bound.setdefault(name, config)))

    (tmp_path / "models" / "tiny" / "sdxl").mkdir(parents=True)
    app = api.app.build_app(minimal_args(tmp_path, llm={"model_source": "hub/gemma"}))
    (config,), wiring = app._bound_deployment.init_args, app._bound_deployment.init_kwargs  # the real ingress's
    assert set(bound) == {"sdxl", "llm"}
    assert isinstance(bound["sdxl"], SPECS["sdxl"].config_cls)
    assert bound["sdxl"].model == str(tmp_path / "models" / "tiny" / "sdxl")
    assert bound["sdxl"].storage_root == config.storage_root == str(tmp_path / "var" / "storage")
    assert isinstance(config, IngressConfig)
    # every spec's handle by name, None where its section is left out
    assert {name: wiring[name] for name in SPECS} == {name: bound.get(name) for name in SPECS}
    assert wiring["job_runner"] is not None
    # a runner stopped by Serve waits for its jobs (queue.drain_s) before Serve kills it
    runner_config = wiring["job_runner"]._bound_deployment._deployment_config
    assert runner_config.graceful_shutdown_timeout_s == JobQueueConfig.model_fields['drain_s'].default + 15
    assert set(wiring["limits"]) == {name for name in bound if SPECS[name].limits_cls}
    assert wiring["limits"]["sdxl"].source == bound["sdxl"].model  # derived after the paths resolve
    assert all(isinstance(value, BaseModel) for value in wiring["limits"].values())


@pytest.mark.parametrize("path", CONFIGS)
def test_every_model_section_validates_and_fits_its_resources(path):
    app = yaml.safe_load((REPO / path).read_text())["applications"][0]
    args = AtelierArgs.model_validate(app["args"])
    deployments = {d["name"]: d for d in app["deployments"]}
    gpu_total = 0.0
    for name, section in (("SDXLDeployment", args.sdxl), ("SVDDeployment", args.svd),
                          ("UpscalerDeployment", args.upscaler)):
        gpus = deployments[name].get("ray_actor_options", {}).get("num_gpus", 0)
        gpu_total += gpus
        if section.gpu_memory_fraction is not None:
            assert section.gpu_memory_fraction <= gpus, name
    llm = args.llm
    llm_gpus = sum(b.get("GPU", 0) for b in (llm.placement_group_config or {}).get("bundles", []))
    gpu_total += llm_gpus
    if llm_gpus:
        assert llm.engine_kwargs["gpu_memory_utilization"] <= llm_gpus
    # One replica of each model fits on one GPU (production) or on no GPU (local).
    assert gpu_total <= 1.0 + 1e-9
    if path == "serve_config.yaml":
        assert args.svd.model == "stabilityai/stable-video-diffusion-img2vid-xt"
        assert args.upscaler.model == "stabilityai/stable-diffusion-x4-upscaler"
        assert args.llm.model_source == "google/gemma-3-4b-it"
        assert gpu_total > 0.9


@pytest.mark.parametrize("path", CONFIGS)
def test_the_language_model_is_gemma_3_and_takes_the_images_a_request_may_carry(path):
    """Both configs serve Gemma 3 (multimodal): vLLM's image limit covers what the API lets one chat
    request carry, and the context holds that many images (mm_tokens_per_image each, plus the
    "\n\n<start_of_image>" and "<end_of_image>\n\n" around them) with room to spare."""
    from local.tiny_models import GEMMA3

    llm = AtelierArgs.model_validate(app_args(path)).llm
    images = llm.engine_kwargs["limit_mm_per_prompt"]["image"]
    assert images >= getattr(llm, "max_images", 1) >= 1
    local = path == "configs/local.yaml"
    assert llm.model_source == ("models/tiny/gemma" if local else "google/gemma-3-4b-it")
    tokens_per_image = GEMMA3["tiny" if local else "full"]["mm_tokens_per_image"]  # 16, and the 4B's 256
    assert images * (tokens_per_image + 4) <= llm.max_model_len // 2


MODEL_DEPLOYMENTS = ("SDXLDeployment", "SVDDeployment", "UpscalerDeployment")


def serve_options(path: str) -> dict[str, dict]:
    """Each deployment's Serve options by name: the `deployments:` entries, and Gemma's from the LLM
    config's deployment_config (ray.serve.llm builds that deployment from it)."""
    app = yaml.safe_load((REPO / path).read_text())["applications"][0]
    options = {d["name"]: d for d in app["deployments"]}
    options["GemmaDeployment"] = app["args"]["llm"]["deployment_config"]
    return options


@pytest.mark.parametrize("path", CONFIGS)
def test_every_deployment_bounds_its_ongoing_and_queued_requests(path):
    options = serve_options(path)
    for name in (*MODEL_DEPLOYMENTS, "GemmaDeployment", "IngressDeployment", "JobRunnerDeployment"):
        assert options[name].get("max_ongoing_requests", 0) >= 1, name
        # -1 (Serve's default) queues without bound: a bound is what turns overload into a 503
        assert options[name].get("max_queued_requests", -1) >= 1, name
    # The ingress admits more than any one model, so the models refuse first, in the JSON error shape.
    ingress = options["IngressDeployment"]["max_ongoing_requests"]
    assert all(options[name]["max_ongoing_requests"] < ingress for name in (*MODEL_DEPLOYMENTS, "GemmaDeployment"))


@pytest.mark.parametrize("path", CONFIGS)
def test_job_runner_serve_concurrency_is_the_queue_concurrency(path):
    # Serve sizes the task consumer's thread pool with max_ongoing_requests; the config's value wins
    # over api.app's, so the two must agree.
    args = AtelierArgs.model_validate(app_args(path))
    assert serve_options(path)["JobRunnerDeployment"]["max_ongoing_requests"] == args.queue.concurrency


@pytest.mark.parametrize("path", CONFIGS)
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


def test_configs_holds_configuration_only():
    code = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.py"))
    assert code == ["configs/__init__.py"], code
    init = (REPO / "configs" / "__init__.py").read_text()
    assert compile(init, "configs/__init__.py", "exec").co_names in ((), ("__doc__",)), "code in configs/__init__.py"


def test_the_yaml_the_code_reads_is_where_it_looks():
    from deployments.styles import DEFAULT_STYLES_FILE, load_styles

    assert DEFAULT_STYLES_FILE == REPO / "configs" / "styles.yaml"
    assert load_styles(None)
    assert sorted(p.name for p in (REPO / "configs" / "training").glob("*.yaml")) == ["sdxl-lora.yaml",
                                                                                       "tiny-lora.yaml"]


def test_the_local_builder_builds_missing_tiny_models_and_production_never_does(monkeypatch, tmp_path):
    import local.app

    built = []
    monkeypatch.setattr(local.app, "ensure_tiny_models", built.append)
    args = minimal_args(tmp_path)
    args["tiny_models_dir"] = "models/tiny"
    (tmp_path / "models" / "tiny" / "sdxl").mkdir(parents=True)
    api.app.build_app(args)
    assert built == []
    local.app.build_app(args)
    assert built == [str(tmp_path / "models" / "tiny")]


def test_production_limits_are_derived_from_the_config_alone():
    """serve_config.yaml names hub ids: what the weights decide is stated, so the app builds offline."""
    limits = model_limits(AtelierArgs.model_validate(app_args("serve_config.yaml")))
    assert set(limits) == {"sdxl", "svd", "upscaler", "llm"}
    assert (limits["svd"].max_num_frames, limits["upscaler"].scale, limits["upscaler"].max_noise_level) == (25, 4, 350)


@pytest.mark.parametrize("path", [p for p in (*CONFIGS, "configs/cluster.yaml") if "JobRunnerDeployment" in (REPO / p).read_text()])
def test_a_configured_runner_outlasts_its_drain(path):
    app = yaml.safe_load((REPO / path).read_text())["applications"][0]
    drain = app["args"]["queue"].get("drain_s", JobQueueConfig.model_fields["drain_s"].default)
    runner = next(d for d in app.get("deployments", []) if d["name"] == "JobRunnerDeployment")
    assert runner.get("graceful_shutdown_timeout_s", drain + 15) > drain
