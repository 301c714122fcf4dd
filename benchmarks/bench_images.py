"""Text-to-image throughput: Atelier's ingress against a plain FastAPI server, same run, same model.

Both serve the tiny SDXL at 64x64 and get the same 32 concurrent requests. The plain server is
what simple servers in this field do: one endpoint that calls the pipeline per request.
Prints requests/s, p50/p99 latency and their ratios, and the single-request overhead of the
ingress over a direct in-process pipeline call.

    .venv/bin/python benchmarks/bench_images.py [--requests 32] [--steps 4]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs.local_runner import LocalServeApp, free_port  # noqa: E402
from configs.tiny_models import ensure_tiny_models  # noqa: E402

PLAIN_SERVER = textwrap.dedent("""
    import base64, io, sys, threading, torch
    from diffusers import StableDiffusionXLPipeline
    from fastapi import FastAPI
    from pydantic import BaseModel
    import uvicorn

    torch.set_num_threads(2)
    pipe = StableDiffusionXLPipeline.from_pretrained(sys.argv[1])
    pipe.set_progress_bar_config(disable=True)
    app = FastAPI()
    # Without this lock, concurrent requests share the scheduler's state and fail (500s seen
    # here with 32 concurrent requests); a working plain server has to serialize calls.
    lock = threading.Lock()

    class Req(BaseModel):
        prompt: str
        seed: int = 0
        steps: int = 4
        size: str = "64x64"

    @app.post("/v1/images/generations")
    def generate(req: Req):
        width, height = map(int, req.size.split("x"))
        with lock:
            image = pipe(req.prompt, num_inference_steps=req.steps, width=width, height=height,
                         generator=torch.Generator().manual_seed(req.seed)).images[0]
        buf = io.BytesIO(); image.save(buf, format="PNG")
        return {"data": [{"b64_json": base64.b64encode(buf.getvalue()).decode()}]}

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
""")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


async def burst(url: str, count: int, steps: int) -> tuple[float, list[float]]:
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(i: int) -> float:
            started = time.perf_counter()
            response = await client.post(url, json={"prompt": f"benchmark image {i}", "seed": i, "steps": steps,
                                                    "size": "64x64", "response_format": "b64_json"})
            response.raise_for_status()
            return time.perf_counter() - started

        started = time.perf_counter()
        latencies = await asyncio.gather(*(one(i) for i in range(count)))
        return time.perf_counter() - started, list(latencies)


def sequential_ms(url: str, count: int, steps: int) -> float:
    times = []
    with httpx.Client(timeout=600) as client:
        for i in range(count):
            started = time.perf_counter()
            client.post(url, json={"prompt": "single", "seed": i, "steps": steps, "size": "64x64",
                                   "response_format": "b64_json"}).raise_for_status()
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def direct_ms(model: Path, count: int, steps: int) -> float:
    import torch
    from diffusers import StableDiffusionXLPipeline

    torch.set_num_threads(2)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(model))
    pipe.set_progress_bar_config(disable=True)
    times = []
    for i in range(count + 1):
        started = time.perf_counter()
        pipe("single", num_inference_steps=steps, width=64, height=64, generator=torch.Generator().manual_seed(i))
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:]) * 1000  # first call warms up


def wait_http(url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--singles", type=int, default=10)
    args = parser.parse_args()
    model = ensure_tiny_models(REPO / "models" / "tiny")["sdxl"]
    results = {}

    # 1. Direct in-process pipeline call: the floor for a single request.
    direct = direct_ms(model, args.singles, args.steps)

    # 2. Plain FastAPI server, one pipeline call per request.
    port = free_port()
    plain = subprocess.Popen([sys.executable, "-c", PLAIN_SERVER, str(model), str(port)],
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = f"http://127.0.0.1:{port}/v1/images/generations"
        wait_http(f"http://127.0.0.1:{port}/docs")
        asyncio.run(burst(url, 4, args.steps))  # warm-up
        results["plain"] = asyncio.run(burst(url, args.requests, args.steps))
        plain_single = sequential_ms(url, args.singles, args.steps)
    finally:
        plain.terminate()
        plain.wait()

    # 3. Atelier: configs/local.yaml under `serve run`.
    # One SDXL replica, like the plain server: the comparison is of serving, not of replica count.
    one_replica = {"SDXLDeployment": {"autoscaling_config": None, "num_replicas": 1}}
    with tempfile.TemporaryDirectory() as scratch, LocalServeApp(Path(scratch), deployments_update=one_replica) as app:
        url = f"{app.base_url}/v1/images/generations"
        asyncio.run(burst(url, 4, args.steps))
        results["atelier"] = asyncio.run(burst(url, args.requests, args.steps))
        atelier_single = sequential_ms(url, args.singles, args.steps)

    print(f"\n{args.requests} concurrent text-to-image requests, tiny SDXL, 64x64, {args.steps} steps")
    print(f"{'server':<10}{'req/s':>10}{'p50 s':>10}{'p99 s':>10}")
    for name, (wall, latencies) in results.items():
        print(f"{name:<10}{len(latencies) / wall:>10.2f}{percentile(latencies, 50):>10.3f}"
              f"{percentile(latencies, 99):>10.3f}")
    (plain_wall, plain_lat), (atelier_wall, atelier_lat) = results["plain"], results["atelier"]
    print(f"throughput ratio atelier/plain: {plain_wall / atelier_wall:.2f}x")
    print(f"p50 latency ratio atelier/plain: {percentile(atelier_lat, 50) / percentile(plain_lat, 50):.2f}")
    print(f"p99 latency ratio atelier/plain: {percentile(atelier_lat, 99) / percentile(plain_lat, 99):.2f}")
    print(f"single request: direct {direct:.1f} ms, plain server {plain_single:.1f} ms, atelier {atelier_single:.1f} ms")
    print(f"ingress overhead over a direct pipeline call: {atelier_single - direct:.1f} ms "
          f"(plain server: {plain_single - direct:.1f} ms)")


if __name__ == "__main__":
    main()
