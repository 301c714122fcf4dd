"""A two-node Ray cluster on this one machine, started with Ray's own CLI, for the cluster tests
and the multi-node benchmarks: `ray start --head` and `ray start --address=...`, each node with its
own scratch folder, its own CPUs and a custom resource label (`node_a`, `node_b`) so placement can
be forced, plus Debian's `redis-server` as the Celery broker.

Token auth (Ray 2.60 turns it on for local clusters): every process of the cluster and every
client (`serve deploy`, `serve status`, `ray job submit`) gets `RAY_AUTH_MODE=token` and
`RAY_AUTH_TOKEN` in its environment, as Ray's token-auth guide documents for clusters started with
`ray start`. The token is this cluster's own, so `~/.ray/auth_token` (which other clusters on
this machine may write) is never read or written.

Nothing is shared through local disk: each node has its own `--temp-dir`, the app's code and the
tiny model travel in the `serve deploy` runtime_env's working_dir (a bundle staged here, see
`stage_bundle`), and storage is S3.

Every process started here is ours to stop: each `ray start --block` runs in its own session, and
`kill()` SIGKILLs it with every descendant and every process naming the node's temp dir (a hard
node loss: raylet, GCS, workers, agents). `ray stop` is never used: it would stop every Ray node
on the machine, other people's too.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml

from local.runner import session_pids

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Fatal(RuntimeError):
    """Raised inside a polled predicate: stop polling now (a process it waits on has died)."""


def wait_for(predicate, timeout_s: float, interval_s: float = 0.5, what: str = "condition"):
    """Poll `predicate` until it returns a truthy value (returned) or the deadline passes.
    Other errors are retried until the deadline; `Fatal` ends the wait at once."""
    deadline = time.monotonic() + timeout_s
    last_exc: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Fatal:
            raise
        except Exception as exc:  # noqa: BLE001 - polled again until the deadline
            last_exc = exc
        time.sleep(interval_s)
    raise TimeoutError(f"{what} not reached in {timeout_s:.0f}s" + (f" (last error: {last_exc!r})" if last_exc else ""))


def _kill_tree(pids: set[int]) -> None:
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def _processes_naming(text: str) -> set[int]:
    pids = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(text in arg for arg in proc.info["cmdline"] or ()):
                pids.add(proc.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return pids


@dataclass
class RayNode:
    """One `ray start --block` process and everything it starts."""

    name: str
    temp_dir: Path
    num_cpus: float
    resources: dict[str, float]
    env: dict[str, str]
    head: bool = False
    gcs_port: int = 0
    head_address: str = ""
    dashboard_port: int = 0
    log_path: Path = field(init=False)
    process: subprocess.Popen | None = None

    def __post_init__(self):
        self.log_path = self.temp_dir.parent / f"{self.name}.log"

    def command(self) -> list[str]:
        # Every port is this node's own: other Ray clusters run on this machine too, and Ray's
        # defaults (6379, 8265, 52365, 10001, the worker port range) would collide.
        # The worker port window sits in 20000-29999: above Ray's default range (10002-19999, other
        # clusters') and below the kernel's ephemeral ports (32768+), where free_port() picks.
        worker_lo = 20000 + secrets.randbelow(100) * 100
        cmd = [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
               f"--temp-dir={self.temp_dir}", f"--num-cpus={self.num_cpus}", f"--resources={json.dumps(self.resources)}",
               f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
               f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
               f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
               f"--min-worker-port={worker_lo}", f"--max-worker-port={worker_lo + 99}",
               "--object-store-memory=200000000"]
        if self.head:
            cmd += ["--head", f"--port={self.gcs_port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={free_port()}",
                    # a dead node is noticed in about 3 s rather than Ray's default of about 30 s
                    "--system-config=" + json.dumps({"health_check_period_ms": 1000, "health_check_timeout_ms": 1000,
                                                     "health_check_failure_threshold": 3})]
        else:
            cmd += [f"--address={self.head_address}"]
        return cmd

    def start(self) -> "RayNode":
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(self.command(), env=self.env, cwd=self.temp_dir.parent,
                                        stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def pids(self) -> set[int]:
        pids = _processes_naming(str(self.temp_dir))
        if self.process is not None:
            pids.add(self.process.pid)
            pids |= session_pids(self.process.pid)
            try:
                pids |= {p.pid for p in psutil.Process(self.process.pid).children(recursive=True)}
            except psutil.NoSuchProcess:
                pass
        return pids

    def kill(self) -> int:
        """SIGKILL the node: `ray start`, raylet, agents, workers, all at once (a machine lost).
        Returns how many processes were killed."""
        killed = 0
        for _ in range(3):  # workers can be forking while we sweep
            pids = self.pids()
            if not pids:
                break
            killed += len(pids)
            _kill_tree(pids)
        if self.process is not None:
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        return killed

    def stop(self, grace_s: float = 15) -> None:
        """Graceful first (`ray start --block` stops its node on SIGTERM), then kill what is left."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""


