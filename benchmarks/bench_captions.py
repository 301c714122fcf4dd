"""Dataset captioning throughput: the captioning job (Ray Data LLM against the app's GemmaDeployment)
against a plain loop of one request per image to the same deployment, measured in the same run
with interleaved rounds.

    python benchmarks/bench_captions.py [--images 200] [--rounds 3] [--style sentence] [--json out.json]
    python benchmarks/bench_captions.py --gpu --model /models/gemma-3-4b-it [--max-model-len 4096]

One `serve run` of configs/local.yaml (only the LLM and the one SDXL replica the app needs), a
dataset of `--images` sample shapes (storage/sample_dataset.py, 64x64), and two paths:
- job: POST /v1/datasets/{id}/captions {"overwrite": true} and poll /v1/jobs/{id} to its end: the
  whole job as a user gets it (Ray Data's pipeline start, reading the images, the requests, the
  new version's commit). images/s = images / wall time from the POST to the completed job. An image
  the random tiny model answers with a blank caption counts (it was asked and answered; the report
  gives how many), in both paths.
- loop: the same chat bodies (vision.build_caption_chat, same settings), sent from this driver to
  the same deployment through a DeploymentHandle, one request at a time, each image read from
  storage first: what a job without batching would do.

A warm-up (a 4-image job and 4 loop requests) runs first. Each round runs both paths; the order
alternates between rounds. The report gives each path's median images/s over rounds (min–max) and
the per-round ratio job / loop (goal >= 2). `--gpu` is the same code with GPU engine settings
(for a session with a device): give `--model` a Gemma 3 folder.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_llm import device_name  # noqa: E402  (the same device line as the LLM benchmark)

PATHS = ("job", "loop")
READY_TIMEOUT_S = 900


def llm_args(args: argparse.Namespace) -> dict:
    """The `llm:` section: configs/local.yaml's, or with --gpu settings for one GPU (as bench_llm.py)."""
    config = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())
    llm = dict(config["applications"][0]["args"]["llm"])
    if args.model:
        llm["model_source"] = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    if args.gpu:
        llm.update({
            "max_model_len": args.max_model_len or 4096,
            "engine_kwargs": {"dtype": "bfloat16", "gpu_memory_utilization": args.gpu_memory_utilization,
                              "limit_mm_per_prompt": {"image": 4}},
            "placement_group_config": {"bundles": [{"GPU": 1, "CPU": 1}]},
            "runtime_env": None,  # the multiprocess engine core, as in production
        })
    elif args.max_model_len:
        llm["max_model_len"] = args.max_model_len
    return llm


# --- the two paths ------------------------------------------------------------------------------


def make_dataset(storage_root: str, name: str, count: int) -> tuple[str, list[dict]]:
    """A dataset of `count` uncaptioned sample shapes in the app's storage; (its id, its rows)."""
    from storage.datasets import DatasetStore, ImageItem
    from storage.fs import Storage
    from storage.sample_dataset import sample_items

    store = DatasetStore(Storage(storage_root))
    dataset = store.create(name, trigger_word="sks")
    items = [ImageItem(filename=item.filename, data=item.data) for item in sample_items(count, seed=len(name))]
    store.add_images(dataset.id, items)
    return dataset.id, store.manifest(dataset.id).to_pylist()


def run_job(http: httpx.Client, dataset_id: str, style: str, timeout_s: float = 3600) -> dict:
    start = time.perf_counter()
    made = http.post(f"/v1/datasets/{dataset_id}/captions", json={"overwrite": True, "style": style})
    made.raise_for_status()
    job_id = made.json()["id"]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("completed", "failed", "cancelled"):
            break
        time.sleep(0.1)
    wall = time.perf_counter() - start
    if job["status"] != "completed":
        raise RuntimeError(f"caption job {job_id} {job['status']}: {job.get('error')}")
    result = job["result"]
    answered = result["captioned"] + result["failed"]  # a random model's blank answer is still an answer
    if answered != result["images"]:
        raise RuntimeError(f"caption job {job_id} did not ask about every image: {result}")
    return {"images": answered, "empty": result["failed"], "wall_s": wall, "images_per_s": answered / wall,
            "job_s": job["finished_at"] - job["started_at"]}


