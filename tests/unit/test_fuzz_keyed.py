"""The schemathesis fuzz (benchmarks/fuzz_api.py, as tests/serve/test_fuzz.py runs it) with an API
key, as a non-admin tenant, over the app as the ingress builds it (keys mode, ownership and rate
limits on): no 5xx, every error in the one shape, every response as documented.

The app is served by uvicorn on loopback in this process; its model handles must never be
reached (generating routes are sent with `async=true`, their jobs go to a fake queue), so what is
fuzzed is everything the HTTP layer decides: validation, scopes, ownership, budgets."""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import uvicorn

from tests.keyed_app import keyed_app

EXAMPLES = int(os.environ.get("ATELIER_FUZZ_EXAMPLES", "6"))
SEED = 20261203
KEYS = {"tenant": ("tenant-key", ["generate", "train"]), "other": ("other-key", ["generate", "train"])}


def _load_fuzz_api():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "fuzz_api.py"
    spec = importlib.util.spec_from_file_location("atelier_fuzz_api_keyed", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    built = keyed_app(tmp_path_factory.mktemp("storage"), KEYS,
                      {"allowed_hosts": ["127.0.0.1"], "rate_limits": {"requests": "100000/minute"}})
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(built.client.app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    uv.should_exit = True
    thread.join(timeout=10)


def test_every_route_survives_fuzzing_as_a_non_admin_tenant(server):
    fuzz_api = _load_fuzz_api()
    reports = fuzz_api.fuzz(server, max_examples=EXAMPLES, seed=SEED, timeout_s=60, api_key=KEYS["tenant"][0])
    assert len(reports) > 30  # every documented route
    statuses = {code for r in reports for code in r.statuses if isinstance(code, int)}
    assert any(code >= 400 for code in statuses) and any(code < 300 for code in statuses)
    failures = [f"{r.label}: {'; '.join(f['problems'])[:400]}\n    {f['curl'][:400]}"
                for r in reports for f in r.failures]
    if failures:
        pytest.fail(f"{len(failures)} failing cases:\n" + "\n".join(failures[:20]), pytrace=False)