class RedisServer:
    """Debian's redis-server on a free loopback port, in its own folder, no persistence."""

    def __init__(self, scratch: Path, port: int | None = None):
        self.scratch = scratch
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None

    @staticmethod
    def executable() -> str | None:
        return shutil.which("redis-server") or (os.path.exists("/usr/bin/redis-server") and "/usr/bin/redis-server") or None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> "RedisServer":
        exe = self.executable()
        if exe is None:
            raise FileNotFoundError("redis-server is not installed (`make redis` installs Debian's)")
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.scratch), "--save", "",
             "--appendonly", "no", "--protected-mode", "no"],
            stdout=open(self.scratch / "redis.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(self.ping, 20, 0.1, "redis-server answering PING")
        return self

    def ping(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


# What the app needs on a node: the code packages and, for the tiny-model configs, the one model
# they serve. Nothing else of the checkout travels.
BUNDLE_DIRS = ("api", "deployments", "graphs", "local", "storage", "training", "configs", "web")
_BUNDLE_IGNORE = ("__pycache__", "*.pyc", "node_modules", ".pytest_cache")


def build_bundle(out: Path, models: tuple[str, ...] = ()) -> Path:
    """A release bundle: the zip that `runtime_env.working_dir` names by URI (s3://…/atelier-<hash>.zip).

    `serve deploy` takes only remote URIs for working_dir (a local path works with `serve run` and
    `ray job submit`, which upload it): so a release is this zip in object storage, and every node
    downloads and unpacks it into its own runtime_resources. One top-level folder, as Ray expects.
    Returns the zip's path; its name carries a hash of its contents, since nodes cache by URI.
    """
    import fnmatch
    import hashlib
    import zipfile

    files: list[tuple[Path, str]] = []
    for top in (*BUNDLE_DIRS, *models):
        for path in sorted((REPO / top).rglob("*")):
            rel = path.relative_to(REPO)
            if path.is_file() and not any(fnmatch.fnmatch(part, pat) for part in rel.parts for pat in _BUNDLE_IGNORE):
                files.append((path, str(rel)))
    digest = hashlib.sha256()
    for path, rel in files:
        digest.update(rel.encode() + b"\0" + path.read_bytes())
    out.mkdir(parents=True, exist_ok=True)
    zip_path = out / f"atelier-{digest.hexdigest()[:16]}.zip"
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for path, rel in files:
            archive.write(path, f"atelier/{rel}")
    return zip_path


class LocalCluster:
    """Head (`node_a`) and worker (`node_b`) on this machine; Redis; the token; the CLIs' env."""

    def __init__(self, scratch: Path | None = None, cpus_per_node: float = 4, extra_env: dict[str, str] | None = None):
        # Short paths: Ray puts Unix sockets under the temp dir (108-byte limit).
        self.root = Path(tempfile.mkdtemp(prefix="atc-", dir="/tmp"))
        self.scratch = scratch or self.root
        self.token = secrets.token_hex(32)
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        # Not configs/ray.env (Serve's HAProxy ingress and gRPC data plane): under it this suite
        # failed (2026-12-04): both nodes' HAProxies bind the one HTTP port of this machine and the
        # worker's could not, the job runner did not scale on the queue, and node loss gave 500s.
        # Serve's defaults for its two switches, whatever the shell has.
        self.env = {**os.environ, "RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0",
                    **(extra_env or {}),
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                    "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1",
                    "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
                    # clients (serve deploy/status, ray job submit) find this cluster, not another
                    "RAY_ADDRESS": self.dashboard_url}
        self.env.pop("RAY_OVERRIDE_RESOURCES", None)
        self.env.pop("RAY_AUTH_TOKEN_PATH", None)
        self.head = RayNode("head", self.root / "a", cpus_per_node, {"node_a": 1}, self.env, head=True,
                            gcs_port=self.gcs_port, dashboard_port=self.dashboard_port)
        self.worker = self._worker_node(cpus_per_node)

    def _worker_node(self, cpus: float, suffix: str = "") -> RayNode:
        return RayNode("worker", self.root / f"b{suffix}", cpus, {"node_b": 1}, self.env, head_address=self.address)

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self, timeout_s: float = 240, attempts: int = 3) -> "LocalCluster":
        """Head, then worker. Ray's node start has fixed internal deadlines ("The current node timed
        out during startup") that a loaded 2-core machine can miss: such a start is retried."""
        for attempt in range(1, attempts + 1):
            try:
                self.head.start()
                wait_for(lambda: self._dead(self.head, raise_=True) or self._dashboard_up(), timeout_s, 1,
                         "the head node's dashboard")
                self.wait_nodes(1, timeout_s)
                break
            except Fatal:
                self.head.kill()
                if attempt == attempts:
                    raise
                self.head = RayNode("head", self.root / f"a{attempt}", self.head.num_cpus, self.head.resources,
                                    self.env, head=True, gcs_port=self.gcs_port, dashboard_port=self.dashboard_port)
        self.start_worker(timeout_s, attempts)
        return self

    def start_worker(self, timeout_s: float = 240, attempts: int = 3) -> None:
        for attempt in range(1, attempts + 1):
            try:
                self.worker.start()
                self.wait_nodes(2, timeout_s, self.worker)
                return
            except Fatal:
                self.worker.kill()
                if attempt == attempts:
                    raise
                self.worker = self._worker_node(self.worker.num_cpus, suffix=str(attempt))

    def restart_worker(self, timeout_s: float = 240) -> None:
        """A new worker node (a replacement machine): its own new scratch dir."""
        if self.worker.alive():
            raise RuntimeError("the worker node is still running")
        self.worker = self._worker_node(self.worker.num_cpus, suffix=f"r{time.monotonic_ns() % 10**6}")
        self.start_worker(timeout_s)

    def stop(self, keep_logs: Path | None = None) -> None:
        """Stop both nodes; with `keep_logs`, copy each node's Ray logs there first (for a failed test)."""
        if keep_logs is not None:
            for logs in self.root.glob("*/session_latest/logs"):
                shutil.copytree(logs, keep_logs / logs.parents[1].name, dirs_exist_ok=True,
                                ignore=shutil.ignore_patterns("*.sock", "events"))
        # Both nodes at once, each given 5 s to stop gracefully before the rest is killed: the
        # cluster is thrown away, and a worker node's graceful stop did not finish in 15 s (one
        # after the other, with 15 s each, took 30 s of every run's teardown).
        def stop(node: RayNode) -> None:
            try:
                node.stop(grace_s=5)
            except Exception:  # noqa: BLE001 - teardown goes on
                pass

        stoppers = [threading.Thread(target=stop, args=(node,), daemon=True) for node in (self.worker, self.head)]
        for stopper in stoppers:
            stopper.start()
        for stopper in stoppers:
            stopper.join(timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _dashboard_up(self) -> bool:
        import httpx

        try:
            return httpx.get(f"{self.dashboard_url}/api/version", timeout=3,
                             headers=self.auth_headers()).status_code == 200
        except httpx.HTTPError:
            return False

    @staticmethod
    def _dead(node: RayNode, raise_: bool = False) -> bool:
        if node.process is not None and node.process.poll() is not None:
            if raise_:
                raise Fatal(f"ray start ({node.name}) exited {node.process.returncode}:\n{node.log_tail()}")
            return True
        return False

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    # --- state ------------------------------------------------------------------------------------

    def nodes(self) -> list[dict]:
        """Alive nodes from the dashboard's state API: [{node_id, resources_total, ...}]."""
        import httpx

        resp = httpx.get(f"{self.dashboard_url}/api/v0/nodes", params={"limit": 100, "detail": "true"},
                         headers=self.auth_headers(), timeout=20)
        resp.raise_for_status()
        return [n for n in resp.json()["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def wait_nodes(self, count: int, timeout_s: float = 120, starting: RayNode | None = None) -> list[dict]:
        def ready():
            self._dead(self.head, raise_=True)
            if starting is not None:
                self._dead(starting, raise_=True)
            nodes = self.nodes()
            return nodes if len(nodes) == count else None

        return wait_for(ready, timeout_s, 1, f"{count} alive Ray nodes")

    def node_labels(self) -> dict[str, str]:
        """node_id -> 'node_a' / 'node_b' (by each node's custom resource)."""
        labels = {}
        for node in self.nodes():
            total = node.get("resources_total") or {}
            labels[node["node_id"]] = "node_a" if "node_a" in total else "node_b" if "node_b" in total else "?"
        return labels

    # --- CLIs ---------------------------------------------------------------------------------------

    def cli(self, *args: str, timeout_s: float = 300, check: bool = True, cwd: Path | None = None,
            env: dict | None = None) -> subprocess.CompletedProcess:
        """Run a Ray CLI (`serve deploy`, `serve status`, `ray job submit`) against this cluster."""
        proc = subprocess.run([str(BIN / args[0]), *args[1:]], env={**self.env, **(env or {})}, cwd=cwd or REPO,
                              capture_output=True, text=True, timeout=timeout_s)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def serve_status(self) -> dict:
        return yaml.safe_load(self.cli("serve", "status", "-a", self.dashboard_url, timeout_s=60).stdout) or {}

    def serve_details(self) -> dict:
        """The dashboard's Serve details: applications, deployments, replicas with node ids."""
        import httpx

        resp = httpx.get(f"{self.dashboard_url}/api/serve/applications/", headers=self.auth_headers(), timeout=20)
        resp.raise_for_status()
        return resp.json()

    def replicas_by_node(self, deployment: str, app: str = "atelier") -> dict[str, int]:
        """RUNNING replicas of `deployment` per node label: {'node_a': 1, 'node_b': 1}."""
        labels = self.node_labels()
        details = self.serve_details()
        counts: dict[str, int] = {}
        dep = ((details.get("applications") or {}).get(app) or {}).get("deployments", {}).get(deployment) or {}
        for replica in dep.get("replicas", []):
            if replica.get("state") == "RUNNING":
                label = labels.get(replica.get("node_id"), "gone")
                counts[label] = counts.get(label, 0) + 1
        return counts

    def proxies_by_node(self) -> dict[str, str]:
        labels = self.node_labels()
        proxies = self.serve_details().get("proxies") or {}
        return {labels.get(node_id, "gone"): p.get("status") for node_id, p in proxies.items()}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Build the release bundle (the zip runtime_env.working_dir names).")
    parser.add_argument("command", choices=["bundle"])
    parser.add_argument("--out", default="dist", help="folder for atelier-<hash>.zip")
    parser.add_argument("--model", action="append", default=[], help="a model folder to ship too (tests: models/tiny/sdxl)")
    ns = parser.parse_args()
    print(build_bundle(Path(ns.out), tuple(ns.model)))
