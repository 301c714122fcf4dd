"""Workflow concurrency: the diamond graph as a workflow vs the same steps called one after another.

The diamond: one prompt feeding two branches, each text-to-image (its own seed) → select → x4
upscale. On the running app (configs/local.yaml, tiny models):

(a) workflow: POST /v1/workflows/runs (cache off); both branches run at once, each node on its
    deployment through DeploymentHandles, inside one job.
(b) sequential: the same four model calls through the same app's sync endpoints, one after the
    other (/v1/images/generations, then /v1/images/upscale by key, branch a then branch b).

Runs alternate (`--repeats`), so machine noise hits both alike. Prints medians: end-to-end
times and the concurrency speed-up (b / a, client-side wall clock of the work after the queue
picked the job up, and including the queue), and the per-node orchestration overhead: a
model node's time in the workflow minus the same call's time in (b), i.e. what the executor, the
job record writes and the progress streaming add per node (it absorbs contention between
concurrent branches too, so it is an upper bound).

    .venv/bin/python benchmarks/bench_workflows.py [--repeats 5] [--steps 8]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from local.runner import LocalServeApp  # noqa: E402

PROMPT = "a red kite over the sea"
MODEL_NODES = ("t2i_a", "up_a", "t2i_b", "up_b")


def diamond(steps: int, seeds: tuple[int, ...]) -> dict:
    """Two branches; with one seed, a single chain (no concurrency: the orchestration cost alone)."""
    nodes = [{"id": "prompt", "type": "prompt", "params": {"text": PROMPT}}]
    edges = []
    for name, seed in zip("ab", seeds):
        nodes += [{"id": f"t2i_{name}", "type": "text_to_image", "params": {"size": "32x32", "steps": steps, "seed": seed}},
                  {"id": f"pick_{name}", "type": "select", "params": {"index": 0}},
                  {"id": f"up_{name}", "type": "upscale", "params": {"steps": steps, "seed": seed}},
                  {"id": f"out_{name}", "type": "output", "params": {"name": name}}]
        edges += [{"source": s, "source_port": sp, "target": t, "target_port": tp} for s, sp, t, tp in [
            ("prompt", "text", f"t2i_{name}", "prompt"), (f"t2i_{name}", "images", f"pick_{name}", "images"),
            (f"pick_{name}", "image", f"up_{name}", "image"), (f"up_{name}", "image", f"out_{name}", "value")]]
    return {"nodes": nodes, "edges": edges}


def run_workflow(client: httpx.Client, steps: int, seeds: tuple[int, ...]) -> dict:
    started = time.time()
    response = client.post("/v1/workflows/runs", json={"workflow": diamond(steps, seeds), "use_cache": False})
    response.raise_for_status()
    job_id = response.json()["id"]
    while (job := client.get(f"/v1/jobs/{job_id}").json())["status"] not in ("completed", "failed", "cancelled"):
        time.sleep(0.1)
    if job["status"] != "completed":
        raise RuntimeError(f"workflow ended {job['status']}: {job.get('error')}")
    nodes = job["result"]["nodes"]
    first = min(n["started_at"] for n in nodes.values())
    last = max(n["finished_at"] for n in nodes.values())
    out = {"total_ms": (job["finished_at"] - started) * 1000, "work_ms": (last - first) * 1000}
    out.update({f"{n}_ms": (nodes[n]["finished_at"] - nodes[n]["started_at"]) * 1000 for n in MODEL_NODES
                if n in nodes})
    return out


def run_sequential(client: httpx.Client, steps: int, seeds: tuple[int, int]) -> dict:
    out, started = {}, time.perf_counter()
    for name, seed in zip("ab", seeds):
        mark = time.perf_counter()
        image = client.post("/v1/images/generations", json={
            "prompt": PROMPT, "size": "32x32", "steps": steps, "seed": seed, "response_format": "url"})
        image.raise_for_status()
        out[f"t2i_{name}_ms"] = (time.perf_counter() - mark) * 1000
        mark = time.perf_counter()
        url = image.json()["data"][0]["url"]
        client.post("/v1/images/upscale", json={
            "image_url": url, "prompt": PROMPT, "steps": steps, "seed": seed}).raise_for_status()
        out[f"up_{name}_ms"] = (time.perf_counter() - mark) * 1000
    out["total_ms"] = out["work_ms"] = (time.perf_counter() - started) * 1000
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=8)
    opts = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-workflows-") as scratch:
        print("starting the app (configs/local.yaml) ...", flush=True)
        with LocalServeApp(Path(scratch)) as app, httpx.Client(base_url=app.base_url, timeout=300) as client:
            run_workflow(client, opts.steps, (1, 2))  # warm-up: models, handles, queue
            run_sequential(client, opts.steps, (1, 2))
            workflow, sequential, chain = [], [], []
            for i in range(opts.repeats):
                seeds = (10 + 2 * i, 11 + 2 * i)
                workflow.append(run_workflow(client, opts.steps, seeds))
                sequential.append(run_sequential(client, opts.steps, seeds))
                chain.append(run_workflow(client, opts.steps, seeds[:1]))
                print(f"run {i + 1}: workflow {workflow[-1]['total_ms']:.0f} ms, "
                      f"sequential {sequential[-1]['total_ms']:.0f} ms", flush=True)

    def med(runs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    print(f"\ndiamond graph, tiny models, 32x32 → x4, {opts.steps} steps per model; medians of {opts.repeats}\n")
    print(f"{'node':8} {'sequential ms':>14} {'in workflow ms':>15} {'overhead ms':>12}")
    overheads = []
    for node in MODEL_NODES:
        s, w = med(sequential, f"{node}_ms"), med(workflow, f"{node}_ms")
        overheads.append(w - s)
        print(f"{node:8} {s:14.1f} {w:15.1f} {w - s:12.1f}")
    print(f"per-node time added in the diamond (median over model nodes): {statistics.median(overheads):.1f} ms "
          "(includes contention between the concurrent branches)")
    alone = [med(chain, f"{n}_ms") - med(sequential, f"{n}_ms") for n in ("t2i_a", "up_a")]
    print(f"per-node orchestration overhead, one branch alone (no contention): "
          f"t2i {alone[0]:.1f} ms, upscale {alone[1]:.1f} ms")
    seq_total = med(sequential, "total_ms")
    print(f"\nsequential end to end                 {seq_total:8.1f} ms")
    print(f"workflow, nodes only (first → last)   {med(workflow, 'work_ms'):8.1f} ms   "
          f"speed-up {seq_total / med(workflow, 'work_ms'):.2f}x")
    print(f"workflow, as the client sees it       {med(workflow, 'total_ms'):8.1f} ms   "
          f"speed-up {seq_total / med(workflow, 'total_ms'):.2f}x (includes the durable queue)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
