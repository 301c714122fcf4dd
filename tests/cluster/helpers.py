"""Load, probes and the replica timeline for the cluster tests."""

from __future__ import annotations

import threading
import time

import httpx

from tests.serve.helpers import decode_b64_png

TERMINAL = ("completed", "failed", "cancelled")


class ReplicaTimeline(threading.Thread):
    """Replica counts per node, sampled every second: [(t, {'SDXLDeployment': {...}, ...})]."""

    def __init__(self, cluster, deployments, t0):
        super().__init__(daemon=True)
        self.cluster, self.deployments, self.t0 = cluster, deployments, t0
        self.samples: list[tuple[float, dict]] = []
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(1.0):
            try:
                sample = {d: self.cluster.replicas_by_node(d) for d in self.deployments}
            except Exception as exc:  # noqa: BLE001 - the dashboard can be slow while a node dies
                sample = {"error": type(exc).__name__}
            if not self.samples or self.samples[-1][1] != sample:
                self.samples.append((round(time.monotonic() - self.t0, 1), sample))


def generate(base_url: str, seed: int, steps: int = 4) -> tuple[int, str]:
    """One sync text-to-image on a new connection: ('ok', …) with a decoded 64x64 image, or the failure."""
    try:
        with httpx.Client(base_url=base_url, timeout=120) as client:
            r = client.post("/v1/images/generations", json={
                "prompt": f"a harbour {seed}", "size": "64x64", "steps": steps, "seed": seed,
                "response_format": "b64_json"})
    except httpx.HTTPError as exc:
        return 0, f"connection: {type(exc).__name__}"
    if r.status_code == 200:
        assert decode_b64_png(r.json()["data"][0]["b64_json"]).size == (64, 64)
        return 200, "ok"
    if r.status_code == 503:
        assert r.headers.get("retry-after"), r.headers  # overloaded or a replica lost: says when to retry
    return r.status_code, r.text[:200]
