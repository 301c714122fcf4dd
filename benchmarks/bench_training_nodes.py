"""LoRA training across Ray nodes: samples/s of 2 workers, one per node, against 1 worker, in the same run.

Starts a two-node Ray cluster with Ray's CLI (local/cluster.py: `ray start --head` and
`ray start --address`, each node with its own scratch dir and `node_a` / `node_b` resource), moto's
S3 server as storage (dataset and checkpoints), and runs the same training through `ray job submit`
(the cluster's token in the environment), in interleaved rounds:

- **1 worker**: the baseline;
- **2 workers, one per node** (`STRICT_SPREAD`, data-parallel: DDP all-reduce over TCP between the
  nodes' processes), the figure the goal is about (>= 1.8x the baseline on two real machines);
- **the ceiling**: two independent 1-worker runs at the same time, their samples/s added. It is
  what two workers can do on this hardware with no communication at all. Two "nodes" on one 2-core
  machine share the same cores, so this, not the ideal 2.00x, is the bound here.

Each worker gets one CPU (Ray sets its torch threads to 1), so one worker uses one core. The
samples/s are the run's own (training/loop.py: steps after the first, checkpoint and validation
time excluded); the job's start-up is reported apart.

    .venv/bin/python benchmarks/bench_training_nodes.py [--rounds 3] [--steps 16] [--images 16]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from local.cluster import LocalCluster, build_bundle  # noqa: E402
from local.tiny_models import ensure_tiny_models  # noqa: E402
from tests.s3_server import S3Server  # noqa: E402

BUCKET = "atelier-bench"


def png(seed: int) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--cpus-per-node", type=float, default=2)
    args = parser.parse_args()
    ensure_tiny_models(REPO / "models" / "tiny")

    from storage import Storage
    from storage.datasets import DatasetStore, ImageItem

    with S3Server(subprocess=True) as s3:
        s3.make_bucket(BUCKET)
        root = f"s3://{BUCKET}/bench"
        store = DatasetStore(Storage(root, s3.storage_options()))
        dataset_id = store.create("bench", trigger_word="sks").id
        store.add_images(dataset_id, [ImageItem(f"{i}.png", png(i), caption=f"photo {i}") for i in range(args.images)])
        bundle = build_bundle(Path(tempfile.mkdtemp(prefix="bench-bundle-")), models=("models/tiny/sdxl",))
        s3.client().upload_file(str(bundle), BUCKET, f"releases/{bundle.name}")
        runtime_env = json.dumps({"working_dir": f"s3://{BUCKET}/releases/{bundle.name}"})

        with LocalCluster(cpus_per_node=args.cpus_per_node, extra_env=s3.env()) as cluster:
            def run(name: str, workers: int) -> tuple[float, float]:
                """One training job through `ray job submit`: (its samples/s, the job's wall time)."""
                config = {"name": name, "base_model": "models/tiny/sdxl", "dataset_id": dataset_id,
                          "storage_root": root, "resolution": 64, "max_steps": args.steps,
                          "checkpoint_every_steps": args.steps, "num_workers": workers, "cpus_per_worker": 1,
                          "data_cpus": 0.1, "placement_strategy": "STRICT_SPREAD" if workers == 2 else "PACK",
                          "batch_size": 2, "cache_latents": True, "validation_seeds": [0],
                          "validation_inference_steps": 1}
                started = time.perf_counter()
                out = cluster.cli("ray", "job", "submit", "--address", cluster.dashboard_url, "--runtime-env-json",
                                  runtime_env, "--", "python", "-m", "training.cli", "--config-json",
                                  json.dumps(config), timeout_s=1800).stdout
                result = json.loads(next(line for line in reversed(out.splitlines()) if line.startswith('{"run_name"')))
                return result["metrics"]["samples_per_s"], time.perf_counter() - started

            rows: dict[str, list[float]] = {"1 worker": [], "2 workers, one per node": [],
                                            "ceiling: 2 independent 1-worker runs": []}
            for r in range(args.rounds):
                one, wall1 = run(f"bench-r{r}-1w", 1)
                two, wall2 = run(f"bench-r{r}-2w", 2)
                with ThreadPoolExecutor(2) as pool:
                    pair = list(pool.map(lambda i: run(f"bench-r{r}-solo{i}", 1), range(2)))
                ceiling = sum(rate for rate, _ in pair)
                rows["1 worker"].append(one)
                rows["2 workers, one per node"].append(two)
                rows["ceiling: 2 independent 1-worker runs"].append(ceiling)
                print(f"  round {r + 1}: 1 worker {one:.2f} samples/s ({wall1:.0f} s job); 2 workers {two:.2f} "
                      f"({wall2:.0f} s job); ceiling {ceiling:.2f} ({pair[0][0]:.2f} + {pair[1][0]:.2f})", flush=True)

    def spread(values):
        return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"

    ratios = [two / one for two, one in zip(rows["2 workers, one per node"], rows["1 worker"])]
    of_ceiling = [two / c for two, c in zip(rows["2 workers, one per node"], rows["ceiling: 2 independent 1-worker runs"])]
    ceiling_ratio = [c / one for c, one in zip(rows["ceiling: 2 independent 1-worker runs"], rows["1 worker"])]
    print(f"\nLoRA training, tiny SDXL at 64x64, batch 2 per worker, {args.steps} steps, median (min-max) of "
          f"{args.rounds} interleaved rounds:")
    print("| | samples/s |\n|---|---|")
    for name, values in rows.items():
        print(f"| {name} | {spread(values)} |")
    print(f"| 2 workers / 1 worker | **{statistics.median(ratios):.2f}x** ({min(ratios):.2f}-{max(ratios):.2f}) |")
    print(f"| ceiling / 1 worker (what this machine allows) | {statistics.median(ceiling_ratio):.2f}x |")
    print(f"| 2 workers / ceiling | {statistics.median(of_ceiling):.2f}x ({min(of_ceiling):.2f}-{max(of_ceiling):.2f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
