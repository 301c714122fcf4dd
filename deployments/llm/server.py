"""The language model's Serve deployment: Ray LLM's `LLMServer`, with one change to how a
streamed answer is sent on.

`LLMServer` wraps every stream in Ray's `Batcher`, which waits a full `stream_batching_interval_ms`
(50 ms by default) before it sends anything, the first token included, and then sends what came
in each interval. At 0 it sends every token as its own Serve message: on a fast engine that flood
of messages through two Serve hops (LLM replica → ingress → proxy) is what limits tokens/s
(benchmarks/bench_llm.py). `FirstChunkBatcher` sends the first chunk at once and then at most
one message per interval, holding whatever arrived meanwhile: time to first token as at 0.

The interval is the replica's, shared by its streams: with n streams in flight each one waits n
intervals between messages (up to `stream_batching_max_interval_ms`), so the replica sends about
1000 / interval messages a second however many clients stream. Every message costs CPU in three
processes (this replica, the ingress, the proxy) whatever it carries; a lone stream still gets a
message every interval, and eight share the same budget in larger messages.
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncGenerator, Callable, TypeVar

from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine
from ray.serve.llm.deployment import LLMServer

T = TypeVar("T")


class FirstChunkBatcher:
    """Lists of a generator's items: the first at once, later ones at most every `interval_s`
    (seconds, or a function giving the current interval)."""

    def __init__(self, generator: AsyncGenerator[T, None], interval_s: float | Callable[[], float]):
        self.generator = generator
        self.interval_s = interval_s if callable(interval_s) else (lambda: interval_s)

    async def stream(self) -> AsyncGenerator[list[T], None]:
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def read() -> None:
            try:
                async for item in self.generator:
                    queue.put_nowait(item)
            finally:
                queue.put_nowait(done)

        reader = asyncio.ensure_future(read())
        last_sent = float("-inf")
        finished = False
        try:
            while not finished:
                pending = [await queue.get()]  # wait for something to send
                wait = self.interval_s() - (time.monotonic() - last_sent)
                if wait > 0 and pending[0] is not done:
                    # the last message left less than an interval ago; the stream's end sends at once
                    await asyncio.wait({reader}, timeout=wait)
                while not queue.empty():
                    pending.append(queue.get_nowait())
                if pending and pending[-1] is done:
                    pending.pop()
                    finished = True
                if pending:
                    last_sent = time.monotonic()
                    yield pending
            reader.result()  # the engine's error, if it raised
        finally:
            reader.cancel()


class GemmaEngine(VLLMEngine):
    """Ray LLM's vLLM engine, with vLLM's own executor choice on CPU.

    Ray LLM sets `distributed_executor_backend="mp"` on CPU for every model: one model worker
    process beside the engine core, which polls its message queue between steps and so holds a
    core. With one worker (tensor and pipeline parallel 1) vLLM's own default is the in-process
    `uni` executor, which is what this keeps. On GPUs Ray's choice ("ray") stands.
    """

    def _prepare_engine_config(self, callback_ctx):
        engine_args, frontend_args, engine_config = super()._prepare_engine_config(callback_ctx)
        parallel = engine_config.parallel_config
        if engine_config.device_config.device_type == "cpu" and parallel.world_size == 1:
            parallel.distributed_executor_backend = "uni"
        return engine_args, frontend_args, engine_config


class GemmaServer(LLMServer):
    """`LLMServer` whose streams send their first chunk at once (see the module's docstring), and
    which also takes a chat request as its JSON dict (`chat_json`)."""

    # Keys Ray Data LLM's ServeDeploymentStage adds to each request for its own bookkeeping.
    _STAGE_KEYS = frozenset({"idx_in_batch"})
    _streams = 0  # streams in flight on this replica (their batchers share its message budget)

    async def chat_json(self, body: dict, raw_request_info=None):
        """`chat` in JSON: the request as a dict in, each answer (ChatCompletionResponse, ErrorResponse)
        as its dict out. For the dataset captioning job's Ray Data LLM stage (graphs/captioning.py):
        the stage's actor then never loads vLLM's protocol classes (with torch), which would be
        most of its start (~12 s on 2 cores, for a job whose 200 captions take about 5 s)."""
        from pydantic import BaseModel
        from ray.serve.llm.openai_api_models import ChatCompletionRequest

        request = ChatCompletionRequest.model_validate({k: v for k, v in body.items() if k not in self._STAGE_KEYS})
        async for answer in await self.chat(request, raw_request_info):
            yield answer.model_dump(mode="json") if isinstance(answer, BaseModel) else answer

    def _batch_output_stream(self, generator):
        interval_ms = self._get_batch_interval_ms()
        if not interval_ms:
            return super()._batch_output_stream(generator)  # 0: every chunk on its own, as Ray does
        cap_ms = self._llm_config.experimental_configs.get("stream_batching_max_interval_ms") or interval_ms

        def interval_s() -> float:
            return min(cap_ms, interval_ms * max(1, self._streams)) / 1000

        return self._counted(FirstChunkBatcher(generator, interval_s).stream())

    async def _counted(self, batches: AsyncGenerator[list[T], None]) -> AsyncGenerator[list[T], None]:
        self._streams += 1
        try:
            async for batch in batches:
                yield batch
        finally:
            self._streams -= 1
            await batches.aclose()
