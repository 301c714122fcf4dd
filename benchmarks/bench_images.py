"""Text-to-image serving: Atelier against a plain FastAPI server and against the hardware's ceiling,
measured in the same run, in interleaved rounds.

    .venv/bin/python benchmarks/bench_images.py [--rounds 3] [--requests 32] [--steps 4] [--plot PATH]
    .venv/bin/python benchmarks/bench_images.py --gpu --model FOLDER [--size 1024 --steps 30]

Same work on both sides: the same prompts, no negative prompt, the same seeds, PNGs encoded the
same way (compress level 1) and returned base64 in JSON. Only Atelier's ingress and one SDXL
replica are deployed (and the job runner the app always has, idle), so no other replica competes
for the cores; the plain server is one process that calls the pipeline per request under a lock,
as simple servers in this field do.

- ceiling: direct in-process pipeline calls of 8 images at once, the most this hardware does;
- single request: median latency of one request at a time, against a direct pipeline call;
- burst: `--requests` at once; images/s as a fraction of the ceiling and of the plain server;
- open loop: Poisson arrivals at fractions of the ceiling (`--loads`), p50/p99 latency against the
  throughput achieved, drawn as a PNG (`--plot`).

Each round measures direct, plain and Atelier (their order alternates); medians over rounds, with
the spread (min–max), are printed. On a shared machine one run proves nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
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

from local.runner import LocalServeApp, free_port  # noqa: E402
from local.tiny_models import ensure_tiny_models  # noqa: E402

PLAIN_SERVER = textwrap.dedent("""
    import base64, io, sys, threading, torch
    from diffusers import StableDiffusionXLPipeline
    from fastapi import FastAPI
    from pydantic import BaseModel
    import uvicorn

    model, port, device, dtype = sys.argv[1], int(sys.argv[2]), sys.argv[3], getattr(torch, sys.argv[4])
    torch.set_num_threads(2)
    pipe = StableDiffusionXLPipeline.from_pretrained(model, torch_dtype=dtype).to(device)
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
        n: int = 1

    @app.post("/v1/images/generations")
    def generate(req: Req):
        width, height = map(int, req.size.split("x"))
        with lock:
            images = pipe(req.prompt, num_inference_steps=req.steps, width=width, height=height,
                          num_images_per_prompt=req.n,
                          generator=[torch.Generator().manual_seed(req.seed + i) for i in range(req.n)]).images
        data = []
        for image in images:
            buf = io.BytesIO(); image.save(buf, format="PNG", compress_level=1)
            data.append({"b64_json": base64.b64encode(buf.getvalue()).decode()})
        return {"data": data}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
