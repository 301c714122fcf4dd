"""Issue 22, item 4 (monitoring): GET /v1/stats from the job records, the caller's own (all for
admin), and the Grafana dashboard shipped in configs/grafana/ over the metrics the code exports."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from api.auth import Caller, acting_as, reset_caller
from api.stats.service import percentile
from tests.keyed_app import keyed_app

REPO = Path(__file__).resolve().parents[2]
KEYS = {"ann": ("ann-key", ["generate"]), "ben": ("ben-key", ["generate"]), "root": ("root-key", ["admin"])}


def bearer(who: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[who][0]}"}


def test_stats_count_time_and_explain_the_callers_jobs(tmp_path):
    app = keyed_app(tmp_path, KEYS)
    app.services.stats.replicas = lambda: {"atelier/SDXLDeployment": {"RUNNING": 2}}
    store = app.services.jobs.jobs
    now = time.time()
    token = acting_as(Caller(owner="ann", key="ann"))
    try:
        for i, seconds in enumerate([1.0, 2.0, 3.0, 4.0, 10.0]):  # completed, on one model
            record = store.create("images.generations", {}, owner="ann")
            store.update(record.id, status="completed", started_at=now, finished_at=now + seconds,
                         result={"model": "sdxl-tiny"})
        failed = store.create("videos", {}, owner="ann")
        store.update(failed.id, status="failed", finished_at=now, error={"type": "oom", "message": "out of memory"})
        store.create("videos", {}, owner="ann")  # still queued
    finally:
        reset_caller(token)
    store.create("images.generations", {}, owner="ben")
    stats = app.client.get("/v1/stats", headers=bearer("ann")).json()
    assert stats["window"] == 7
    assert stats["jobs"] == {"images.generations": {"completed": 5}, "videos": {"failed": 1, "queued": 1}}
    timing = stats["generation_s"]["sdxl-tiny"]
    assert timing == {"count": 5, "mean_s": 4.0, "p95_s": 10.0}
    assert stats["errors"] == {"videos": {"oom": 1}}
    assert stats["recent_failures"][0] == {"id": failed.id, "kind": "videos", "type": "oom",
                                           "message": "out of memory", "finished_at": now}
    assert stats["queue_depth"] == 2  # store-wide: ann's queued video and ben's job
    assert stats["replicas"] == {"atelier/SDXLDeployment": {"RUNNING": 2}}
    assert app.client.get("/v1/stats", headers=bearer("ben")).json()["jobs"] == {"images.generations": {"queued": 1}}
    assert app.client.get("/v1/stats", headers=bearer("root")).json()["window"] == 8
    bad = app.client.get("/v1/stats?window=0", headers=bearer("ann"))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "window"


def test_percentile_is_the_nearest_rank():
    assert percentile([5.0], 95) == 5.0
    assert percentile(list(map(float, range(1, 101))), 95) == 95.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 10.0], 50) == 3.0


def test_the_grafana_dashboard_charts_only_metrics_that_exist():
    dashboard = json.loads((REPO / "configs" / "grafana" / "atelier.json").read_text())
    exported = set(re.findall(r'"(atelier_[a-z_]+)"', (REPO / "deployments" / "metrics.py").read_text()))
    used = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used |= {m.removeprefix("ray_").removesuffix("_bucket").removesuffix("_count")
                     for m in re.findall(r"ray_atelier_[a-z_]+", target["expr"])}
    assert used and used <= exported, used - exported
    assert exported <= used, f"metrics without a panel: {exported - used}"
