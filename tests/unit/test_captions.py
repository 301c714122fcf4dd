"""Dataset captions without Ray: the version writer, overwrite, the trigger word, the checkpoint that
lets a re-run skip what was captioned, cancel, and the Ray Data LLM rows (graphs/captioning.py).

The captioner is a fake with known answers (one caption per image, derived from its sha256), so
each test can say which caption must land where.
"""

from __future__ import annotations

import time

import pytest

from deployments.errors import JobCancelledError
from deployments.llm.vision import CaptionSettings
from graphs.captioning import CaptionOutcome, CaptionRequest, caption_answer, outcome_of
from graphs.dataset_jobs import CaptionsFailedError, caption_fingerprint, dataset_captions
from graphs.job_runner import JobContext
from graphs.payloads import DatasetCaptionsPayload
from storage.datasets import CaptionCheckpoint, DatasetStore, ImageItem
from storage.fs import Storage
from storage.jobs import JobStore
from tests.keyed_app import png

SETTINGS = CaptionSettings(style="tags")


def answer(sha: str) -> str:
    return f"  a shape,   picture {sha[:6]}  "  # messy on purpose: clean_caption tidies it


class FakeCaptioner:
    """Answers every image (or fails the ones in `fail`), `batch` at a time; records what it was asked."""

    def __init__(self, batch: int = 2, fail: set[str] = frozenset(), on_batch=None):
        self.batch = batch
        self.fail = set(fail)
        self.asked: list[str] = []
        self.on_batch = on_batch  # called as each batch is answered (a cancel arrives then)

    def factory(self, storage, payload):
        assert payload.model == "gemma" and payload.settings == SETTINGS

        def captions(tasks):
            for start in range(0, len(tasks), self.batch):
                chunk = tasks[start:start + self.batch]
                for task in chunk:
                    assert storage.get_bytes(task["key"])[:8] == b"\x89PNG\r\n\x1a\n"
                    assert task["content_type"] == "image/png"
                self.asked += [t["sha256"] for t in chunk]
                if self.on_batch is not None:
                    self.on_batch(len(self.asked))
                yield [CaptionOutcome(t["sha256"], error="engine said no") if t["sha256"] in self.fail
                       else CaptionOutcome(t["sha256"], text=answer(t["sha256"]), finish_reason="stop")
                       for t in chunk]

        return captions


@pytest.fixture()
def world(tmp_path):
    """A dataset whose version 1 has 6 images: 0 and 1 with user captions, 2-5 without."""
    storage = Storage(str(tmp_path))
    store = DatasetStore(storage)
    info = store.create("shapes", trigger_word="sks")
    items = [ImageItem(filename=f"{i}.png", data=png(32, 32, seed=i), caption=("a user caption" if i < 2 else ""))
             for i in range(6)]
    assert store.add_images(info.id, items).version == 1
    rows = store.manifest(info.id, 1).to_pylist()
    return {"storage": storage, "store": store, "id": info.id, "jobs": JobStore(storage),
            "user": [r["sha256"] for r in rows if r["caption"]], "empty": [r["sha256"] for r in rows if not r["caption"]]}


def payload(world, **fields) -> DatasetCaptionsPayload:
    return DatasetCaptionsPayload.create(**{"dataset_id": world["id"], "version": 1, "overwrite": False,
                                            "trigger_word": "sks", "model": "gemma", "settings": SETTINGS,
                                            "max_images": None, **fields})


def run(world, job: DatasetCaptionsPayload, captioner: FakeCaptioner) -> JobContext:
    record = world["jobs"].create("datasets.captions", job.to_request())
    ctx = JobContext(world["jobs"], record)
    dataset_captions(ctx, {"captioner": captioner.factory})
    return ctx


def captions_of(world, version: int) -> dict[str, str]:
    return {r["sha256"]: r["caption"] for r in world["store"].manifest(world["id"], version).to_pylist()}


# --- the version writer ------------------------------------------------------------------------


