"""Load, probes and the replica timeline for the cluster tests."""

from __future__ import annotations

import threading
import time
import uuid

import httpx

from local.cluster import wait_for
from tests.serve.helpers import decode_b64_png, noise_image

TERMINAL = ("completed", "failed", "cancelled")

# The figures the tests measure (jobs accepted/completed/lost, recovery times, replica counts over
# time), printed again at the end of the run by conftest.py's terminal summary, passed or not.
FIGURES: list[str] = []


def report(line: str) -> None:
    line = line.strip("\n")
    print(line)
    FIGURES.append(line)


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


class TargetTimeline(threading.Thread):
    """How many replicas Serve wants of one deployment (its autoscaler's decision), sampled every
    second: [(t, n)], a sample on each change."""

    def __init__(self, atelier, deployment: str, t0: float):
        super().__init__(daemon=True)
        self.atelier, self.deployment, self.t0 = atelier, deployment, t0
        self.samples: list[tuple[float, int]] = []
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(1.0):
            self.sample()

    def sample(self) -> None:
        """One sample now (the thread takes one a second; a test takes the last after stopping it)."""
        try:
            target = self.atelier.target_replicas(self.deployment)
        except Exception:  # noqa: BLE001 - the dashboard can be slow under load; the next sample counts
            return
        if not self.samples or self.samples[-1][1] != target:
            self.samples.append((round(time.monotonic() - self.t0, 1), target))


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


def wait_finished(client, job_ids: list[str], timeout_s: float) -> tuple[list[str], dict[str, str], list[str]]:
    """Poll until every job is terminal or the deadline passes: (completed, failed: {id: error},
    lost: neither by then)."""
    finals: dict[str, dict] = {}

    def all_done():
        for job_id in job_ids:
            if job_id not in finals:
                job = client.get(f"/v1/jobs/{job_id}").json()
                if job["status"] in TERMINAL:
                    finals[job_id] = job
        return len(finals) == len(job_ids)

    try:
        wait_for(all_done, timeout_s, 1, "every accepted job finished")
    except TimeoutError:
        pass
    completed = [j for j, job in finals.items() if job["status"] == "completed"]
    failed = {j: job["error"] for j, job in finals.items() if job["status"] != "completed"}
    return completed, failed, [j for j in job_ids if j not in finals]


class Load:
    """`clients` threads each sending sync text-to-image requests in a loop while the block runs."""

    def __init__(self, base_url: str, clients: int = 8, steps: int = 8):
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._loop, args=(base_url, steps), daemon=True)
                        for _ in range(clients)]

    def _loop(self, base_url: str, steps: int) -> None:
        while not self.stop.is_set():
            generate(base_url, 7, steps=steps)

    def __enter__(self) -> "Load":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=130)


def make_dataset(client, count: int = 8) -> str:
    """A dataset of `count` noise images on the app's storage (S3), for the fine-tuning runs."""
    created = client.post("/v1/datasets", json={"name": f"gulls-{uuid.uuid4().hex[:8]}", "trigger_word": "zwx"})
    assert created.status_code == 201, created.text
    dataset_id = created.json()["id"]
    files = [("files", (f"gull{i}.png", noise_image(72, 64, seed=200 + i), "image/png")) for i in range(count)]
    uploaded = client.post(f"/v1/datasets/{dataset_id}/images", files=files)
    assert uploaded.status_code == 200 and uploaded.json()["added"] == count, uploaded.text
    return dataset_id


def train_workers_by_node(cluster) -> dict[str, int]:
    """Live Ray Train workers per node label."""
    resp = httpx.get(f"{cluster.dashboard_url}/api/v0/actors", headers=cluster.auth_headers(), timeout=20,
                     params={"limit": 10000, "detail": "true"})
    actors = resp.json()["data"]["result"]["result"]
    labels = cluster.node_labels()
    counts: dict[str, int] = {}
    for actor in actors:
        if actor["state"] == "ALIVE" and "RayTrainWorker" in (actor.get("class_name") or ""):
            label = labels.get(actor.get("node_id"), "gone")
            counts[label] = counts.get(label, 0) + 1
    return counts