def run_loop(handle, storage_root: str, rows: list[dict], model: str, style: str) -> dict:
    """One request per image, in turn, to the deployment (no batching), the chat body as the job's."""
    from ray.serve.llm.openai_api_models import ChatCompletionRequest

    from deployments.llm.vision import CaptionSettings, answer_text, build_caption_chat, clean_caption
    from storage.datasets import image_content_type
    from storage.fs import Storage

    storage, settings = Storage(storage_root), CaptionSettings(style=style)
    start, empty = time.perf_counter(), 0
    for row in rows:
        body = build_caption_chat(storage.get_bytes(row["key"]), model, settings, image_content_type(row["key"]))
        stream = handle.options(stream=True).chat.remote(ChatCompletionRequest(**body), None)
        answer = next(iter(stream))
        text, _ = answer_text(answer.model_dump() if hasattr(answer, "model_dump") else answer)
        empty += not clean_caption(text)
    wall = time.perf_counter() - start
    return {"images": len(rows), "empty": empty, "wall_s": wall, "images_per_s": len(rows) / wall}


def measure(ray, http: httpx.Client, storage_root: str, model: str, args: argparse.Namespace,
            rounds: list[dict]) -> None:
    from ray import serve

    handle = serve.get_deployment_handle("GemmaDeployment", "atelier")
    warm_id, warm_rows = make_dataset(storage_root, "warmup", 4)
    run_job(http, warm_id, args.style)
    run_loop(handle, storage_root, warm_rows, model, args.style)
    dataset_id, rows = make_dataset(storage_root, "bench", args.images)
    for r in range(args.rounds):
        results: dict = {}
        for path in (PATHS if r % 2 == 0 else PATHS[::-1]):
            if path == "job":
                results[path] = run_job(http, dataset_id, args.style)
            else:
                results[path] = run_loop(handle, storage_root, rows, model, args.style)
            extra = f", the job itself {results[path]['job_s']:.1f} s" if path == "job" else ""
            print(f"round {r + 1}/{args.rounds} {path}: {results[path]['wall_s']:.1f} s, "
                  f"{results[path]['images_per_s']:.2f} images/s ({results[path]['empty']} blank answers{extra})",
                  flush=True)
        results["ratio"] = results["job"]["images_per_s"] / results["loop"]["images_per_s"]
        rounds.append(results)


# --- the report ---------------------------------------------------------------------------------


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    if not values:
        return "—"
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each runs both paths")
    parser.add_argument("--style", choices=("tags", "sentence"), default="sentence")
    parser.add_argument("--model", metavar="PATH_OR_ID", help="model folder or hub id (default: local.yaml's tiny Gemma 3)")
    parser.add_argument("--gpu", action="store_true", help="GPU engine settings instead of local.yaml's CPU ones")
    parser.add_argument("--max-model-len", type=int, help="context length (default: 4096 with --gpu, else local.yaml's)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument("--json", type=Path, help="write settings, per-round results and the summary here")
    args = parser.parse_args()

    from deployments.llm.vision import CaptionSettings
    from local.runner import LocalServeApp

    llm = llm_args(args)
    device = device_name(args.gpu)
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    header = f"{datetime.datetime.now().isoformat(timespec='seconds')} · {device} · `{command}`"
    settings = CaptionSettings(style=args.style)
    setting = (f"{llm['model_source']}, {args.images} images of 64x64 per path and round, {args.rounds} round(s), "
               f"style {args.style}, max_tokens {settings.max_tokens}, temperature {settings.temperature}")
    print(header, flush=True)

    rounds: list[dict] = []
    one_sdxl = {"SDXLDeployment": {"autoscaling_config": None, "num_replicas": 1}}
    with tempfile.TemporaryDirectory() as scratch, \
            LocalServeApp(Path(scratch), args_update={"llm": llm, "svd": None, "upscaler": None},
                          deployments_update=one_sdxl, ready_timeout_s=READY_TIMEOUT_S) as app, \
            httpx.Client(base_url=app.base_url, timeout=300) as http:
        storage_root = str(Path(scratch) / "storage")
        ray = app.connect_ray()
        try:  # a failure is printed before the app stops: a driver that loses its cluster exits at once
            measure(ray, http, storage_root, llm.get("model_id", "gemma"), args, rounds)
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            raise
        finally:
            ray.shutdown()

    summary = {path: [r[path]["images_per_s"] for r in rounds] for path in PATHS}
    summary["ratio"] = [r["ratio"] for r in rounds]
    print(f"\n{header}\n{setting}; median (min–max) over rounds\n")
    for path in PATHS:
        print(f"{path:<5} images/s: {spread(summary[path])}")
    print(f"\njob / loop images/s: {spread(summary['ratio'])}   (goal >= 2)")
    if args.json:
        args.json.write_text(json.dumps({"date": header.split(" · ")[0], "device": device, "command": command,
                                         "setting": setting, "llm_args": llm, "rounds": rounds,
                                         "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