def test_new_captions_land_in_a_new_version_and_old_versions_keep_theirs(world):
    store, before = world["store"], captions_of(world, 1)
    new = {sha: f"caption of {sha[:4]}" for sha in world["empty"]}
    committed = store.commit_captions(world["id"], 1, new, before)
    assert committed.version == 2 and committed.captioned == 4 and committed.conflicts == []
    assert store.versions(world["id"]) == [1, 2]
    after = captions_of(world, 2)
    assert {sha: after[sha] for sha in world["empty"]} == new
    assert {sha: after[sha] for sha in world["user"]} == {sha: "a user caption" for sha in world["user"]}
    assert captions_of(world, 1) == before  # version 1 is untouched
    # every other column carries over; the version's summary says what it did
    v1, v2 = (store.manifest(world["id"], v).drop_columns(["caption"]) for v in (1, 2))
    assert v1.to_pylist() == v2.to_pylist()
    assert store.get(world["id"]).versions[-1].images == 6


def test_a_caption_changed_meanwhile_is_kept_and_the_rest_rebase_on_the_newest_version(world):
    store = world["store"]
    before = captions_of(world, 1)
    edited, removed = world["empty"][0], world["empty"][1]
    store.edit(world["id"], 1, captions={edited: "a person wrote this"})
    store.edit(world["id"], 2, remove=[removed])
    store.add_images(world["id"], [ImageItem(filename="late.png", data=png(32, 32, seed=99))])  # version 4
    new = {sha: "from the model" for sha in world["empty"]}
    committed = store.commit_captions(world["id"], 1, new, before)
    assert committed.version == 5 and committed.captioned == 2
    assert sorted(committed.conflicts) == sorted([edited, removed])
    latest = captions_of(world, 5)
    assert latest[edited] == "a person wrote this" and removed not in latest and len(latest) == 6
    assert [latest[sha] for sha in world["empty"][2:]] == ["from the model"] * 2


def test_nothing_to_change_writes_no_version(world):
    store = world["store"]
    committed = store.commit_captions(world["id"], 1, {}, captions_of(world, 1))
    assert committed.version == 1 and committed.captioned == 0 and store.versions(world["id"]) == [1]


def test_the_checkpoint_keeps_batches_until_cleared(world):
    checkpoint = world["store"].caption_checkpoint(world["id"], "abc123")
    assert checkpoint.load() == {}
    checkpoint.save({"a": "one"})
    checkpoint.save({})  # nothing to keep: no object
    checkpoint.save({"b": "two"})
    assert checkpoint.load() == {"a": "one", "b": "two"}
    assert world["storage"].list(checkpoint.prefix) and len(world["storage"].list(checkpoint.prefix)) == 2
    assert world["store"].versions(world["id"]) == [1]  # no version, and the listing does not see it
    assert CaptionCheckpoint(world["storage"], world["id"], "other").load() == {}
    checkpoint.clear()
    assert checkpoint.load() == {}
    with pytest.raises(ValueError):
        CaptionCheckpoint(world["storage"], world["id"], "../escape")


# --- the job -----------------------------------------------------------------------------------


def test_the_job_captions_the_uncaptioned_keeps_user_captions_and_adds_the_trigger_word(world):
    captioner = FakeCaptioner(batch=3)
    ctx = run(world, payload(world), captioner)
    result = ctx.record.result
    assert sorted(captioner.asked) == sorted(world["empty"])  # user-captioned images were not asked about
    assert {k: result[k] for k in ("version", "base_version", "images", "captioned", "kept", "skipped", "failed",
                                    "conflicts", "resumed")} == {
        "version": 2, "base_version": 1, "images": 6, "captioned": 4, "kept": 2, "skipped": 0, "failed": 0,
        "conflicts": 0, "resumed": 0}
    v2 = captions_of(world, 2)
    for sha in world["empty"]:
        assert v2[sha] == f"sks, a shape, picture {sha[:6]}"  # one line, the trigger word first
    for sha in world["user"]:
        assert v2[sha] == "a user caption"
    assert captions_of(world, 1)[world["empty"][0]] == ""
    # progress went batch by batch to the end; the checkpoint is gone
    assert ctx.record.step == ctx.record.total_steps == 4 and ctx.record.stage == "caption"
    checkpoint = world["store"].caption_checkpoint(world["id"], caption_fingerprint("gemma", SETTINGS))
    assert checkpoint.load() == {}


