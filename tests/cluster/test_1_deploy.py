"""`serve deploy` across two nodes: replicas and proxies on both, requests through both proxies."""

from __future__ import annotations

import os
import re

import pytest

from tests.serve.helpers import decode_b64_png

pytestmark = pytest.mark.serve


def test_serve_deploy_places_replicas_and_proxies_on_both_nodes(atelier):
    cluster = atelier.cluster
    assert cluster.replicas_by_node("SDXLDeployment") == {"node_a": 1, "node_b": 1}
    atelier.wait_spread("IngressDeployment", {"node_a": 1, "node_b": 1})
    proxies = cluster.proxies_by_node()
    assert proxies == {"node_a": "HEALTHY", "node_b": "HEALTHY"}, proxies
    status = cluster.serve_status()  # the CLI, with the cluster's token
    assert status["applications"]["atelier"]["status"] == "RUNNING", status


def test_images_through_both_nodes_proxies(atelier):
    ok = 0
    for i in range(8):  # a new connection each time: the kernel spreads them over both proxies
        with atelier.client() as client:
            response = client.post("/v1/images/generations", json={
                "prompt": f"a lighthouse {i}", "size": "64x64", "steps": 2, "seed": i, "response_format": "b64_json"})
        assert response.status_code == 200, response.text
        image = decode_b64_png(response.json()["data"][0]["b64_json"])
        assert image.size == (64, 64)
        ok += 1
    assert ok == 8


def test_each_node_loads_the_model_from_its_own_copy_of_the_bundle(atelier):
    """The config's relative model path is opened in each node's own unpacked working_dir (under that
    node's Ray temp dir), not in the copy of the node that built the app (api.app keeps it relative)."""
    cluster = atelier.cluster
    for node in (cluster.head, cluster.worker):
        logs = node.temp_dir.glob("session_*/logs/serve/replica_atelier_SDXLDeployment_*.log")
        paths = [m.group(1) for log in logs for m in re.finditer(r"loading \w+ from (\S+)", log.read_text(errors="replace"))]
        assert paths, f"no SDXL replica of {node.name} logged its model folder"
        for path in paths:
            assert os.path.realpath(path).startswith(os.path.realpath(node.temp_dir)) and path.endswith("models/tiny/sdxl"), (node.name, path)
