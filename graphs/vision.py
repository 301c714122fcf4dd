"""The language model looking at images from a job thread: the judge and moderation.

A job runs on a worker thread of the job runner, so these are synchronous: each chat body
(deployments/llm/vision.py) goes through the LLM's DeploymentHandle as the refine stage sends its
own (graphs/pipelines.refine_stage). Every request is sent before any answer is read, so the
engine batches them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from deployments.errors import AtelierError
from deployments.llm import vision
from deployments.llm.contract import engine_error
from deployments.llm.vision import JudgeSettings, Judgement, ModerationSettings, ModerationVerdict
from deployments.sdxl.contract import SDXLImage
from storage.keys import output_key

if TYPE_CHECKING:
    from graphs.payloads import ModerationSpec


def chat_answers(handle, bodies: list[dict], param: str) -> list[Any]:
    """The answers to chat bodies sent all at once, in order; an engine error is raised, naming `param`."""
    from ray.serve.llm.openai_api_models import ChatCompletionRequest

    handle = handle.options(stream=True)
    streams = []
    try:
        for body in bodies:
            streams.append(handle.chat.remote(ChatCompletionRequest.model_validate(body), None))
        answers = []
        for stream in streams:
            first = next(iter(stream), None)
            first = first[0] if isinstance(first, list) and first else first
            if first is None:
                raise AtelierError("the language model returned nothing")
            if hasattr(first, "error") and not hasattr(first, "choices"):
                raise engine_error(first, param)
            answers.append(first)
        return answers
    finally:
        for stream in streams:
            stream.cancel()


def judge_images(handle, images: list[bytes], prompt: str, model_id: str, settings: JudgeSettings,
                 criteria: str | None = None) -> list[Judgement]:
    """Each image judged against `prompt`, in order (one request per image, all at once)."""
    bodies = [vision.build_judge_chat(image, prompt, model_id, settings, criteria) for image in images]
    return [vision.parse_judgement(answer) for answer in chat_answers(handle, bodies, "images")]


def moderate_prompt(handle, prompt: str, model_id: str, settings: ModerationSettings,
                    param: str = "prompt") -> ModerationVerdict:
    """The prompt's verdict; ContentPolicyError (naming `param` and the category) when refused."""
    if not settings.active_prompts:
        return ModerationVerdict(flagged=False)
    answer, = chat_answers(handle, [vision.build_prompt_moderation_chat(prompt, model_id, settings)], param)
    verdict = vision.parse_moderation(answer, settings)
    if verdict.flagged:
        raise vision.refusal(verdict, "prompt", param)
    return verdict


def moderate_images(handle, images: list[bytes], model_id: str, settings: ModerationSettings,
                    param: str = "prompt") -> list[ModerationVerdict]:
    """Each image's verdict; ContentPolicyError for the first refused."""
    if not settings.active_outputs:
        return [ModerationVerdict(flagged=False) for _ in images]
    bodies = [vision.build_image_moderation_chat(image, model_id, settings) for image in images]
    verdicts = [vision.parse_moderation(answer, settings) for answer in chat_answers(handle, bodies, param)]
    for verdict in verdicts:
        if verdict.flagged:
            raise vision.refusal(verdict, "image", param)
    return verdicts


def store_generated(storage, output_id: str, images: list[SDXLImage], first_index: int = 0) -> None:
    """Generated PNGs (kept to be looked at) stored under `output_id`, image i at index first_index + i."""
    for index, image in enumerate(images, start=first_index):
        image.key = storage.put_bytes(output_key(output_id, index), image.png, "image/png")
        image.png = None


def store_moderated(storage, handle, images: list[SDXLImage], output_id: str, moderation: ModerationSpec | None,
                    check_cancelled: Callable[[], None] = lambda: None, first_index: int = 0) -> None:
    """Generated images (PNGs, not stored yet) stored under `output_id`; when the job carries a
    `moderation` section, each is looked at first and they are stored only once every one passed:
    a refused image is never stored (ContentPolicyError fails the job, or the workflow node).
    Every job that makes images stores them through here: the images API's, text-to-image-hd's,
    text-to-video's still, and the workflow's text_to_image, image_to_image, inpaint and qa_loop."""
    if moderation is not None:
        moderate_images(handle, [image.png for image in images], moderation.model, moderation.settings)
        check_cancelled()
    store_generated(storage, output_id, images, first_index)
