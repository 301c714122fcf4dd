"""Starts the real app from configs/local.yaml with `serve run` on a local Ray instance.

The config is copied with its storage, queue and port pointed at a temporary folder, so a test
run never touches a developer's `var/` or a `make serve` on port 8000.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def local_config(tmp: Path, port: int) -> Path:
    config = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())
    config["http_options"]["port"] = port
    args = config["applications"][0]["args"]
    args["storage_root"] = str(tmp / "storage")
    args["tiny_models_dir"] = str(REPO / "models" / "tiny")
    args["sdxl"]["model"] = str(REPO / "models" / "tiny" / "sdxl")
    args["queue"]["broker_url"] = f"sqla+sqlite:///{tmp}/queue/broker.db"
    args["queue"]["backend_url"] = f"db+sqlite:///{tmp}/queue/results.db"
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class ServeApp:
    def __init__(self, config_path: Path, port: int, log_path: Path):
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1",
               "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
        self.process = subprocess.Popen(
            [str(Path(sys.executable).parent / "serve"), "run", str(config_path)],
            cwd=REPO, env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, start_new_session=True,
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"serve run exited early:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/v1/models", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"app not ready after {READY_TIMEOUT_S}s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture(scope="session")
def atelier(tmp_path_factory) -> ServeApp:
    tmp = tmp_path_factory.mktemp("atelier")
    port = free_port()
    app = ServeApp(local_config(tmp, port), port, tmp / "serve.log")
    try:
        app.wait_ready()
        yield app
    finally:
        app.stop()


@pytest.fixture()
def client(atelier) -> httpx.Client:
    with httpx.Client(base_url=atelier.base_url, timeout=120) as http:
        yield http
