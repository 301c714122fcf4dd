"""Runs configs/local.yaml with `serve run` in a subprocess, isolated in a scratch folder.

Used by the serve tests and the benchmarks: storage, queue and HTTP port point at the scratch
folder and a free port, so a run never touches `var/` or a `make serve` on port 8000.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The app's optional model sections and the deployments they bring (each model's SPEC in
# deployments/<name>/__init__.py; api/app.py types and binds them).
MODEL_DEPLOYMENTS = {"svd": "SVDDeployment", "upscaler": "UpscalerDeployment", "llm": "GemmaDeployment"}


def isolated_local_config(scratch: Path, port: int, args_update: dict | None = None,
                          deployments_update: dict[str, dict] | None = None) -> Path:
    config = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())
    config["http_options"]["port"] = port
    args = config["applications"][0]["args"]
    args["base_dir"] = str(REPO)
    args["storage_root"] = str(scratch / "storage")
    args["queue"]["broker_url"] = f"sqla+sqlite:///{scratch}/queue/broker.db"
    args["queue"]["backend_url"] = f"db+sqlite:///{scratch}/queue/results.db"
    for section, values in (args_update or {}).items():
        args[section] = {**args.get(section, {}), **values} if isinstance(values, dict) else values
    # A model section set to None deploys no such model, so its deployment's settings go too;
    # so does a deployment whose update is None.
    dropped = {name for section, name in MODEL_DEPLOYMENTS.items() if section in args and args[section] is None}
    dropped |= {name for name, values in (deployments_update or {}).items() if values is None}
    app = config["applications"][0]
    app["deployments"] = [d for d in app["deployments"] if d["name"] not in dropped]
    for deployment in app["deployments"]:
        deployment.update((deployments_update or {}).get(deployment["name"]) or {})
    path = scratch / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# Logical CPUs of the local Ray node, at least 4 (as `make serve` sets them): the replicas of configs/local.yaml
# reserve about 1.3 CPUs but mostly idle, and a fine-tuning run needs a whole CPU beside them
# for Ray Data's internal tasks, which a 2-core machine would not have left.
LOCAL_RAY_RESOURCES = json.dumps({"CPU": max(4, os.cpu_count() or 1)})

RAY_ENV_FILE = REPO / "configs" / "ray.env"


def ray_env(overrides: dict[str, str] | None = None) -> dict[str, str]:
    """configs/ray.env (Serve's ingress and data-plane settings, read when Ray's processes start),
    under what the environment already sets, under `overrides`: what every Ray node we start gets."""
    from dotenv import dotenv_values

    file = {name: value for name, value in dotenv_values(RAY_ENV_FILE).items() if value is not None}
    return {**file, **{name: os.environ[name] for name in file if name in os.environ}, **(overrides or {})}


def haproxy_ports() -> dict[str, str]:
    """HAProxy's metrics and stats listeners on free ports: Serve binds them on 0.0.0.0:9101 and
    :8404 on every node, so a second Ray node or instance on this machine (a two-node test
    cluster, `make serve` beside the tests) would fail to start its HAProxy."""
    return {"RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()), "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port())}


def session_pids(session_id: int) -> set[int]:
    """Every live process of a session (a process started with start_new_session=True, and all it
    started). Ray moves some of its processes into process groups of their own, and HAProxy
    outlives the Serve actor that started it, so killing the group alone can leave them running."""
    import psutil

    pids = set()
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == session_id:
                pids.add(proc.pid)
        except OSError:
            pass
    return pids


def kill_session(session_id: int) -> None:
    for pid in session_pids(session_id):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def init_local_ray(num_cpus: int = 2, attempts: int = 6, for_training: bool = False) -> None:
    """`ray.init` of a throwaway local node for tests and benchmarks, quiet and without a dashboard.

    The raylet can miss ray.init's fixed 30 s start window on a loaded 2-core machine: retry.
    `for_training`: without a dashboard, Ray Train's placement-group cleaner can query another
    Ray cluster on this host and remove this run's placement group; a state API address that
    refuses connections makes it fail safe.
    """
    import ray

    if for_training:
        os.environ.setdefault("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:9")
    for attempt in range(attempts):
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
            break
        except Exception:
            ray.shutdown()
            if attempt == attempts - 1:
                raise
            time.sleep(5)
    ray.data.DataContext.get_current().enable_progress_bars = False


class _RayStartFailed(RuntimeError):
    pass


class LocalServeApp:
    def __init__(self, scratch: Path, args_update: dict | None = None,
                 deployments_update: dict[str, dict] | None = None, ready_timeout_s: float = 600,
                 ray_env_overrides: dict[str, str] | None = None):
        scratch.mkdir(parents=True, exist_ok=True)
        self.ray_env_overrides = ray_env_overrides
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.config_path = isolated_local_config(scratch, self.port, args_update, deployments_update)
        self.log_path = scratch / "serve.log"
        self.ready_timeout_s = ready_timeout_s
        self.process: subprocess.Popen | None = None

    def start(self, attempts: int = 3) -> "LocalServeApp":
        if self.process is None and getattr(self, "_address", "unset") != "unset":
            return self  # attached to a running app
        """Start and wait for /readyz. Ray's own node start has fixed internal deadlines that a
        loaded machine can miss ("node timed out during startup"); that case is retried."""
        for attempt in range(1, attempts + 1):
            try:
                return self._start_once()
            except _RayStartFailed:
                if attempt == attempts:
                    raise
                time.sleep(5)
        return self

    def _start_once(self) -> "LocalServeApp":
        bin_dir = Path(sys.executable).parent
        # A throwaway instance for tests and benchmarks: token auth off, so a test driver can join it
        # by address (Ray only turns token auth on for drivers that find a cluster via "auto").
        # Its own Ray temp dir, holding its own "current cluster" file (written once it is up): Ray's
        # job supervisor finds the cluster a job's driver joins by address "auto", which without that
        # file means any gcs_server process on the machine. With another Ray instance running, a
        # fine-tuning job's driver joined that one instead (CI, 2026-12-04: "Authentication token is
        # missing or incorrect" from a token-auth cluster that was not ours).
        self.ray_tmpdir = tempfile.mkdtemp(prefix="atl-ray-", dir="/tmp")
        # configs/ray.env, with HAProxy's metrics and stats on ports of this instance's own
        env = {**os.environ, **ray_env(self.ray_env_overrides), **haproxy_ports(),
               "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "disabled",
               "RAY_TMPDIR": self.ray_tmpdir,
               "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
               "RAY_OVERRIDE_RESOURCES": os.environ.get("RAY_OVERRIDE_RESOURCES", LOCAL_RAY_RESOURCES)}
        self.process = subprocess.Popen(
            [str(bin_dir / "serve"), "run", str(self.config_path)], cwd=REPO, env=env,
            stdout=open(self.log_path, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                log = self.log_tail()
                failed = _RayStartFailed if "timed out during startup" in log else RuntimeError
                raise failed(f"serve run exited early:\n{log}")
            try:
                # /readyz: every model replica answers, not only the ingress
                if httpx.get(f"{self.base_url}/readyz", timeout=10).status_code == 200:
                    from ray._private.utils import write_ray_address

                    write_ray_address(self.ray_address(), os.path.join(self.ray_tmpdir, "ray"))
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"app not ready after {self.ready_timeout_s}s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def ray_address(self) -> str:
        """The GCS address of the Ray instance this `serve run` started, for `ray.init(address=...)`
        (address="auto" is ambiguous when several instances run on one machine)."""
        import psutil

        if getattr(self, "_address", None):
            return self._address
        for child in psutil.Process(self.process.pid).children(recursive=True):
            cmdline = child.cmdline()
            if cmdline and cmdline[0].endswith("gcs_server"):
                ip = next(a.split("=", 1)[1] for a in cmdline if a.startswith("--node-ip-address="))
                port = next(c.laddr.port for c in child.net_connections("tcp") if c.status == psutil.CONN_LISTEN)
                return f"{ip}:{port}"
        raise RuntimeError("no gcs_server under this serve run")

    def connect_ray(self):
        """`ray.init` as a driver of this app's Ray instance (tests: kill replicas, read counters)."""
        import ray

        ray.init(address=self.ray_address(), namespace="serve", log_to_driver=False)
        return ray

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                # `serve run` asked to stop has always sat out the full wait here (60 s in every suite
                # run), so the group is killed sooner; its Ray processes are in the same group.
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.process is not None:
            kill_session(self.process.pid)  # what left the group: Ray's own groups, HAProxy

    @classmethod
    def attached(cls, spec: str) -> "LocalServeApp":
        """An app that is already running, from "BASE_URL[,RAY_ADDRESS]": lets a developer iterate on
        serve tests without the start-up (ATELIER_TEST_APP; see tests/serve/conftest.py)."""
        base_url, _, address = spec.partition(",")
        app = cls.__new__(cls)
        app.base_url, app.process, app._address = base_url.rstrip("/"), None, address or None
        return app

    def __enter__(self) -> "LocalServeApp":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
