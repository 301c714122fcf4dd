"""`serve deploy` of a broken config fails with the cause in `serve status`, not a silent crash loop."""

from __future__ import annotations

import copy

import pytest

from local.cluster import wait_for

pytestmark = pytest.mark.serve


def _broken_app(atelier, name: str, prefix: str, **args_update) -> dict:
    app = copy.deepcopy(atelier.config()["applications"][0])
    app["name"], app["route_prefix"] = name, prefix
    for section, values in args_update.items():
        app["args"][section] = {**app["args"][section], **values}
    for deployment in app["deployments"]:  # one small replica each: these apps only have to fail
        deployment.pop("autoscaling_config", None)
        deployment["num_replicas"] = 1
    return app


def test_missing_model_and_unreachable_redis_fail_with_a_clear_status(atelier):
    cluster = atelier.cluster
    missing = _broken_app(atelier, "missing-model", "/broken-model", sdxl={"model": "models/tiny/no-such-model"})
    no_redis = _broken_app(atelier, "no-redis", "/broken-redis",
                           queue={"broker_url": "redis://127.0.0.1:9/0", "backend_url": "redis://127.0.0.1:9/1"})
    try:
        atelier.deploy(atelier.config(extra_apps=[missing, no_redis]), "faults.yaml")

        def failed(app):
            status = cluster.serve_status()["applications"].get(app) or {}
            return status if status.get("status") in ("DEPLOY_FAILED", "UNHEALTHY") else None

        model = wait_for(lambda: failed("missing-model"), 300, 2, "missing-model DEPLOY_FAILED")
        redis = wait_for(lambda: failed("no-redis"), 300, 2, "no-redis DEPLOY_FAILED")
        model_text = str(model)
        redis_text = str(redis)
        print(f"\n[faults] missing model: {model['status']}: {model_text[-600:]}")
        print(f"[faults] unreachable redis: {redis['status']}: {redis_text[-600:]}")
        assert "no-such-model" in model_text, model
        assert "Redis broker at 127.0.0.1:9 is unreachable" in redis_text, redis
        # the good app is untouched
        assert cluster.serve_status()["applications"]["atelier"]["status"] == "RUNNING"
    finally:
        atelier.deploy()
        wait_for(lambda: set(cluster.serve_status()["applications"]) == {"atelier"}, 120, 2, "broken apps removed")
