"""The vision-language model's contract: images in chat, the judge, moderation and captions.

Gemma 3 sees images through OpenAI image content parts (`{"type": "image_url", "image_url":
{"url": "data:image/png;base64,..."}}`). Everything Atelier asks of it that code reads back (a
judgement, a moderation verdict) is asked under a JSON schema (vLLM structured outputs), with
every string and list bounded, so the longest valid answer fits in `max_tokens` and the answer
always parses. Captions are free text.

Like contract.py: pure functions that build OpenAI chat bodies (dicts, sent by the ingress, by jobs
and by Ray Data LLM alike) and parse the answers. No torch, vLLM or Ray import here.
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from deployments.errors import AtelierError, InvalidRequestError

# --- images as chat content --------------------------------------------------------------------


def data_url(image: bytes, content_type: str = "image/png") -> str:
    return f"data:{content_type};base64,{base64.b64encode(image).decode()}"


def image_part(image: bytes, content_type: str = "image/png") -> dict:
    """An OpenAI image content part carrying `image` inline."""
    return {"type": "image_url", "image_url": {"url": data_url(image, content_type)}}


def user_turn(text: str, images: list[bytes] = ()) -> dict:
    """A user message: the images first (as Gemma 3's own examples put them), then the text."""
    return {"role": "user", "content": [*(image_part(image) for image in images), {"type": "text", "text": text}]}


def json_format(name: str, schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def answer_text(response: Any) -> tuple[str | None, str | None]:
    """(content, finish_reason) of a chat answer: vLLM's response object or its JSON dict."""
    if isinstance(response, dict):
        choice = response["choices"][0]
        return choice["message"].get("content"), choice.get("finish_reason")
    choice = response.choices[0]
    return choice.message.content, choice.finish_reason


class VisionOutputError(AtelierError):
    """The model's answer did not parse under its schema (e.g. cut off at max_tokens)."""

    status_code = 502
    error_type = "server_error"


def parse_json_answer(text: str | None, finish_reason: str | None, what: str) -> dict:
    try:
        data = json.loads(text or "", strict=False)
    except (TypeError, ValueError):
        why = "cut off at max_tokens" if finish_reason == "length" else "not valid JSON"
        raise VisionOutputError(f"the language model's {what} was {why}") from None
    if not isinstance(data, dict):
        raise VisionOutputError(f"the language model's {what} is not a JSON object")
    return data


# --- the judge ---------------------------------------------------------------------------------


class JudgeSettings(BaseModel):
    """Bounds of a judgement (config `llm.judge`); they size the schema and its token budget."""

    max_reasons: int = Field(3, ge=1, le=10)
    max_defects: int = Field(5, ge=0, le=20)
    max_item_chars: int = Field(80, ge=8, le=400)
    max_criteria_chars: int = Field(1000, ge=0)
    max_images: int = Field(8, ge=1, le=64, description="Images one judge request may carry.")
    temperature: float = Field(0.0, ge=0)

    @property
    def max_tokens(self) -> int:
        """Room for the longest answer the schema allows (a token is at least one character)."""
        items = self.max_reasons + self.max_defects
        return 64 + items * (self.max_item_chars + 4)


class Judgement(BaseModel):
    """One image, judged against the prompt it was made for."""

    score: int = Field(ge=1, le=10, description="1 (unusable) to 10 (perfect).")
    reasons: list[str] = Field(description="Why the score, briefly.")
    defects: list[str] = Field(description="Visible flaws, e.g. extra fingers, blur, text artifacts.")
    matches_prompt: bool


JUDGE_SYSTEM = (
    "You are a strict art director judging images made by a text-to-image model. Score each image "
    "from 1 to 10 for how well it matches the prompt and for its quality, give short reasons, list "
    "visible defects, and say whether it matches the prompt. Answer only with JSON."
)


def judge_schema(settings: JudgeSettings) -> dict:
    item = {"type": "string", "minLength": 1, "maxLength": settings.max_item_chars}
    return {
        "type": "object",
        "properties": {
            "score": {"type": "integer", "minimum": 1, "maximum": 10},
            "reasons": {"type": "array", "items": item, "minItems": 1, "maxItems": settings.max_reasons},
            "defects": {"type": "array", "items": item, "maxItems": settings.max_defects},
            "matches_prompt": {"type": "boolean"},
        },
        "required": ["score", "reasons", "defects", "matches_prompt"],
        "additionalProperties": False,
    }


def build_judge_chat(image: bytes, prompt: str, model_id: str, settings: JudgeSettings,
                     criteria: str | None = None, seed: int | None = None) -> dict:
    """The chat body that judges one image (each image is its own request: they run side by side
    in the engine's batch, and one image's answer never leans on another's)."""
    asks = [f"Prompt: {prompt}"]
    if criteria:
        asks.append(f"Also judge by these criteria: {criteria}")
    body: dict[str, Any] = {
        "model": model_id,
        "messages": [{"role": "system", "content": JUDGE_SYSTEM}, user_turn("\n".join(asks), [image])],
        "max_tokens": settings.max_tokens,
        "temperature": settings.temperature,
        "response_format": json_format("judgement", judge_schema(settings)),
    }
    if seed is not None:
        body["seed"] = seed
    return body


def parse_judgement(response: Any) -> Judgement:
    """The judge's answer -> Judgement; VisionOutputError if it does not parse."""
    data = parse_json_answer(*answer_text(response), "judgement")
    try:
        return Judgement.model_validate(data)
    except ValueError as exc:
        raise VisionOutputError(f"the language model's judgement does not fit its schema: {exc}") from None


def check_threshold(value: float | None, field: str = "threshold") -> None:
    if value is not None and not 1 <= value <= 10:
        raise InvalidRequestError(f"{field} must be between 1 and 10; got {value}", field)


def check_best_of(best_of: int | None, n: int, cap: int, field: str = "best_of") -> None:
    """Best-of-k: k candidates are judged and the top n kept, so n <= k <= the config's cap
    (`max_best_of`). The images API, the text_to_image node and a replay all run this check."""
    if best_of is None:
        return
    if best_of < n:
        raise InvalidRequestError(f"{field} must be at least n ({n}); got {best_of}", field)
    if best_of > cap:
        raise InvalidRequestError(f"{field} must be at most {cap}; got {best_of}", field)


def check_max_rounds(max_rounds: int, cap: int, field: str = "max_rounds") -> None:
    """A QA loop's rounds (each one generation, one judgement, one refinement): 1 to the config's
    cap (`max_qa_rounds`)."""
    if not 1 <= max_rounds <= cap:
        raise InvalidRequestError(f"{field} must be between 1 and {cap}; got {max_rounds}", field)


def check_criteria(criteria: str | None, settings: JudgeSettings, field: str = "criteria") -> None:
    if criteria is not None and len(criteria) > settings.max_criteria_chars:
        raise InvalidRequestError(f"{field} must be at most {settings.max_criteria_chars} characters; "
                                  f"got {len(criteria)}", field)


def rank(judgements: list[Judgement]) -> list[int]:
    """The judged images' indices, best first: by score, ties to the lower index."""
    return sorted(range(len(judgements)), key=lambda i: (-judgements[i].score, i))


def revision_instruction(judgement: Judgement, threshold: float) -> str:
    """What a QA loop asks the prompt refiner after a round fell short: the judge's reasons and
    defects, to be fixed in the next prompt (passed to build_refine_chat as `instruction`)."""
    lines = [f"An image made from this prompt scored {judgement.score}/10 (the goal is {threshold:g}).",
             "The judge said: " + "; ".join(judgement.reasons)]
    if judgement.defects:
        lines.append("Visible defects: " + "; ".join(judgement.defects))
    if not judgement.matches_prompt:
        lines.append("The image did not match the request.")
    lines.append("Rewrite the prompt so the next image fixes these, keeping the request's subject.")
    return "\n".join(lines)


# --- moderation --------------------------------------------------------------------------------

DEFAULT_CATEGORIES = {
    "sexual_minors": "sexual content involving minors",
    "sexual": "explicit sexual content or nudity",
    "violence_graphic": "graphic violence, gore or injury",
    "hate": "hateful content targeting a protected group",
    "self_harm": "encouragement or depiction of self-harm",
    "illegal": "instructions for weapons, drugs or other serious crimes",
}


class ModerationSettings(BaseModel):
    """Config `moderation:` (ingress). Off by default; serve_config.yaml turns it on."""

    enabled: bool = False
    check_prompts: bool = Field(True, description="Classify each prompt before any generation.")
    check_outputs: bool = Field(True, description="Look at each generated image before it is stored.")
    categories: dict[str, str] = Field(DEFAULT_CATEGORIES, description="Policy category name -> what it covers.")
    temperature: float = Field(0.0, ge=0)

    @property
    def active_prompts(self) -> bool:
        return self.enabled and self.check_prompts and bool(self.categories)

    @property
    def active_outputs(self) -> bool:
        return self.enabled and self.check_outputs and bool(self.categories)


class ModerationVerdict(BaseModel):
    model_config = ConfigDict(frozen=True)

    flagged: bool
    category: str | None = Field(None, description="The policy category that was violated, when flagged.")


class ContentPolicyError(InvalidRequestError):
    """A refusal: a 400 with OpenAI's `content_policy_violation` code, naming the category."""

    code = "content_policy_violation"

    def __init__(self, message: str, param: str | None = None, *, category: str | None = None,
                 headers: dict | None = None):
        super().__init__(message, param, headers=headers)
        self.category = category

    def to_body(self) -> dict:
        body = super().to_body()
        body["error"].update(code=self.code, category=self.category)
        return body

    def __reduce__(self):
        return _rebuild_policy, (self.message, self.param, self.category)


def _rebuild_policy(message, param, category):
    return ContentPolicyError(message, param, category=category)


MODERATION_SYSTEM = (
    "You are a content-safety classifier for an image generation service. Decide whether the input "
    "violates one of these policy categories:\n{categories}\nAnswer only with JSON: flagged is true "
    "only for a clear violation, and category is the violated category, or \"none\"."
)


def moderation_schema(settings: ModerationSettings) -> dict:
    return {
        "type": "object",
        "properties": {"flagged": {"type": "boolean"},
                       "category": {"type": "string", "enum": [*settings.categories, "none"]}},
        "required": ["flagged", "category"],
        "additionalProperties": False,
    }


def _moderation_body(model_id: str, settings: ModerationSettings, turn: dict) -> dict:
    categories = "\n".join(f"- {name}: {what}" for name, what in settings.categories.items())
    longest = max((len(name) for name in settings.categories), default=4)
    return {
        "model": model_id,
        "messages": [{"role": "system", "content": MODERATION_SYSTEM.format(categories=categories)}, turn],
        "max_tokens": 48 + longest,
        "temperature": settings.temperature,
        "response_format": json_format("moderation", moderation_schema(settings)),
    }


def build_prompt_moderation_chat(prompt: str, model_id: str, settings: ModerationSettings) -> dict:
    return _moderation_body(model_id, settings, user_turn(f"Prompt to classify: {prompt}"))


def build_image_moderation_chat(image: bytes, model_id: str, settings: ModerationSettings) -> dict:
    return _moderation_body(model_id, settings, user_turn("Classify this generated image.", [image]))


def parse_moderation(response: Any, settings: ModerationSettings) -> ModerationVerdict:
    data = parse_json_answer(*answer_text(response), "moderation verdict")
    category = data.get("category")
    flagged = data.get("flagged") is True and category in settings.categories
    return ModerationVerdict(flagged=flagged, category=category if flagged else None)


def refusal(verdict: ModerationVerdict, what: Literal["prompt", "image"], param: str) -> ContentPolicyError:
    return ContentPolicyError(f"the {what} was refused by the content policy (category: {verdict.category})",
                              param, category=verdict.category)


# --- captions ----------------------------------------------------------------------------------

CaptionStyle = Literal["tags", "sentence"]

CAPTION_INSTRUCTIONS = {
    "tags": "Caption this image for training a text-to-image model as short comma-separated tags: "
            "subject, attributes, setting, style. No sentence, no preamble.",
    "sentence": "Caption this image for training a text-to-image model in one full sentence describing "
                "the subject, setting, composition and style. No preamble.",
}


class CaptionSettings(BaseModel):
    style: CaptionStyle = "sentence"
    instruction: str | None = Field(None, max_length=1000, description="Replaces the style's instruction.")
    max_tokens: int = Field(96, ge=8, le=512)
    temperature: float = Field(0.2, ge=0, le=2)


def build_caption_chat(image: bytes, model_id: str, settings: CaptionSettings, content_type: str = "image/png") -> dict:
    text = settings.instruction or CAPTION_INSTRUCTIONS[settings.style]
    return {
        "model": model_id,
        "messages": [{"role": "user", "content": [image_part(image, content_type), {"type": "text", "text": text}]}],
        "max_tokens": settings.max_tokens,
        "temperature": settings.temperature,
    }


_SPACES = re.compile(r"\s+")


def clean_caption(text: str | None, trigger_word: str | None = None) -> str:
    """One line, with the trigger word first when given and not already there."""
    caption = _SPACES.sub(" ", text or "").strip().strip('"').strip()
    if trigger_word and trigger_word not in caption:
        caption = f"{trigger_word}, {caption}" if caption else trigger_word
    return caption
