"""Dataset captions through Ray Data LLM, against the LLM deployment that serves the app.

`ray_data_captioner` turns a captioning job's images into caption requests and runs them through a
Ray Data LLM processor (`ray.data.llm.build_processor`) built from `ServeDeploymentProcessorConfig`:

    ray.data.from_items(images)                       {sha256, key, content_type}
      → preprocess (Ray Data task)                     reads the image from storage; the chat body is
                                                       vision.build_caption_chat (image as a data: URL)
      → ServeDeploymentStage (one Ray Data actor)      chat_json.remote(body) on the running
                                                       GemmaDeployment, a whole batch in flight at once
      → postprocess (Ray Data task)                    {sha256, text, finish_reason, error}

Why the serving deployment and not `vLLMEngineProcessorConfig` (a vLLM engine of the job's own):
the replica that serves chat and refinement already holds the model. A second engine would need
its own copy of the weights and its own KV cache: on a GPU share sized for one engine it does
not fit, and on CPU it doubles the cores the model takes. Through the deployment, the job's
requests join live traffic in the same continuous batch, Serve's queue bounds and backpressure
apply to them, and the job needs no accelerator.

Ray Data gives each map task and actor one CPU unless told otherwise; the work here is the LLM
replica's, so every stage reserves `STAGE_CPUS` (a 2-core machine with the app's replicas on it
has no whole CPU to spare).

The stage sends each request as its JSON dict to GemmaServer.chat_json, which validates it into
vLLM's ChatCompletionRequest in the replica and answers a dict, rather than through `dtype_mapping`
(the stage building the ChatCompletionRequest, the replica answering a ChatCompletionResponse):
loading those classes in the stage's actor pulls in vLLM and torch, about 12 s of its start on two
cores, longer than the captions of 200 images take.

This module imports Ray only inside its functions: the job kind (graphs/dataset_jobs.py) and the
unit tests import it without Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

from deployments.llm.vision import CaptionSettings, build_caption_chat

# Rows per ServeDeploymentStage batch: its requests are in flight together (the stage's actor runs
# one batch at a time), half the replica's max_ongoing_requests in configs/local.yaml, so live
# traffic keeps room beside a job.
BATCH_SIZE = 32
STAGE_CPUS = 0.1
CHAT_METHOD = "chat_json"  # deployments/llm/server.py GemmaServer


@dataclass
class CaptionOutcome:
    """One image's answer: the caption text, or why there is none."""

    sha256: str
    text: str | None = None
    error: str | None = None
    finish_reason: str | None = None


# A captioner: caption tasks ({sha256, key, content_type}) in, their outcomes out, one list per batch.
Captioner = Callable[[list[dict]], Iterator[list[CaptionOutcome]]]


class CaptionRequest:
    """The preprocess step: one image's row -> the ServeDeploymentStage's row (the deployment's method,
    the request class's name and its fields). Runs in Ray Data tasks, so it holds only picklable
    state (the storage, the model's name, the settings)."""

    def __init__(self, storage: Any, model: str, settings: CaptionSettings):
        self.storage = storage
        self.model = model
        self.settings = settings

    def __call__(self, row: dict) -> dict:
        image = self.storage.get_bytes(row["key"])
        chat = build_caption_chat(image, self.model, self.settings, row["content_type"])
        return {"method": CHAT_METHOD, "request_kwargs": chat}


def caption_answer(row: dict) -> dict:
    """The postprocess step: the deployment's answer (a ChatCompletionResponse or an ErrorResponse,
    dumped) -> {sha256, text, finish_reason, error}."""
    choices = row.get("choices") or []
    if not choices:
        error = row.get("error") or {}
        message = error.get("message") if isinstance(error, dict) else str(error)
        return {"sha256": row["sha256"], "text": None, "finish_reason": None,
                "error": message or "the language model returned no answer"}
    choice = choices[0]
    return {"sha256": row["sha256"], "text": (choice.get("message") or {}).get("content"),
            "finish_reason": choice.get("finish_reason"), "error": None}


def outcome_of(row: dict) -> CaptionOutcome:
    """A processed row as a CaptionOutcome; a row the stage failed on (`__inference_error__`, as
    ServeDeploymentProcessorConfig(should_continue_on_error=True) returns it) is an error."""
    failed = row.get("__inference_error__") or ""
    if failed:
        return CaptionOutcome(sha256=row["sha256"], error=failed)
    return CaptionOutcome(sha256=row["sha256"], text=row.get("text"), error=row.get("error"),
                          finish_reason=row.get("finish_reason"))


def build_caption_processor(app_name: str, deployment_name: str, storage: Any, model: str,
                            settings: CaptionSettings, *, batch_size: int = BATCH_SIZE, concurrency: int = 1):
    """The Ray Data LLM processor that captions rows {sha256, key, content_type} on the deployment
    `deployment_name` of the Serve app `app_name`."""
    from ray.data.llm import ServeDeploymentProcessorConfig, build_processor

    config = ServeDeploymentProcessorConfig(
        deployment_name=deployment_name,
        app_name=app_name,
        # no dtype_mapping: requests go as dicts (see the module's docstring)
        batch_size=batch_size,
        concurrency=concurrency,
        # A request the deployment refuses (ValueError, a validation error) fails its image, not the job.
        should_continue_on_error=True,
    )
    processor = build_processor(config, preprocess=CaptionRequest(storage, model, settings), postprocess=caption_answer,
                                preprocess_map_kwargs={"num_cpus": STAGE_CPUS},
                                postprocess_map_kwargs={"num_cpus": STAGE_CPUS})
    # The stage's actor would reserve a whole CPU (Ray Data's default) for a loop that only awaits.
    # The same resources as the preprocess step let Ray Data fuse the two into that one actor: one
    # worker process to start, not two (its start, mostly imports, is most of a small job's time).
    processor.get_stage_by_name("ServeDeploymentStage").map_batches_kwargs["num_cpus"] = STAGE_CPUS
    return processor


def run_processor(processor, tasks: list[dict], batch_size: int = BATCH_SIZE) -> Iterator[list[CaptionOutcome]]:
    """Stream the processor's outcomes for `tasks`, `batch_size` at a time, as Ray Data produces them
    (in no particular order). Closing the iterator (a cancel) stops the pipeline."""
    import ray.data

    # one block per batch (from_items would make one per row at this size)
    dataset = processor(ray.data.from_items(tasks, override_num_blocks=max(1, -(-len(tasks) // batch_size))))
    batch: list[CaptionOutcome] = []
    rows = dataset.iter_rows()
    try:
        for row in rows:
            batch.append(outcome_of(row))
            if len(batch) >= batch_size:
                yield batch
                batch = []
        if batch:
            yield batch
    finally:
        close = getattr(rows, "close", None)
        if close is not None:
            close()


def ray_data_captioner(llm: Any, storage: Any, model: str, settings: CaptionSettings, *,
                       batch_size: int = BATCH_SIZE, concurrency: int = 1) -> Captioner:
    """The job's captioner: Ray Data LLM against the deployment behind `llm` (a DeploymentHandle,
    which names its app and deployment)."""

    def captions(tasks: list[dict]) -> Iterator[list[CaptionOutcome]]:
        import ray.data

        ray.data.DataContext.get_current().enable_progress_bars = False  # job logs, not a terminal
        processor = build_caption_processor(llm.app_name, llm.deployment_name, storage, model, settings,
                                            batch_size=batch_size, concurrency=concurrency)
        yield from run_processor(processor, tasks, batch_size)

    return captions
