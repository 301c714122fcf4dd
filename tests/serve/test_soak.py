"""A short memory soak (benchmarks/soak_memory.py runs the 2,000-request one)."""

from __future__ import annotations

import pytest

from benchmarks.soak_memory import soak

pytestmark = pytest.mark.serve


def test_rss_of_proxies_ingress_and_sdxl_stays_within_ten_percent(atelier):
    ray = atelier.connect_ray()
    try:
        report = soak(atelier.base_url, ray, requests=150, warmup=60, concurrency=8, samples=4)
    finally:
        ray.shutdown()
    assert set(report["statuses"]) == {200}, sorted(set(report["statuses"]))
    assert not report["replaced"], report["replaced"]
    # HAProxy in front (configs/ray.env; it may reload into a new process when replicas change,
    # and is then reported, not compared), Serve's own proxy beside it
    assert {label.split(":")[0] for label in report["ratios"]} >= {"proxy", "IngressDeployment", "SDXLDeployment"}
    assert "haproxy" in report["pids"], report["pids"]
    assert all(ratio <= 1.10 for ratio in report["ratios"].values()), report["ratios"]
