"""LoRA training scaling and adapter-switching latency, each against a baseline from the same run.

1. Training: the same LoRA run on the tiny SDXL (64x64) with 1 and with 2 Ray Train CPU workers;
   samples/s (optimizer steps after the first, all workers together) and the 2-worker/1-worker
   ratio. Latents are cached so the figure is the training step plus the gradient all-reduce.
2. Serving: latency of a text-to-image request on the SDXL deployment (in process, no Ray)
   - with an adapter that is already loaded (a switch: ``set_adapters``),
   - with an adapter loaded cold from the registry (``load_lora_weights`` from storage),
   - with a full pipeline reload plus adapter load, what a server without per-request adapters does,
   against a request without LoRA.

    .venv/bin/python benchmarks/bench_training.py [--steps 12] [--images 16] [--repeats 5]

On the tiny model the pipeline reload is cheap (11 MB); with SDXL's 7 GB it is tens of seconds,
so the reload ratio printed here is a lower bound.
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

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from local.runner import init_local_ray  # noqa: E402
from local.tiny_models import build_random_lora, ensure_tiny_models  # noqa: E402
from storage import Storage  # noqa: E402
from storage.registry import LoraRegistry  # noqa: E402



def png(seed: int) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def start_ray() -> None:
    init_local_ray(for_training=True)


def bench_training(root: str, model: Path, steps: int, images: int) -> dict[int, float]:
    from storage.datasets import DatasetStore, ImageItem
    from training.loop import train

    storage = Storage(root)
    store = DatasetStore(storage)
    dataset_id = store.create("bench", trigger_word="sks").id
    store.add_images(dataset_id, [ImageItem(f"{i}.png", png(i), caption=f"photo {i}") for i in range(images)])
    start_ray()
    rates = {}
    for workers in (1, 2):
        started = time.perf_counter()
        result = train({
            "name": f"bench-{workers}w", "base_model": str(model), "dataset_id": dataset_id, "resolution": 64,
            "max_steps": steps, "checkpoint_every_steps": steps, "num_workers": workers, "cpus_per_worker": 0.5,
            "batch_size": 2, "cache_latents": True, "validation_seeds": [0], "validation_inference_steps": 2,
            "storage_root": root})
        rates[workers] = result.metrics["samples_per_s"]
        print(f"  {workers} worker(s): {rates[workers]:.2f} samples/s "
              f"({steps} steps of {2 * workers} samples; run took {time.perf_counter() - started:.0f} s end to end)",
              flush=True)
    import ray

    ray.shutdown()
    return rates


def bench_switching(root: str, model: Path, repeats: int) -> dict[str, float]:
    from ray.serve.batching import _BatchQueue

    from deployments.sdxl.contract import SDXLRequest
    from deployments.sdxl.deployment import SDXLDeployment, load_sdxl_pipeline

    _BatchQueue._warn_if_max_batch_size_exceeds_max_ongoing_requests = lambda self: None  # no replica here
    registry = LoraRegistry(Storage(root))
    names = [f"style{i}" for i in range(repeats + 2)]
    for i, name in enumerate(names):
        with tempfile.TemporaryDirectory() as folder:
            registry.register(name, {"base_model": str(model), "rank": 4}, build_random_lora(model, folder, i))
    config = {"model": str(model), "storage_root": root, "default_size": 64, "min_size": 32, "default_steps": 4,
              "torch_num_threads": 2, "batch_wait_timeout_s": 0.0, "max_loras_per_replica": 2}
    sdxl = SDXLDeployment.func_or_class(config)
    loop = asyncio.new_event_loop()

    def generate(deployment, lora: str | None) -> float:
        started = time.perf_counter()
        loop.run_until_complete(deployment.generate(SDXLRequest(prompt="a dog", seed=1, lora=lora)))
        return time.perf_counter() - started

    generate(sdxl, None)  # warm-up
    base = [generate(sdxl, None) for _ in range(repeats)]
    generate(sdxl, names[0]), generate(sdxl, names[1])  # both cached now (capacity 2)
    warm = [generate(sdxl, names[i % 2]) for i in range(repeats * 2)]  # every request switches
    cold = [generate(sdxl, name) for name in names[2:]]  # each is a miss (and evicts one)
    reload = []
    for name in names[:repeats]:
        started = time.perf_counter()
        fresh = SDXLDeployment.func_or_class(config, pipeline_factory=load_sdxl_pipeline)
        generate(fresh, name)
        reload.append(time.perf_counter() - started)
        del fresh
    loop.close()
    return {"base": statistics.median(base), "warm": statistics.median(warm), "cold": statistics.median(cold),
            "reload": statistics.median(reload)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args()
    model = ensure_tiny_models(REPO / "models" / "tiny")["sdxl"]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    with tempfile.TemporaryDirectory() as root:
        if not args.skip_training:
            print("1. LoRA training on the tiny SDXL, Ray Train CPU workers (0.5 CPU each, 2 cores in all)")
            rates = bench_training(os.path.join(root, "train"), model, args.steps, args.images)
            print(f"  scaling 2 workers / 1 worker: {rates[2] / rates[1]:.2f}x (ideal 2.00x)\n")
        print("2. SDXL request latency with per-request LoRA (tiny SDXL, 64x64, 4 steps, median)")
        t = bench_switching(os.path.join(root, "serve"), model, args.repeats)
        print(f"  no LoRA:                        {t['base'] * 1000:8.1f} ms")
        print(f"  switch to a cached adapter:     {t['warm'] * 1000:8.1f} ms  ({t['warm'] / t['base']:.2f}x no LoRA)")
        print(f"  adapter loaded cold:            {t['cold'] * 1000:8.1f} ms  ({t['cold'] / t['warm']:.2f}x cached)")
        print(f"  full pipeline reload + adapter: {t['reload'] * 1000:8.1f} ms  ({t['reload'] / t['warm']:.2f}x cached)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
