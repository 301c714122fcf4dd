"""The app behind Serve's HAProxy ingress (configs/ray.env), as ops run it on a cluster."""

from __future__ import annotations

import psutil
import pytest

pytestmark = pytest.mark.serve


def test_the_apps_port_is_haproxys_and_requests_reach_the_ingress(atelier, client):
    if atelier.process is None:
        pytest.skip("attached to a running app, started however it was")
    listeners = {conn.pid for conn in psutil.net_connections("tcp")
                 if conn.status == psutil.CONN_LISTEN and conn.laddr.port == atelier.port and conn.pid}
    assert {psutil.Process(pid).name() for pid in listeners} == {"haproxy"}
    assert client.get("/healthz").status_code == 200
    # an error body is still the app's own (FastAPI behind HAProxy, not a proxy's page)
    response = client.get("/v1/models/nope")
    assert response.status_code in (401, 404) and response.json()["error"]["type"]
