"""Job pickup latency and idle cost of the job runner, by SQLite broker polling interval.

For each `queue.polling_interval_s` (default: ours, 0.05 s, against Kombu's default, 1.0 s), runs
configs/local.yaml with only SDXL and submits tiny async image jobs one at a time, each after the
previous one finished, so what is measured is pickup latency, not queueing. Pickup is the job
record's `started_at - created_at`: `created_at` is stamped by the ingress just before it enqueues,
`started_at` by the runner just before the first stage starts (nothing waits in between, and no
separate stage start time is recorded). Then, with nothing submitted, it samples the CPU time of
the JobRunnerDeployment replica process: what the polling costs while idle.

Intervals are interleaved over rounds (one app per interval per round, alternating order), so a
slow phase of a shared machine does not land on one interval only. Prints per interval the median
over rounds of pickup p50/p95, the client's submit-to-completed p50 and idle CPU, with min-max.

    .venv/bin/python benchmarks/bench_jobs.py [--polling-intervals 0.05 1.0] [--rounds 3] [--jobs 50]
        [--idle-s 10] [--json results.json]

An interval of `none` sets `polling_interval_s: null`: no transport option at all, Kombu's own
default (1 s), i.e. the queue as it was configured before the option existed.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from local.runner import LocalServeApp  # noqa: E402
from local.tiny_models import ensure_tiny_models  # noqa: E402

GOAL_P50_MS = 50.0
GOAL_P95_MS = 150.0
TERMINAL = ("completed", "failed", "cancelled")
# The client's own polling of a job: fine enough not to dominate the end-to-end time, coarse
# enough not to steal much of the 2 cores from the app being measured.
CLIENT_POLL_S = 0.02


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def job_body(i: int, steps: int) -> dict:
    return {"prompt": f"pickup benchmark {i}", "size": "64x64", "steps": steps, "seed": i + 1}


def run_one_job(client: httpx.Client, i: int, steps: int, timeout_s: float = 120) -> tuple[dict, float]:
    """Submit one async job and wait for it: (final record, client submit-to-completed seconds)."""
    started = time.perf_counter()
    response = client.post("/v1/images/generations", params={"async": "true"}, json=job_body(i, steps))
    if response.status_code != 202:
        raise RuntimeError(f"submit answered {response.status_code}: {response.text[:500]}")
    job_id = response.json()["id"]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in TERMINAL:
            elapsed = time.perf_counter() - started
            if job["status"] != "completed":
                raise RuntimeError(f"job {job_id} ended {job['status']}: {job.get('error')}")
            return job, elapsed
        time.sleep(CLIENT_POLL_S)
    raise RuntimeError(f"job {job_id} not finished after {timeout_s}s")


def measure_jobs(app: LocalServeApp, count: int, steps: int, max_gap_s: float, rng: random.Random) -> dict:
    """Sequential jobs: pickup (record timestamps) and end-to-end (client) times, in ms."""
    pickups, e2e = [], []
    with httpx.Client(base_url=app.base_url, timeout=60) as client:
        run_one_job(client, count, steps)  # warm-up: first broker connection, first SDXL call
        for i in range(count):
            # A random gap before each submit: the runner polls on a fixed period that starts
            # at its last pickup, so submitting right after the previous job ended would land
            # at the same phase of that period every time and bias the pickup either way.
            time.sleep(rng.uniform(0, max_gap_s))
            job, elapsed = run_one_job(client, i, steps)
            pickups.append((job["started_at"] - job["created_at"]) * 1000)
            e2e.append(elapsed * 1000)
    return {"pickup_ms": pickups, "e2e_ms": e2e,
            "pickup_p50_ms": percentile(pickups, 50), "pickup_p95_ms": percentile(pickups, 95),
            "e2e_p50_ms": percentile(e2e, 50)}


def _pid_of(self) -> int:
    # Runs inside the replica actor through __ray_call__: the actor's own process.
    import os as _os

    return _os.getpid()


def job_runner_pid(app: LocalServeApp) -> int:
    """The pid of the JobRunnerDeployment replica, asked of the actor itself (core API only: the
    local app runs without a dashboard, so ray.util.state is not there)."""
    ray = app.connect_ray()
    try:
        prefix = "SERVE_REPLICA::atelier#JobRunnerDeployment#"
        names = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
        if len(names) != 1:
            raise RuntimeError(f"expected one JobRunnerDeployment replica, found {names}")
        actor = ray.get_actor(names[0]["name"], namespace=names[0]["namespace"])
        return ray.get(actor.__ray_call__.remote(_pid_of), timeout=60)
    finally:
        # Disconnect before measuring: a connected driver is load the app would not otherwise have.
        ray.shutdown()


def cpu_seconds(pid: int) -> float:
    """User+system CPU time of a process and its children (live ones, plus those it reaped)."""
    process = psutil.Process(pid)
    times = process.cpu_times()
    total = times.user + times.system + times.children_user + times.children_system
    for child in process.children(recursive=True):
        try:
            child_times = child.cpu_times()
            total += child_times.user + child_times.system
        except psutil.NoSuchProcess:
            pass
    return total


def idle_cpu_percent(pid: int, seconds: float) -> float:
    """CPU used by the idle runner over `seconds`, as % of one core."""
    time.sleep(1.0)  # let the last job's heartbeat thread and queue-depth report finish
    cpu_before, wall_before = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    cpu_after, wall_after = cpu_seconds(pid), time.monotonic()
    return 100.0 * (cpu_after - cpu_before) / (wall_after - wall_before)


def parse_interval(text: str) -> float | None:
    return None if text.lower() in ("none", "null", "kombu") else float(text)


def label(interval: float | None) -> str:
    return "none" if interval is None else f"{interval:g} s"


def run_app(interval: float | None, args: argparse.Namespace, rng: random.Random) -> dict:
    """One app with this polling interval: its jobs, then its idle CPU."""
    with tempfile.TemporaryDirectory() as scratch:
        app = LocalServeApp(
            Path(scratch),
            args_update={"svd": None, "upscaler": None, "llm": None, "queue": {"polling_interval_s": interval}},
            deployments_update={"SDXLDeployment": {"autoscaling_config": None, "num_replicas": 1}})
        with app:
            try:
                result = measure_jobs(app, args.jobs, args.steps, args.max_gap_s, rng)
                pid = job_runner_pid(app)
                result["idle_cpu_pct"] = idle_cpu_percent(pid, args.idle_s)
            except Exception:
                # The scratch folder, and with it the app's log, goes away with the app.
                print(f"--- serve log tail ---\n{app.log_tail()}", file=sys.stderr)
                raise
    return result


def summarize(rounds: list[dict], key: str) -> dict:
    values = [r[key] for r in rounds]
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def cell(summary: dict, digits: int = 1) -> str:
    return f"{summary['median']:.{digits}f} ({summary['min']:.{digits}f}-{summary['max']:.{digits}f})"


def report(intervals: list[float | None], summaries: dict[float | None, dict], args: argparse.Namespace) -> None:
    print(f"\n{args.jobs} sequential async jobs (tiny SDXL, 64x64, {args.steps} steps) per app, "
          f"{args.rounds} round(s); median over rounds (min-max)")
    header = f"{'interval':>10}  {'pickup p50 ms':>24}  {'pickup p95 ms':>24}  {'e2e p50 ms':>24}  {'idle CPU %':>20}"
    print(header)
    for interval in intervals:
        s = summaries[interval]
        print(f"{label(interval):>10}  {cell(s['pickup_p50_ms']):>24}  {cell(s['pickup_p95_ms']):>24}  "
              f"{cell(s['e2e_p50_ms']):>24}  {cell(s['idle_cpu_pct'], 2):>20}")
    ours = intervals[0]
    for other in intervals[1:]:
        a, b = summaries[other], summaries[ours]
        print(f"{label(other)} / {label(ours)}: pickup p50 {a['pickup_p50_ms']['median'] / b['pickup_p50_ms']['median']:.1f}x, "
              f"p95 {a['pickup_p95_ms']['median'] / b['pickup_p95_ms']['median']:.1f}x, "
              f"e2e p50 {a['e2e_p50_ms']['median'] / b['e2e_p50_ms']['median']:.2f}x, "
              f"idle CPU {a['idle_cpu_pct']['median'] / max(b['idle_cpu_pct']['median'], 1e-9):.2f}x")
    for interval in intervals:
        s = summaries[interval]
        p50, p95 = s["pickup_p50_ms"]["median"], s["pickup_p95_ms"]["median"]
        print(f"goal at {label(interval)}: pickup p50 {p50:.1f} <= {GOAL_P50_MS:.0f} ms "
              f"{'MET' if p50 <= GOAL_P50_MS else 'MISSED'}; p95 {p95:.1f} <= {GOAL_P95_MS:.0f} ms "
              f"{'MET' if p95 <= GOAL_P95_MS else 'MISSED'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--polling-intervals", type=parse_interval, nargs="+", default=[0.05, 1.0],
                        help="queue.polling_interval_s values; the first is the one the others are compared to")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--idle-s", type=float, default=10.0)
    parser.add_argument("--max-gap-s", type=float, default=None,
                        help="random pause before each submit, up to this (default: the largest interval)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    intervals = args.polling_intervals
    if args.max_gap_s is None:
        # Kombu's default (none) is 1 s
        args.max_gap_s = max(1.0 if i is None else i for i in intervals)

    print(f"# {datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"# {' '.join([Path(sys.executable).name, *sys.argv])}")
    ensure_tiny_models(REPO / "models" / "tiny")
    rng = random.Random(args.seed)
    per_round: dict[float | None, list[dict]] = {interval: [] for interval in intervals}
    for round_no in range(args.rounds):
        # Alternate the order each round: the app started second runs on a warmer machine.
        order = intervals if round_no % 2 == 0 else list(reversed(intervals))
        for interval in order:
            result = run_app(interval, args, rng)
            per_round[interval].append(result)
            print(f"round {round_no + 1}, interval {label(interval)}: pickup p50 {result['pickup_p50_ms']:.1f} ms, "
                  f"p95 {result['pickup_p95_ms']:.1f} ms, e2e p50 {result['e2e_p50_ms']:.1f} ms, "
                  f"idle CPU {result['idle_cpu_pct']:.2f} %", flush=True)

    keys = ("pickup_p50_ms", "pickup_p95_ms", "e2e_p50_ms", "idle_cpu_pct")
    summaries = {i: {k: summarize(per_round[i], k) for k in keys} for i in intervals}
    report(intervals, summaries, args)
    if args.json:
        args.json.write_text(json.dumps({
            "date": datetime.now().astimezone().isoformat(timespec="seconds"), "command": sys.argv,
            "goals": {"pickup_p50_ms": GOAL_P50_MS, "pickup_p95_ms": GOAL_P95_MS},
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "results": [{"polling_interval_s": i, "summary": summaries[i], "rounds": per_round[i]} for i in intervals],
        }, indent=2))
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