""")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def body(i: int, args) -> dict:
    return {"prompt": f"benchmark image {i}", "seed": i, "steps": args.steps, "size": f"{args.size}x{args.size}",
            "response_format": "b64_json"}


BATCHES: list[int] = []  # images per pipeline call, as Atelier reports them (`batch_images`)


async def post(client: httpx.AsyncClient, url: str, payload: dict) -> float:
    started = time.perf_counter()
    response = await client.post(url, json=payload)
    response.raise_for_status()
    answer = response.json()
    assert answer["data"][0]["b64_json"]
    if answer.get("batch_images"):
        BATCHES.append(answer["batch_images"])
    return time.perf_counter() - started


def batch_sizes_since(mark: int) -> float | None:
    """Mean images per pipeline call that the requests since `mark` ran in (None: not reported)."""
    sizes = BATCHES[mark:]
    return statistics.mean(sizes) if sizes else None


async def burst(url: str, args) -> dict:
    mark = len(BATCHES)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=256)) as client:
        started = time.perf_counter()
        latencies = await asyncio.gather(*(post(client, url, body(i, args)) for i in range(args.requests)))
        wall = time.perf_counter() - started
    return {"images_per_s": args.requests / wall, "p50_s": percentile(latencies, 50),
            "p99_s": percentile(latencies, 99), "batch": batch_sizes_since(mark)}


async def singles(url: str, args) -> float:
    async with httpx.AsyncClient(timeout=600) as client:
        await post(client, url, body(0, args))  # warm the connection
        times = [await post(client, url, body(i, args)) for i in range(args.singles)]
    return statistics.median(times) * 1000


async def open_loop(url: str, rate: float, count: int, args, seed: int) -> dict:
    """Poisson arrivals at `rate` requests/s, whatever the answers do (an open loop)."""
    gaps = random.Random(seed)
    mark = len(BATCHES)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=256)) as client:
        tasks, started = [], time.perf_counter()
        for i in range(count):
            tasks.append(asyncio.ensure_future(post(client, url, body(i, args))))
            await asyncio.sleep(gaps.expovariate(rate))
        latencies = await asyncio.gather(*tasks)
        wall = time.perf_counter() - started
    return {"offered": rate, "achieved": count / wall, "p50_s": percentile(latencies, 50),
            "p99_s": percentile(latencies, 99), "batch": batch_sizes_since(mark)}


class Direct:
    """The pipeline in this process: the floor for one request, the ceiling for throughput."""

    def __init__(self, model: Path, device: str, dtype: str):
        import torch
        from diffusers import StableDiffusionXLPipeline

        torch.set_num_threads(2)
        self.torch = torch
        self.pipe = StableDiffusionXLPipeline.from_pretrained(str(model), torch_dtype=getattr(torch, dtype)).to(device)
        self.pipe.set_progress_bar_config(disable=True)

    def call(self, n: int, seed: int, args, encode: bool = True) -> float:
        from deployments.media import encode_png

        started = time.perf_counter()
        images = self.pipe([f"benchmark image {seed}"] * n, num_inference_steps=args.steps, width=args.size,
                           height=args.size,
                           generator=[self.torch.Generator().manual_seed(seed + i) for i in range(n)]).images
        for image in images if encode else ():  # the same encoding the servers do
            encode_png(image)
        return time.perf_counter() - started

    def single_ms(self, args) -> float:
        """One image, encoded as the servers encode it: the same work as one request."""
        self.call(1, 0, args)
        return statistics.median(self.call(1, i, args) for i in range(args.singles)) * 1000

    def ceiling(self, args, batch: int = 8, calls: int = 3, encode: bool = False) -> float:
        """Pipeline throughput at batch 8, the best of `calls` calls: the most this hardware does (a
        shared machine only slows it). Without encoding by default; with it, the same work a server
        does for a client (on a CPU the encoding shares the cores with the pipeline)."""
        self.call(batch, 0, args, encode=encode)
        return max(batch / self.call(batch, i * batch, args, encode=encode) for i in range(calls))


def wait_http(url: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up")


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def plot(curves: dict[str, list[dict]], ceiling: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (name, points), color in zip(curves.items(), ("tab:blue", "tab:orange")):
        xs = [p["achieved"] for p in points]
        ax.plot(xs, [p["p50_s"] for p in points], "o-", color=color, label=f"{name} p50")
        ax.plot(xs, [p["p99_s"] for p in points], "s--", color=color, label=f"{name} p99")
    ax.axvline(ceiling, color="grey", linestyle=":", label=f"ceiling {ceiling:.2f} img/s (direct, batch 8)")
    ax.set_xlabel("achieved throughput (images/s)")
    ax.set_ylabel("latency (s)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=32, help="requests in the burst")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--singles", type=int, default=8, help="one-at-a-time requests per round")
    parser.add_argument("--loads", type=float, nargs="*", default=[0.3, 0.6, 0.9],
                        help="open-loop arrival rates as fractions of the ceiling (none: skip)")
    parser.add_argument("--load-requests", type=int, default=24, help="requests per open-loop rate")
    parser.add_argument("--plot", type=Path, default=REPO / "benchmarks" / "images_latency.png")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--model", type=Path, help="SDXL folder (default: the tiny model)")
    parser.add_argument("--gpu", action="store_true", help="CUDA in bf16 on every side (use with --model)")
    args = parser.parse_args()
    if args.gpu and (args.size, args.steps) == (64, 4):
        args.size, args.steps = 1024, 30
    model = args.model or ensure_tiny_models(REPO / "models" / "tiny")["sdxl"]
    device, dtype = ("cuda", "bfloat16") if args.gpu else ("cpu", "float32")
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])

    direct = Direct(model, device, dtype)
    port = free_port()
    plain = subprocess.Popen([sys.executable, "-c", PLAIN_SERVER, str(model), str(port), device, dtype],
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    sdxl_args = {"model": str(model), "default_size": args.size, "max_size": max(512, args.size)}
    if args.gpu:
        sdxl_args.update(device="cuda", dtype=dtype, torch_num_threads=None)
    only_sdxl = {"svd": None, "upscaler": None, "llm": None, "sdxl": sdxl_args}
    one_replica = {"SDXLDeployment": {"autoscaling_config": None, "num_replicas": 1}}
    if args.gpu:
        one_replica["SDXLDeployment"]["ray_actor_options"] = {"num_cpus": 1, "num_gpus": 0.5}
    results: dict = {"ceiling": [], "ceiling_encoded": [], "direct_ms": [], "plain": [], "atelier": []}
    try:
        with tempfile.TemporaryDirectory() as scratch, \
                LocalServeApp(Path(scratch), args_update=only_sdxl, deployments_update=one_replica) as app:
            urls = {"plain": f"http://127.0.0.1:{port}/v1/images/generations",
                    "atelier": f"{app.base_url}/v1/images/generations"}
            wait_http(f"http://127.0.0.1:{port}/docs")
            for url in urls.values():  # warm both
                asyncio.run(burst(url, argparse.Namespace(**{**vars(args), "requests": 8})))
            for r in range(args.rounds):
                results["direct_ms"].append(direct.single_ms(args))
                ceiling = direct.ceiling(args)
                results["ceiling"].append(ceiling)
                results["ceiling_encoded"].append(direct.ceiling(args, encode=True))
                for name in (("plain", "atelier") if r % 2 == 0 else ("atelier", "plain")):
                    url = urls[name]
                    measured = {"burst": asyncio.run(burst(url, args)), "single_ms": asyncio.run(singles(url, args)),
                                "open_loop": [asyncio.run(open_loop(url, load * ceiling, args.load_requests, args,
                                                                    seed=r))
                                              for load in args.loads]}
                    results[name].append(measured)
                print(f"round {r + 1}/{args.rounds}: ceiling {ceiling:.2f} img/s; burst "
                      + ", ".join(f"{n} {results[n][-1]['burst']['images_per_s']:.2f}" for n in urls), flush=True)
    finally:
        plain.terminate()
        plain.wait()

    report(args, results, command, device)


def report(args, results: dict, command: str, device: str) -> None:
    rounds = range(args.rounds)
    ceiling = results["ceiling"]
    burst_of = {n: [results[n][r]["burst"]["images_per_s"] for r in rounds] for n in ("plain", "atelier")}
    single_of = {n: [results[n][r]["single_ms"] for r in rounds] for n in ("plain", "atelier")}
    print(f"\n{datetime.date.today()} · {platform.node() or 'this machine'} · {device} · `{command}`")
    print(f"tiny-or-given SDXL, {args.size}x{args.size}, {args.steps} steps, {args.rounds} interleaved rounds; "
          "median (min–max)\n")
    print(f"ceiling, direct batch of 8:      {spread(ceiling)} images/s")
    print(f"  the same, PNGs encoded:        {spread(results['ceiling_encoded'])} images/s")
    print(f"burst of {args.requests}, plain server:    {spread(burst_of['plain'])} images/s")
    print(f"burst of {args.requests}, atelier:         {spread(burst_of['atelier'])} images/s")
    to_ceiling = [a / c for a, c in zip(burst_of["atelier"], ceiling)]
    plain_to_ceiling = [p / c for p, c in zip(burst_of["plain"], ceiling)]
    to_plain = [a / p for a, p in zip(burst_of["atelier"], burst_of["plain"])]
    print(f"  atelier / ceiling:             {spread(to_ceiling)}x   (goal >= 0.9)")
    print(f"  atelier / ceiling with PNGs:   "
          f"{spread([a / c for a, c in zip(burst_of['atelier'], results['ceiling_encoded'])])}x")
    print(f"  plain / ceiling:               {spread(plain_to_ceiling)}x")
    print(f"  atelier / plain:               {spread(to_plain)}x   (goal >= 1.3)")
    print(f"  atelier, images per pipeline call (mean of what the requests ran in): "
          f"{spread([results['atelier'][r]['burst']['batch'] for r in rounds], '{:.1f}')}")
    print(f"single request, direct call:     {spread(results['direct_ms'], '{:.0f}')} ms")
    print(f"single request, plain server:    {spread(single_of['plain'], '{:.0f}')} ms")
    print(f"single request, atelier:         {spread(single_of['atelier'], '{:.0f}')} ms")
    over = [a - d for a, d in zip(single_of["atelier"], results["direct_ms"])]
    print(f"  atelier - direct:              {spread(over, '{:+.0f}')} ms   (goal <= +30)")
    curves = {}
    if args.loads:
        print("\nopen loop (Poisson), median over rounds: offered → achieved img/s, p50 / p99 s")
        for name in ("plain", "atelier"):
            points = []
            for i, load in enumerate(args.loads):
                rows = [results[name][r]["open_loop"][i] for r in rounds]
                point = {k: statistics.median(row[k] for row in rows) for k in ("offered", "achieved", "p50_s", "p99_s")}
                points.append(point)
                batch = [row["batch"] for row in rows if row.get("batch")]
                print(f"  {name:<8} {load:.0%} of ceiling: {point['offered']:.2f} → {point['achieved']:.2f}, "
                      f"{point['p50_s']:.2f} / {point['p99_s']:.2f}"
                      + (f", {statistics.median(batch):.1f} images per call" if batch else ""))
            curves[name] = points
        if args.plot:
            plot(curves, statistics.median(ceiling), args.plot,
                 f"text-to-image {args.size}², {args.steps} steps, {device}, {datetime.date.today()}")
            print(f"latency-throughput curve: {args.plot}")
    if args.json:
        args.json.write_text(json.dumps({"command": command, "date": str(datetime.date.today()), "device": device,
                                         "results": results, "open_loop_medians": curves}, indent=1))


if __name__ == "__main__":
    main()
