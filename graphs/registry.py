"""Job kind -> the pipeline that runs it (`fn(ctx, handles)`), for the job runner."""

from __future__ import annotations

from typing import Callable

from graphs.dataset_jobs import dataset_captions, dataset_collect, dataset_import
from graphs.pipelines import image_generation
from graphs.video_pipelines import VIDEO_PIPELINES
from graphs.workflow_jobs import workflow_run

JOB_PIPELINES: dict[str, Callable[..., None]] = {
    "images.generations": image_generation,
    "images.edits": image_generation,
    "datasets.import": dataset_import,
    "datasets.collect": dataset_collect,
    "datasets.captions": dataset_captions,
    "workflows.run": workflow_run,
    **VIDEO_PIPELINES,
}
