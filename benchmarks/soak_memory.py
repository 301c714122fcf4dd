"""Memory soak: many image requests through the ingress; does any process keep growing?

Sends a mix of text-to-image (URL and b64_json answers, the URL fetched back) and image-edit
uploads, and samples the resident memory (RSS) of HAProxy (the app's port, configs/ray.env), the
Serve proxy, the ingress and the SDXL replicas. The level after the warm-up is the baseline;
each process must end within
`--tolerance` (10%) of it. Exit 1 if one does not.

    .venv/bin/python benchmarks/soak_memory.py [--requests 2000] [--warmup 200] [--concurrency 8]
    .venv/bin/python benchmarks/soak_memory.py --attach "BASE_URL,RAY_ADDRESS"   # a running app
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from local.runner import LocalServeApp  # noqa: E402

WATCHED = ("IngressDeployment", "SDXLDeployment")


def _pid_of(actor) -> int:
    import ray

    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)


def haproxy_on(port: int) -> int | None:
    """The pid of the HAProxy listening on `port` (Serve's HAProxy ingress), if one is."""
    import psutil

    return next((conn.pid for conn in psutil.net_connections("tcp")
                 if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid
                 and psutil.Process(conn.pid).name() == "haproxy"), None)


def watched_processes(ray, port: int | None = None) -> dict[str, int]:
    """label -> pid of HAProxy on `port`, the Serve proxy and the watched replicas (all on this machine)."""
    processes = {}
    if port is not None and (pid := haproxy_on(port)) is not None:
        processes["haproxy"] = pid
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name = entry["name"]
        label = ("proxy" if name.startswith("SERVE_PROXY_ACTOR")
                 else next((d for d in WATCHED if f"#{d}#" in name and name.startswith("SERVE_REPLICA::")), None))
        if label:
            actor = ray.get_actor(name, namespace=entry["namespace"])
            label = f"{label}:{name.rsplit('#', 1)[-1][:8]}" if label != "proxy" else "proxy"
            processes[label] = _pid_of(actor)
    return processes


def rss_mib(pids: dict[str, int]) -> dict[str, float | None]:
    import psutil

    out = {}
    for label, pid in pids.items():
        try:
            out[label] = psutil.Process(pid).memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            out[label] = None  # replaced mid-run: reported, not compared
    return out


def _edit_upload() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (120, 80, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


async def send(base_url: str, count: int, concurrency: int, offset: int) -> list[int]:
    """`count` requests, `concurrency` at a time; returns the status codes."""
    upload = _edit_upload()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(offset, offset + count):
        queue.put_nowait(i)
    statuses: list[int] = []

    async with httpx.AsyncClient(base_url=base_url, timeout=300) as http:
        async def worker():
            while not queue.empty():
                i = queue.get_nowait()
                kind = i % 10
                body = {"prompt": f"soak {i}", "size": "64x64", "steps": 2, "seed": i}
                if kind < 7:  # stored output, then fetched back like a browser would
                    response = await http.post("/v1/images/generations", json=body)
                    if response.status_code == 200:
                        fetched = await http.get(response.json()["data"][0]["url"])
                        statuses.append(fetched.status_code)
                elif kind < 9:
                    response = await http.post("/v1/images/generations", json={**body, "response_format": "b64_json"})
                else:
                    response = await http.post(
                        "/v1/images/edits", files={"image": ("in.png", upload, "image/png")},
                        data={"prompt": body["prompt"], "steps": "2", "seed": str(i), "response_format": "b64_json"})
                statuses.append(response.status_code)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


def soak(base_url: str, ray, requests: int, warmup: int, concurrency: int, samples: int = 8,
         log=print) -> dict:
    """Runs the soak; returns {"baseline", "final", "ratios", "statuses", "pids", "elapsed_s", "replaced"}."""
    statuses = asyncio.run(send(base_url, warmup, concurrency, 0))
    pids = watched_processes(ray, httpx.URL(base_url).port)
    baseline = rss_mib(pids)
    log(f"after {warmup} warm-up requests: " + ", ".join(f"{k} {v:.0f} MiB" for k, v in baseline.items() if v))
    started, sent, history = time.monotonic(), 0, []
    chunk = max(1, requests // samples)
    while sent < requests:
        n = min(chunk, requests - sent)
        statuses += asyncio.run(send(base_url, n, concurrency, warmup + sent))
        sent += n
        history.append(rss_mib(pids))
        log(f"{sent:5d} requests: " + ", ".join(f"{k} {v:.0f}" for k, v in history[-1].items() if v))
    # the last samples' median, so one sample caught mid-request does not decide
    final = {label: statistics.median([h[label] for h in history[-3:] if h[label] is not None] or [0])
             for label in pids}
    ratios = {label: final[label] / baseline[label] for label in pids if baseline[label] and final[label]}
    # HAProxy reloads into a new process when its config changes: not a replaced replica
    replaced = [label for label, rss in history[-1].items() if rss is None and label != "haproxy"]
    return {"baseline": baseline, "final": final, "ratios": ratios, "statuses": statuses, "pids": pids,
            "elapsed_s": time.monotonic() - started, "replaced": replaced}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--tolerance", type=float, default=0.10)
    parser.add_argument("--attach", help='"BASE_URL,RAY_ADDRESS" of a running app instead of starting one')
    args = parser.parse_args()

    import ray

    with tempfile.TemporaryDirectory() as scratch:
        app = LocalServeApp.attached(args.attach) if args.attach else LocalServeApp(Path(scratch))
        with app:
            ray.init(address=app.ray_address(), namespace="serve", log_to_driver=False)
            try:
                report = soak(app.base_url, ray, args.requests, args.warmup, args.concurrency)
            finally:
                ray.shutdown()
    bad_status = sorted({s for s in report["statuses"] if s != 200})
    print(f"\n{args.requests} requests after {args.warmup} warm-up in {report['elapsed_s']:.0f} s "
          f"({args.requests / report['elapsed_s']:.1f} req/s); non-200 statuses: {bad_status or 'none'}")
    print(f"{'process':<28}{'after warm-up MiB':>18}{'final MiB':>12}{'ratio':>8}")
    for label, ratio in report["ratios"].items():
        print(f"{label:<28}{report['baseline'][label]:>18.0f}{report['final'][label]:>12.0f}{ratio:>8.3f}")
    grown = {k: r for k, r in report["ratios"].items() if r > 1 + args.tolerance}
    if grown or bad_status or report["replaced"]:
        print(f"FAIL: grown past {args.tolerance:.0%}: {grown}; replaced: {report['replaced']}")
        return 1
    print(f"OK: every process within {args.tolerance:.0%} of its post-warm-up level")
    return 0


if __name__ == "__main__":
    sys.exit(main())
