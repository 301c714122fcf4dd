"""Two local Ray nodes (local/cluster.py), Redis, moto S3, and Atelier deployed with `serve deploy`.

Started once for the package: the cluster, Redis and S3 (`cluster`), then the app from
configs/cluster.yaml (`atelier`). The tests run in file order and leave the app as they found it
(2 nodes, the base config RUNNING); the node-loss test restarts the worker node before it ends.

Redis: Debian's `redis-server` (`make redis` installs it). Without it these tests skip, except
under CI=true, where they fail.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import pytest
import yaml

from local.cluster import REPO, LocalCluster, RedisServer, build_bundle, free_port, wait_for
from tests.cluster.helpers import report
from tests.s3_server import S3Server

S3_BUCKET = "atelier-cluster"
CONFIG = REPO / "configs" / "cluster.yaml"


def _require_redis() -> None:
    if RedisServer.executable() is None:
        reason = "redis-server is not installed (`make redis` installs Debian's redis-server)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason + "; under CI the two-node cluster tests must run")
        pytest.skip(reason)


class ClusterApp:
    """The deployed app: its URL (through whichever node's proxy the kernel picks: both proxies
    listen on the same port with SO_REUSEPORT), `serve deploy` of a config, and the waits."""

    def __init__(self, cluster: LocalCluster, bundle_uri: str, scratch: Path, port: int):
        self.cluster = cluster
        self.bundle_uri = bundle_uri
        self.scratch = scratch
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"

    def config(self, deployments_update: dict[str, dict] | None = None, args_update: dict | None = None,
               extra_apps: list[dict] | None = None) -> dict:
        config = yaml.safe_load(CONFIG.read_text())
        config["http_options"]["port"] = self.port
        app = config["applications"][0]
        app["runtime_env"]["working_dir"] = self.bundle_uri
        app["args"]["ingress"]["fine_tuning"]["runtime_env"]["working_dir"] = self.bundle_uri
        for section, values in (args_update or {}).items():
            app["args"][section] = {**app["args"].get(section, {}), **values} if isinstance(values, dict) else values
        for deployment in app["deployments"]:
            for key, value in ((deployments_update or {}).get(deployment["name"]) or {}).items():
                if isinstance(value, dict) and isinstance(deployment.get(key), dict):
                    deployment[key] = {**deployment[key], **value}
                else:
                    deployment[key] = value
        config["applications"] += extra_apps or []
        return config

    def deploy(self, config: dict | None = None, name: str = "config.yaml") -> None:
        """`serve deploy` of a config file, as ops would (from the checkout: the CLI validates the
        config, importing the autoscaling policy; the nodes get the code from the bundle URI)."""
        path = self.scratch / name
        path.write_text(yaml.safe_dump(config or self.config(), sort_keys=False))
        self.cluster.cli("serve", "deploy", str(path), "-a", self.cluster.dashboard_url, timeout_s=300)

    def app_status(self, app: str = "atelier") -> dict:
        return (self.cluster.serve_details().get("applications") or {}).get(app) or {}

    def wait_running(self, timeout_s: float = 300, app: str = "atelier") -> dict:
        def running():
            status = self.app_status(app)
            if status.get("status") in ("DEPLOY_FAILED", "UNHEALTHY"):  # Serve may still recover: poll on
                raise AssertionError(f"{app}: {status.get('status')}: {status.get('message')}; " + "; ".join(
                    f"{name}: {d.get('status')}: {d.get('message')}" for name, d in status.get("deployments", {}).items()
                    if d.get("status") != "HEALTHY"))
            return status if status.get("status") == "RUNNING" else None

        return wait_for(running, timeout_s, 1, f"application {app} RUNNING")

    def target_replicas(self, deployment: str, app: str = "atelier") -> int:
        """How many replicas Serve wants of `deployment` now (its autoscaler's decision)."""
        return int((self.app_status(app).get("deployments", {}).get(deployment) or {}).get("target_num_replicas") or 0)

    def wait_spread(self, deployment: str, per_node: dict[str, int], timeout_s: float = 180) -> dict[str, int]:
        return wait_for(lambda: (lambda c: c if c == per_node else None)(self.cluster.replicas_by_node(deployment)),
                        timeout_s, 1, f"{deployment} replicas {per_node}")

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=120, **kwargs)


@pytest.fixture(scope="package")
def cluster(tmp_path_factory):
    _require_redis()
    scratch = tmp_path_factory.mktemp("cluster")
    started = time.monotonic()
    s3 = S3Server(subprocess=True).start()
    redis = cluster = None
    try:
        s3.make_bucket(S3_BUCKET)
        redis = RedisServer(scratch / "redis").start()
        cluster = LocalCluster(extra_env={**s3.env(), "ATELIER_REDIS_HOST": f"127.0.0.1:{redis.port}"})
        cluster.s3, cluster.redis, cluster.scratch = s3, redis, scratch
        cluster.start()
        report(f"[cluster] 2 nodes, redis and S3 up in {time.monotonic() - started:.1f}s")
        yield cluster
    finally:
        if cluster is not None:
            cluster.stop(keep_logs=scratch / "ray-logs")  # under pytest's tmp dir, for a failed run
        if redis is not None:
            redis.stop()
        s3.stop()


@pytest.fixture(scope="package")
def atelier(cluster) -> ClusterApp:
    started = time.monotonic()
    bundle = build_bundle(cluster.scratch / "dist", models=("models/tiny/sdxl",))
    key = f"releases/{bundle.name}"
    cluster.s3.client().upload_file(str(bundle), S3_BUCKET, key)
    app = ClusterApp(cluster, f"s3://{S3_BUCKET}/{key}", cluster.scratch, free_port())
    app.deploy()
    app.wait_running(timeout_s=400)
    app.wait_spread("SDXLDeployment", {"node_a": 1, "node_b": 1})
    report(f"[cluster] serve deploy to RUNNING, spread on both nodes, in {time.monotonic() - started:.1f}s")
    return app


def pytest_terminal_summary(terminalreporter):
    from tests.cluster.helpers import FIGURES

    if FIGURES:
        terminalreporter.section("two-node cluster: figures")
        for line in FIGURES:
            terminalreporter.write_line(line)


@pytest.fixture(scope="package")
def dataset_id(atelier) -> str:
    """One small dataset on S3 for the package's fine-tuning runs."""
    from tests.cluster.helpers import make_dataset

    with atelier.client() as client:
        return make_dataset(client)
