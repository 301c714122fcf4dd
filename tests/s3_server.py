"""A real S3 HTTP API on loopback for tests: moto's server mode.

    with S3Server() as s3:
        s3.make_bucket("bucket")
        storage = Storage("s3://bucket/prefix", s3.storage_options())

By default the server runs in a thread of the test process
(``moto.server.ThreadedMotoServer``); ``S3Server(subprocess=True)`` runs ``moto_server`` as a
child process instead (for when the test process must not host it, or for isolation).
Either way clients talk plain HTTP to ``127.0.0.1``: nothing is mocked in-process.

``start()`` also puts fake AWS credentials, ``AWS_DEFAULT_REGION=us-east-1`` and
``AWS_EC2_METADATA_DISABLED=true`` in ``os.environ`` (``stop()`` restores the previous
values), so nothing can sign for or look up real AWS credentials. ``endpoint_url`` is the
server's URL; ``env()`` gives the variables for child processes
(including ``ATELIER_S3_ENDPOINT_URL``).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess as _subprocess
import sys
import time
import urllib.error
import urllib.request

FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
REGION = "us-east-1"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    def __init__(self, port: int | None = None, subprocess: bool = False):
        self.port = port
        self.subprocess = subprocess
        self.endpoint_url: str = ""
        self.startup_s: float | None = None
        self._server = None
        self._proc: _subprocess.Popen | None = None
        self._saved_env: dict[str, str | None] | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> "S3Server":
        if self._server is not None or self._proc is not None:
            return self
        # fake credentials, no metadata service: nothing can reach (or sign for) real AWS
        self._saved_env = {k: os.environ.get(k) for k in FAKE_ENV}
        os.environ.update(FAKE_ENV)
        t0 = time.monotonic()
        if self.subprocess:
            self._start_process()
        else:
            self._start_thread()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._wait_ready(timeout=30)
        self.startup_s = time.monotonic() - t0
        return self

    def _start_thread(self) -> None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port or 0, verbose=False)
        server.start()
        self._server = server
        self.port = server.get_host_and_port()[1]

    def _start_process(self) -> None:
        if self.port is None:
            self.port = _free_port()
        exe = shutil.which("moto_server", path=os.path.dirname(sys.executable))
        cmd = [exe] if exe else [sys.executable, "-m", "moto.server"]
        env = {**os.environ, **FAKE_ENV}
        self._proc = _subprocess.Popen(
            [*cmd, "-H", "127.0.0.1", "-p", str(self.port)],
            env=env,
            stdin=_subprocess.DEVNULL,
            stdout=_subprocess.DEVNULL,
            stderr=_subprocess.DEVNULL,
        )

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = self.endpoint_url + "/moto-api/"
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"moto_server exited with {self._proc.returncode}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    r.read()
                return
            except urllib.error.HTTPError:
                return  # it answered
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto server on {self.endpoint_url} did not start")
                time.sleep(0.05)

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except _subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._saved_env is not None:
            for k, v in self._saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            self._saved_env = None

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- helpers --------------------------------------------------------------------------

    def client(self):
        """A boto3 S3 client for this server."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def make_bucket(self, name: str) -> None:
        """Create a bucket (idempotent). Uses boto3: s3fs's ``mkdir`` sends a
        LocationConstraint for us-east-1, which moto rejects."""
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass

    def storage_options(self) -> dict:
        """Options for ``Storage(root, storage_options=...)`` / ``s3fs.S3FileSystem``."""
        return {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": REGION},
        }

    def env(self) -> dict[str, str]:
        """Environment for child processes (Ray workers, servers) that use this S3."""
        return {
            **FAKE_ENV,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "ATELIER_S3_ENDPOINT_URL": self.endpoint_url,
        }

    def reset(self) -> None:
        """Drop all buckets and objects (moto's reset API)."""
        req = urllib.request.Request(self.endpoint_url + "/moto-api/reset", method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read()
