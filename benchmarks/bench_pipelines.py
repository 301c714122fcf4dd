"""Composition overhead: text-to-image → upscale → image-to-video, composed vs direct, same run.

(a) Composed: the real app (configs/local.yaml, tiny models) runs a `videos.text_to_video` job
    with `upscale: true`: SDXL → x4 upscaler → SVD, three deployments called through
    DeploymentHandles by the job runner, handing each other storage keys.
(b) Direct: the same three diffusers pipelines, loaded from models/tiny/* in one process and
    called one after another with the same sizes, steps, seeds, guidance and torch threads,
    handing each other PIL images in memory, then the MP4 encode. That process runs in its own
    session at Ray's worker niceness, as the app's replicas do, so load from elsewhere on the
    machine weighs on both sides alike.

Both are warmed up, then run alternately (so machine noise hits both alike) `--repeats` times.
Prints medians: per stage, direct time, composed stage time and their difference (the
hand-off overhead: RPC, storage writes and reads, PNG encode/decode, progress records), the
gaps between stages, and the end-to-end ratio, both as the client sees it (submit → completed,
including the durable queue) and for the stages alone (first stage start → last stage end).

    .venv/bin/python benchmarks/bench_pipelines.py [--repeats 9] [--size 64x64] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from local.runner import LocalServeApp  # noqa: E402
from local.tiny_models import ensure_tiny_models  # noqa: E402

STAGES = ("generate", "upscale", "video")
RAY_WORKER_NICE = 15  # Ray starts its worker processes at this niceness
MODEL_SECTIONS = ("sdxl", "upscaler", "svd")
PROMPT = "a lighthouse on a cliff at dusk"


def local_args(threads: int) -> dict:
    """configs/local.yaml's args with `threads` torch threads per model. On a small shared machine
    more than one thread per model mostly measures OpenMP threads waiting for each other."""
    args = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())["applications"][0]["args"]
    for section in MODEL_SECTIONS:
        args[section]["torch_num_threads"] = threads
    return args


# --- (a) composed, through the running app ---------------------------------------------------------


def run_composed(client: httpx.Client, opts, seed: int) -> dict:
    """One text-to-video job; its stage timings come from the job record."""
    started = time.time()
    response = client.post("/v1/videos", json={
        "prompt": PROMPT, "size": f"{opts.width}x{opts.height}", "num_frames": opts.frames, "fps": 7,
        "seed": seed, "steps": opts.steps, "image_steps": opts.image_steps, "upscale": True,
        "upscale_steps": opts.upscale_steps, "decode_chunk_size": opts.frames})
    if response.status_code != 202:
        raise RuntimeError(f"POST /v1/videos answered {response.status_code}: {response.text}")
    job_id = response.json()["id"]
    while True:  # a gentle poll: the end time comes from the record, not from when we look
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("completed", "failed", "cancelled"):
            break
        time.sleep(0.25)
    if job["status"] != "completed":
        raise RuntimeError(f"job {job_id} ended {job['status']}: {job.get('error')}")
    stages = job["result"]["stages"]
    timing = {f"{name}_ms": (stages[name]["finished_at"] - stages[name]["started_at"]) * 1000 for name in STAGES}
    timing.update({f"{name}_compute_ms": stages[name]["elapsed_s"] * 1000 for name in STAGES})
    # What a stage costs beyond the model's own work in its replica: the handle call, reading
    # the input by key and decoding it, streaming progress.
    timing.update({f"{name}_call_ms": timing[f"{name}_ms"] - timing[f"{name}_compute_ms"] for name in STAGES})
    timing["queue_ms"] = (stages[STAGES[0]]["started_at"] - job["created_at"]) * 1000
    for before, after in zip(STAGES, STAGES[1:]):
        timing[f"{before}->{after}_gap_ms"] = (stages[after]["started_at"] - stages[before]["finished_at"]) * 1000
    timing["finish_ms"] = (job["finished_at"] - stages[STAGES[-1]]["finished_at"]) * 1000
    timing["stages_total_ms"] = (stages[STAGES[-1]]["finished_at"] - stages[STAGES[0]]["started_at"]) * 1000
    timing["total_ms"] = (job["finished_at"] - started) * 1000  # same clock: both on this machine
    timing["still"] = (stages["generate"]["width"], stages["generate"]["height"])
    return timing


# --- (b) direct, in this process ---------------------------------------------------------------------


class DirectPipelines:
    """The three pipelines called as the deployments call them, minus the serving around them."""

    def __init__(self, models: Path, args: dict):
        import torch
        from diffusers import StableDiffusionUpscalePipeline, StableDiffusionXLPipeline, StableVideoDiffusionPipeline

        self.torch = torch
        self.sdxl = StableDiffusionXLPipeline.from_pretrained(str(models / "sdxl"))
        self.upscaler = StableDiffusionUpscalePipeline.from_pretrained(str(models / "upscaler"))
        self.upscaler.vae.enable_tiling()  # as UpscalerDeployment does
        self.svd = StableVideoDiffusionPipeline.from_pretrained(str(models / "svd"))
        for pipe in (self.sdxl, self.upscaler, self.svd):
            pipe.set_progress_bar_config(disable=True)
        self.threads = {name: args[section]["torch_num_threads"]  # as each deployment has them
                        for name, section in (("generate", "sdxl"), ("upscale", "upscaler"), ("video", "svd"))}
        self.sdxl_guidance = args["sdxl"].get("default_guidance_scale", 5.0)
        self.noise_level = args["upscaler"].get("default_noise_level", 20)

    def _generator(self, seed: int):
        return self.torch.Generator("cpu").manual_seed(seed)

    def run(self, opts: dict, seed: int, still: tuple[int, int]) -> dict:
        from PIL import Image, ImageOps

        from deployments.media import encode_mp4

        timing = {}
        started = time.perf_counter()
        self.torch.set_num_threads(self.threads["generate"])
        image = self.sdxl(PROMPT, negative_prompt="", width=still[0], height=still[1],
                          num_inference_steps=opts["image_steps"], guidance_scale=self.sdxl_guidance,
                          generator=self._generator(seed)).images[0]
        mark = time.perf_counter()
        timing["generate_ms"] = (mark - started) * 1000

        self.torch.set_num_threads(self.threads["upscale"])
        image = self.upscaler(prompt=PROMPT, image=image, num_inference_steps=opts["upscale_steps"],
                              guidance_scale=9.0, noise_level=self.noise_level,
                              generator=self._generator(seed)).images[0]
        timing["upscale_ms"] = (time.perf_counter() - mark) * 1000
        mark = time.perf_counter()

        self.torch.set_num_threads(self.threads["video"])
        image = ImageOps.fit(image, (opts["width"], opts["height"]), Image.Resampling.LANCZOS)
        frames = self.svd(image, height=opts["height"], width=opts["width"], num_frames=opts["frames"],
                          num_inference_steps=opts["steps"], min_guidance_scale=1.0, max_guidance_scale=3.0, fps=7,
                          motion_bucket_id=127, noise_aug_strength=0.02, decode_chunk_size=opts["frames"],
                          generator=self._generator(seed), output_type="pil").frames[0]
        encode_mp4(frames, 7)
        timing["video_ms"] = (time.perf_counter() - mark) * 1000
        timing["total_ms"] = (time.perf_counter() - started) * 1000
        return timing


class Direct:
    """DirectPipelines in a worker process, in its own session and at Ray's worker niceness, as
    the app's replicas are: with the kernel's autogroup scheduling, a session is a scheduling
    group, so other load on the machine then weighs on both sides alike."""

    def __init__(self, models: Path, threads: int):
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--direct-worker", str(models), "--threads", str(threads)], cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, start_new_session=True)
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError("the direct worker did not start")

    def run(self, opts, seed: int, still: tuple[int, int]) -> dict:
        fields = ("width", "height", "frames", "steps", "image_steps", "upscale_steps")
        self.process.stdin.write(json.dumps({"opts": {f: getattr(opts, f) for f in fields}, "seed": seed,
                                             "still": still}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the direct worker died")
        return json.loads(line)

    def __enter__(self) -> "Direct":
        return self

    def __exit__(self, *exc) -> None:
        self.process.stdin.close()  # the worker's loop ends
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def direct_worker(models: str, threads: int) -> int:
    """One JSON request per stdin line → one JSON timing per line on the original stdout."""
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever the libraries print goes to stderr, not into the protocol
    os.nice(RAY_WORKER_NICE)
    pipelines = DirectPipelines(Path(models), local_args(threads))
    print("ready", file=protocol)
    for line in sys.stdin:
        request = json.loads(line)
        print(json.dumps(pipelines.run(request["opts"], request["seed"], tuple(request["still"]))), file=protocol)
    return 0


# --- report ------------------------------------------------------------------------------------------


def median(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def report(composed: list[dict], direct: list[dict], opts) -> None:
    print(f"\ntext-to-image → upscale → image-to-video, tiny models, still {composed[0]['still'][0]}x"
          f"{composed[0]['still'][1]} → x4 → video {opts.width}x{opts.height}, {opts.frames} frames; "
          f"medians of {len(direct)} runs each\n")
    print(f"{'stage':<10}{'direct ms':>11}{'composed ms':>13}{'difference':>12}{'in replica':>12}{'call overhead':>15}")
    for name in STAGES:
        d, c = median(direct, f"{name}_ms"), median(composed, f"{name}_ms")
        print(f"{name:<10}{d:>11.1f}{c:>13.1f}{c - d:>12.1f}{median(composed, f'{name}_compute_ms'):>12.1f}"
              f"{median(composed, f'{name}_call_ms'):>15.1f}")
    print("  (difference: composed stage - direct call; in replica: the model's own time as the deployment\n"
          "   reports it; call overhead: composed stage - in replica, i.e. RPC, reading the input by key,\n"
          "   progress streaming)")
    print("\nhand-offs in the composed job (ms):")
    print(f"  submit → first stage starts (durable queue)  {median(composed, 'queue_ms'):9.1f}")
    for before, after in zip(STAGES, STAGES[1:]):
        print(f"  {before} ends → {after} starts{'':<{27 - len(before) - len(after)}}"
              f"{median(composed, f'{before}->{after}_gap_ms'):9.1f}")
    print(f"  last stage ends → job completed            {median(composed, 'finish_ms'):9.1f}")
    d_total = median(direct, "total_ms")
    c_stages, c_total = median(composed, "stages_total_ms"), median(composed, "total_ms")
    print(f"\nend to end: direct {d_total:.1f} ms")
    print(f"  composed, stages only (first start → last end)  {c_stages:9.1f} ms   ratio {c_stages / d_total:.3f}")
    print(f"  composed, as the client sees it (incl. queue)   {c_total:9.1f} ms   ratio {c_total / d_total:.3f}")
    print(f"  goal: ratio ≤ 1.05 → {'met' if c_total / d_total <= 1.05 else 'not met'} end to end, "
          f"{'met' if c_stages / d_total <= 1.05 else 'not met'} for the stages")


def start_app(scratch: Path, threads: int) -> LocalServeApp:
    """The app with `threads` torch threads per model (LocalServeApp retries a missed Ray start)."""
    app = LocalServeApp(scratch, args_update={section: {"torch_num_threads": threads} for section in MODEL_SECTIONS})
    try:
        return app.start()
    except RuntimeError:
        stop_leftovers(app)  # a failed start can leave Ray's processes behind
        raise


def stop_leftovers(app: LocalServeApp) -> None:
    """Ray processes of this app's session that outlived `serve run` (seen on a loaded machine)."""
    import psutil

    if app.process is None:
        return
    session = app.process.pid  # started with start_new_session: its pid is the session id
    leftovers = [p for p in psutil.process_iter() if _session_of(p) == session]
    for process in leftovers:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(leftovers, timeout=10)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def _session_of(process) -> int | None:
    try:
        return os.getsid(process.pid)
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--size", default="64x64", help="video size; the still is a quarter of it, x4 upscaled")
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="SVD steps")
    parser.add_argument("--image-steps", type=int, default=4, help="SDXL steps")
    parser.add_argument("--upscale-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per model, on both sides")
    parser.add_argument("--direct-worker", metavar="MODELS", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.direct_worker:
        return direct_worker(opts.direct_worker, opts.threads)
    opts.width, opts.height = map(int, opts.size.split("x"))

    models = (REPO / local_args(opts.threads)["tiny_models_dir"]).resolve()
    ensure_tiny_models(models)
    direct = Direct(models, opts.threads)
    with direct, tempfile.TemporaryDirectory(prefix="bench-pipelines-") as scratch:
        print("starting the app (configs/local.yaml) ...", flush=True)
        app = start_app(Path(scratch), opts.threads)
        try:  # already started: `with app` would start a second one
            with httpx.Client(base_url=app.base_url, timeout=600) as client:
                warm = run_composed(client, opts, seed=0)  # loads, compiles and caches on both sides
                direct.run(opts, 0, warm["still"])
                composed_runs, direct_runs = [], []
                for i in range(1, opts.repeats + 1):
                    composed_runs.append(run_composed(client, opts, seed=i))
                    direct_runs.append(direct.run(opts, i, warm["still"]))
                    print(f"run {i}: composed {composed_runs[-1]['total_ms']:.0f} ms, "
                          f"direct {direct_runs[-1]['total_ms']:.0f} ms", flush=True)
        finally:
            app.stop()
            stop_leftovers(app)
    report(composed_runs, direct_runs, opts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