def test_overwrite_captions_every_image_and_a_present_trigger_word_is_not_repeated(world):
    captioner = FakeCaptioner()
    result = run(world, payload(world, overwrite=True, trigger_word="picture"), captioner).record.result
    assert sorted(captioner.asked) == sorted(world["user"] + world["empty"])
    assert (result["captioned"], result["kept"]) == (6, 0)
    v2 = captions_of(world, 2)
    assert all(caption == f"a shape, picture {sha[:6]}" for sha, caption in v2.items())  # already has it


def test_a_rerun_with_overwrite_false_skips_what_is_captioned(world):
    run(world, payload(world), FakeCaptioner())
    again = FakeCaptioner()
    result = run(world, payload(world, version=2), again).record.result
    assert again.asked == []
    assert (result["version"], result["captioned"], result["kept"]) == (2, 0, 6)  # no new version
    assert world["store"].versions(world["id"]) == [1, 2]


def test_cancel_commits_nothing_and_the_rerun_asks_only_about_the_rest(world):
    store = world["store"]

    def cancel_after_first_batch(asked: int) -> None:
        if asked == 2:
            world["jobs"].request_cancel(ctx_id[0])
            time.sleep(0.3)  # JobContext looks for the marker at most every 0.25 s

    first = FakeCaptioner(batch=2, on_batch=cancel_after_first_batch)
    record = world["jobs"].create("datasets.captions", payload(world).to_request())
    ctx_id = [record.id]
    with pytest.raises(JobCancelledError):
        dataset_captions(JobContext(world["jobs"], record), {"captioner": first.factory})
    assert len(first.asked) == 2
    assert store.versions(world["id"]) == [1]  # nothing committed
    assert captions_of(world, 1)[first.asked[0]] == ""

    rerun = FakeCaptioner(batch=2)
    result = run(world, payload(world), rerun).record.result
    assert sorted(rerun.asked) == sorted(set(world["empty"]) - set(first.asked))  # only the rest
    assert (result["version"], result["captioned"], result["resumed"], result["kept"]) == (2, 4, 2, 2)
    v2 = captions_of(world, 2)
    assert all(v2[sha].startswith("sks, a shape") for sha in world["empty"])


def test_max_images_caps_a_run_and_failures_are_counted_by_image(world):
    bad = world["empty"][0]
    captioner = FakeCaptioner(fail={bad})
    result = run(world, payload(world, max_images=3), captioner).record.result
    assert len(captioner.asked) == 3
    assert (result["captioned"], result["failed"], result["skipped"], result["kept"]) == (2, 1, 1, 2)
    assert sum(result[k] for k in ("captioned", "kept", "skipped", "failed", "conflicts")) == result["images"]
    assert result["failures"] == [{"id": bad, "reason": "engine said no"}]
    v2 = captions_of(world, 2)
    assert v2[bad] == ""  # a failed image keeps what it had
    # the next run does the rest: the failed one and the one over the cap
    following = FakeCaptioner()
    assert run(world, payload(world, version=2), following).record.result["captioned"] == 2
    assert sorted(following.asked) == sorted([bad, world["empty"][-1]])


def test_a_run_where_every_image_fails_fails_with_the_reason(world):
    with pytest.raises(CaptionsFailedError, match="engine said no"):
        run(world, payload(world), FakeCaptioner(fail=set(world["empty"])))
    assert world["store"].versions(world["id"]) == [1]


def test_no_trigger_word_and_an_empty_answer_counts_as_failed(world):
    class Blank(FakeCaptioner):
        def factory(self, storage, payload):
            return lambda tasks: iter([[CaptionOutcome(t["sha256"], text="  ") for t in tasks[:1]] +
                                       [CaptionOutcome(t["sha256"], text="a tree") for t in tasks[1:]]])

    result = run(world, payload(world, trigger_word=None), Blank()).record.result
    assert (result["captioned"], result["failed"]) == (3, 1)
    assert sorted(c for c in captions_of(world, 2).values() if c not in ("", "a user caption")) == ["a tree"] * 3


def test_the_fingerprint_follows_model_and_settings():
    base = caption_fingerprint("gemma", SETTINGS)
    assert base == caption_fingerprint("gemma", CaptionSettings(style="tags"))
    assert base != caption_fingerprint("gemma", CaptionSettings(style="sentence"))
    assert base != caption_fingerprint("gemma-3", SETTINGS)
    assert base != caption_fingerprint("gemma", CaptionSettings(style="tags", instruction="Name the colour."))


# --- the Ray Data LLM rows (no Ray: the functions the processor runs) ----------------------------


def test_the_preprocess_row_is_a_chat_request_with_the_image_as_a_data_url(world):
    row = world["store"].manifest(world["id"], 1).to_pylist()[0]
    request = CaptionRequest(world["storage"], "gemma", SETTINGS)({"sha256": row["sha256"], "key": row["key"],
                                                                 "content_type": "image/png"})
    assert request == {"method": "chat_json", "request_kwargs": request["request_kwargs"]}  # a dict, no dtype
    body = request["request_kwargs"]
    assert body["model"] == "gemma" and body["max_tokens"] == SETTINGS.max_tokens
    image, text = body["messages"][0]["content"]
    assert image["image_url"]["url"].startswith("data:image/png;base64,")
    assert "comma-separated tags" in text["text"]


def test_the_llm_server_validates_a_stage_request_sent_as_a_dict(world):
    """GemmaServer.chat_json: the dict the stage sends (with its own `idx_in_batch`, and the empty keys
    Arrow fills into each content part) becomes vLLM's ChatCompletionRequest, passed to `chat`."""
    import asyncio

    from ray.serve.llm.openai_api_models import ChatCompletionRequest, ChatCompletionResponse

    from deployments.llm.server import GemmaServer

    row = world["store"].manifest(world["id"], 1).to_pylist()[0]
    body = CaptionRequest(world["storage"], "gemma", SETTINGS)(
        {"sha256": row["sha256"], "key": row["key"], "content_type": "image/png"})["request_kwargs"]
    image, text = body["messages"][0]["content"]
    body["messages"][0]["content"] = [{**image, "text": None}, {**text, "image_url": None}]  # as Arrow gives it back

    seen = []

    class Server:
        _STAGE_KEYS = GemmaServer._STAGE_KEYS

        async def chat(self, request, raw_request_info=None):
            seen.append(request)

            async def answers():
                yield ChatCompletionResponse(id="7", model=request.model, created=0, choices=[
                    {"index": 0, "message": {"role": "assistant", "content": "a red circle"}, "finish_reason": "stop"}],
                    usage={"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4})

            return answers()

    async def collect(sent):
        return [answer async for answer in GemmaServer.chat_json(Server(), sent)]

    sent = {"request_id": "7", "idx_in_batch": 3, **body}
    (answer,) = asyncio.run(collect(sent))
    assert type(answer) is dict and caption_answer({"sha256": "a", **answer})["text"] == "a red circle"
    (request,) = seen
    assert isinstance(request, ChatCompletionRequest)
    assert request.model == "gemma" and request.request_id == "7" and request.max_tokens == SETTINGS.max_tokens
    assert "idx_in_batch" not in (request.model_extra or {})


def test_answers_and_errors_become_outcomes():
    ok = caption_answer({"sha256": "a", "choices": [{"message": {"content": "a fox"}, "finish_reason": "stop"}]})
    assert outcome_of({**ok, "__inference_error__": ""}) == CaptionOutcome("a", text="a fox", finish_reason="stop")
    refused = caption_answer({"sha256": "b", "error": {"message": "image too large", "code": 400}})
    assert outcome_of(refused) == CaptionOutcome("b", error="image too large")
    # a row the stage failed on comes back whole, with the stage's error
    assert outcome_of({"sha256": "c", "__inference_error__": "ValidationError: bad"}).error == "ValidationError: bad"
