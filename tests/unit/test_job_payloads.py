"""Typed job payloads (graphs/payloads.py): today's stored requests read and write back unchanged."""

from __future__ import annotations

import copy
import json

import pytest
from pydantic import TypeAdapter, ValidationError

from deployments.llm.contract import RefineRequest, RefineSettings, build_refine_chat
from deployments.sdxl.contract import SDXLRequest
from deployments.styles import StylePreset
from graphs.payloads import (
    DatasetCaptionsPayload,
    DatasetCollectPayload,
    JOB_KINDS,
    DatasetImportPayload,
    ImageEditPayload,
    ImageGenerationPayload,
    ImageToVideoPayload,
    ImageUpscalePayload,
    JobPayload,
    TextToImageHDPayload,
    TextToVideoPayload,
    UnknownJobKindError,
    WorkflowRunPayload,
    job_prompt,
    parse_payload,
    replay_payload,
    replay_seed_missing,
    video_source_key,
)
from storage.fs import Storage
from storage.jobs import JobRecord, JobStore
from storage.keys import job_key
from storage.sources import CollectConfig, SourceResult
from storage.url_import import DatasetImportConfig


def stored_bytes(request: dict) -> bytes:
    """A request as Storage.put_json writes it into the job record."""
    return json.dumps(request, ensure_ascii=False, separators=(",", ":")).encode()


# --- what the API stores today, built the way it builds it ---------------------------------------


def sdxl_section(**fields) -> dict:
    """IngressDeployment._sdxl_payload: the whole SDXLRequest but its bytes."""
    request = SDXLRequest(**{"prompt": "a fox in the snow", "n": 2, "width": 1024, "height": 1024, **fields})
    return request.model_dump(mode="json", exclude={"image", "mask"})


REFINE_REQUEST = RefineRequest(prompt="a fox in the snow", style="film", lora="fox:3", seed=42)
STYLE = StylePreset(prompt="film still of {prompt}", negative_prompt="cartoon")
REFINE = {"request": REFINE_REQUEST.model_dump(mode="json"),
          "chat": build_refine_chat(REFINE_REQUEST, "gemma", RefineSettings(), STYLE, "zxq"), "trigger_word": "zxq"}
UPSCALE_SPEC = {"steps": None, "noise_level": None, "seed": None}  # videos_api.upscale_spec(info, None, None, None)
SVD = {"num_frames": 14, "fps": 7, "width": 1024, "height": 576, "seed": 77, "steps": None, "decode_chunk_size": None,
       "motion_bucket_id": 90}
VIDEO = {"model": "svd", "prompt": "waves", "size": "4096x2304", "seconds": "2", "num_frames": 14, "fps": 7, "seed": 77}
WORKFLOW = {"name": "corgis", "description": "", "nodes": [
    {"id": "p", "type": "prompt", "params": {"text": "a corgi"}, "cache": True},
    {"id": "r", "type": "refine", "params": {"style": "film", "lora": "corgi:2", "seed": 4}, "cache": True},
    {"id": "t", "type": "text_to_image", "params": {"lora": "corgi:2", "seed": 9}, "cache": False},
    {"id": "o", "type": "output", "params": {}, "cache": True}],
    "edges": [{"source": "p", "source_port": "text", "target": "r", "target_port": "prompt"},
              {"source": "r", "source_port": "prompt", "target": "t", "target_port": "prompt"},
              {"source": "t", "source_port": "images", "target": "o", "target_port": "value"}]}

# a search result as the collect API records it (storage.sources.SourceResult, dumped whole)
COLLECTED = SourceResult(id="unsplash:abc", source="unsplash", source_id="abc", thumbnail_url="https://images.unsplash.com/t",
                         full_url="https://images.unsplash.com/f", download_url="https://images.unsplash.com/r",
                         width=640, height=480, description="a beach", photographer="Ann", license="Unsplash License",
                         license_url="https://unsplash.com/license",
                         download_location="https://api.unsplash.com/photos/abc/download").model_dump(mode="json")

STORED: list[tuple[str, dict, type]] = [
    ("images.generations", {"sdxl": sdxl_section(seed=5), "refine": None}, ImageGenerationPayload),
    ("images.generations", {"sdxl": sdxl_section(lora="fox:3", style="film"), "refine": REFINE},
     ImageGenerationPayload),
    ("images.edits", {"sdxl": sdxl_section(mode="inpaint", strength=0.6, image_key="uploads/upload_1/image",
                                           mask_key="uploads/upload_1/mask")}, ImageEditPayload),
    ("images.upscale", {"upscale": {"steps": 30, "noise_level": 40, "seed": 8, "prompt": "",
                                    "image_key": "uploads/upload_2/image"}}, ImageUpscalePayload),
    ("images.text_to_image_hd", {"sdxl": sdxl_section(), "refine": REFINE, "upscale": UPSCALE_SPEC},
     TextToImageHDPayload),
    ("videos.image_to_video", {**VIDEO, "upscale_video": {"steps": 10, "noise_level": None, "seed": 77},
                               "svd": {**SVD, "image_key": "uploads/upload_3/image"}}, ImageToVideoPayload),
    ("videos.text_to_video", {**VIDEO, "upscale_video": None, "sdxl": sdxl_section(n=1, seed=77), "refine": REFINE,
                              "upscale": {"steps": None, "noise_level": 20, "seed": 77},
                              "svd": {**SVD, "image_key": None}}, TextToVideoPayload),
    ("workflows.run", {"workflow": WORKFLOW, "use_cache": True,
                       "refine": {"r": {"model": "gemma", "source": "google/gemma-3-1b-it",
                                        "settings": RefineSettings().model_dump(), "style": STYLE.model_dump(),
                                        "trigger_word": "zxq"}},
                       "loras": {"corgi:2": {"name": "corgi", "version": 2, "sha256": "ab" * 32}},
                       "saved": {"id": "wf_1", "version": 3, "name": "corgis"}}, WorkflowRunPayload),
    ("workflows.run", {"workflow": WORKFLOW, "use_cache": False, "refine": {}, "loras": {}, "saved": None,
                       "replay_of": "job_0"}, WorkflowRunPayload),
    ("datasets.import", {"dataset_id": "ds_1", "urls": ["https://example.com/a.png"], "captions": {},
                         "tags": ["web"], "config": DatasetImportConfig().model_dump(mode="json")},
     DatasetImportPayload),
    ("datasets.import", {"dataset_id": "ds_1", "job_ids": ["job_1"], "captions": {}, "tags": [], "license": "cc0",
                         "config": DatasetImportConfig(allowed_prefixes=["s3://b/x/"]).model_dump(mode="json")},
     DatasetImportPayload),
    ("datasets.collect", {"dataset_id": "ds_1", "items": [COLLECTED], "tags": ["beach"],
                          "sources": {"unsplash": CollectConfig().unsplash.model_dump(mode="json")},
                          "app_name": "atelier", "config": DatasetImportConfig().model_dump(mode="json")},
     DatasetCollectPayload),
    # as DatasetsService.caption_payload stores it (CaptionSettings whole)
    ("datasets.captions", {"dataset_id": "ds_1", "version": 2, "overwrite": False, "trigger_word": "sks",
                           "model": "gemma", "settings": {"style": "tags", "instruction": None, "max_tokens": 96,
                                                          "temperature": 0.2}, "max_images": None},
     DatasetCaptionsPayload),
]

# Records written before some fields existed, or by hand (tests, tools): what is absent stays absent.
OLD: list[tuple[str, dict]] = [
    ("images.generations", {"sdxl": {"prompt": "a pear", "n": 1, "seed": 3}}),
    ("images.upscale", {"upscale": {"image_key": "outputs/a.png"}}),
    ("images.text_to_image_hd", {"sdxl": {"prompt": "a pear"}, "upscale": {}}),
    ("videos.image_to_video", {"svd": {"image_key": "outputs/a.png"}}),
    ("videos.text_to_video", {"sdxl": {"prompt": "waves"}, "svd": {}}),
    ("workflows.run", {"workflow": {"nodes": [{"id": "p", "type": "prompt", "params": {"text": "x"}}]}}),
    ("workflows.run", {"workflow": WORKFLOW, "refine": {"r": {"model": "gemma"}}, "loras": {"corgi:2": {}},
                       "saved": {"id": "wf_1"}}),
    ("datasets.import", {"dataset_id": "ds_1", "prefix": "uploads/batch/"}),
]


@pytest.mark.parametrize("kind,request_,cls", STORED, ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(STORED)])
def test_todays_stored_requests_round_trip_byte_for_byte(kind, request_, cls, tmp_path):
    payload = parse_payload(kind, copy.deepcopy(request_))
    assert type(payload) is cls and payload.kind == kind
    assert stored_bytes(payload.to_request()) == stored_bytes(request_)
    # through a real job record: what is read back writes back the same bytes
    storage = Storage(str(tmp_path))
    record = JobStore(storage).create(kind, request_)
    on_disk = json.loads(storage.get_bytes(job_key(record.id)))["request"]
    assert stored_bytes(parse_payload(kind, on_disk).to_request()) == stored_bytes(on_disk) == stored_bytes(request_)


@pytest.mark.parametrize("kind,request_", OLD, ids=[f"{k}-{i}" for i, (k, _) in enumerate(OLD)])
def test_old_records_with_fields_missing_still_load_and_stay_as_they_were(kind, request_):
    payload = parse_payload(kind, copy.deepcopy(request_))
    assert stored_bytes(payload.to_request()) == stored_bytes(request_)


def test_keys_this_version_does_not_know_are_kept_in_place():
    request = {"from_the_future": {"b": 1, "a": 2}, "sdxl": sdxl_section(), "refine": None, "z": [1]}
    payload = parse_payload("images.generations", request)
    assert stored_bytes(payload.to_request()) == stored_bytes(request)


def test_every_job_kind_runs_and_has_a_payload():
    from graphs.registry import JOB_PIPELINES

    assert set(JOB_KINDS) == set(JOB_PIPELINES)
    assert {kind for kind, _, _ in STORED} == set(JOB_KINDS)


def test_the_union_is_discriminated_by_kind():
    adapter = TypeAdapter(JobPayload)
    payload = adapter.validate_python({"kind": "images.upscale", "upscale": {"image_key": "outputs/a.png"}})
    assert isinstance(payload, ImageUpscalePayload) and payload.upscale.image_key == "outputs/a.png"
    with pytest.raises(ValidationError):
        adapter.validate_python({"kind": "images.nope"})


def test_a_request_that_does_not_fit_its_kind_is_refused():
    with pytest.raises(UnknownJobKindError):
        parse_payload("images.nope", {})
    with pytest.raises(ValidationError):
        parse_payload("images.generations", {"refine": None})  # no sdxl section
    with pytest.raises(ValidationError):
        parse_payload("images.generations", {"sdxl": {"prompt": "   "}})  # the contract's own checks


def test_sections_are_the_model_contracts_request_types():
    payload = parse_payload("videos.text_to_video", STORED[6][1])
    assert isinstance(payload, TextToVideoPayload)
    assert payload.sdxl.seed == 77 and payload.svd.motion_bucket_id == 90 and payload.upscale.noise_level == 20
    assert payload.refine.request.lora == "fox:3" and payload.refine.trigger_word == "zxq"
    assert payload.upscale_video is None and payload.svd.image_key is None
    workflow = parse_payload("workflows.run", STORED[7][1])
    assert workflow.refine["r"].style.negative_prompt == "cartoon" and workflow.loras["corgi:2"].version == 2
    assert workflow.workflow.nodes[2].cache is False and workflow.saved.name == "corgis"
    imports = parse_payload("datasets.import", OLD[-1][1])
    assert imports.import_config == DatasetImportConfig() and imports.tags is None


# --- building payloads in the API ----------------------------------------------------------------


def test_create_stores_what_the_ingress_stored():
    sdxl = SDXLRequest(prompt="a fox in the snow", n=2, width=1024, height=1024, seed=5)
    with_bytes = sdxl.model_copy(update={"image": b"png", "mask": b"png"})  # never stored
    payload = ImageGenerationPayload.create(sdxl=with_bytes, refine=None)
    assert stored_bytes(payload.to_request()) == stored_bytes(STORED[0][1])
    hd = TextToImageHDPayload.create(sdxl=SDXLRequest(prompt="a fox in the snow", n=2, width=1024, height=1024),
                                     refine=REFINE, upscale=UPSCALE_SPEC)
    assert stored_bytes(hd.to_request()) == stored_bytes(STORED[4][1])
    imports = DatasetImportPayload.create(dataset_id="ds_1", urls=["https://example.com/a.png"], captions={},
                                          tags=["web"], config=DatasetImportConfig())
    assert stored_bytes(imports.to_request()) == stored_bytes(STORED[9][1])
    assert ImageEditPayload.create(sdxl=sdxl).kind == "images.edits"


# --- replay, video delete, dataset imports of job outputs ------------------------------------------


def legacy_replay(record: JobRecord) -> dict:
    """api/workflows/router.py replay_payload before typed payloads."""
    payload = json.loads(json.dumps(record.request))
    sdxl = payload.get("sdxl")
    seeds = (record.result or {}).get("seeds")
    if sdxl is not None and sdxl.get("seed") is None and seeds:
        sdxl["seed"] = seeds[0]
    if record.kind == "workflows.run":
        payload["use_cache"] = False
    payload["replay_of"] = record.id
    return payload


def record(kind: str, request: dict, result: dict | None = None, job_id: str = "job_7") -> JobRecord:
    return JobRecord(id=job_id, kind=kind, request=copy.deepcopy(request), result=result, created_at=1.0,
                     updated_at=1.0)


@pytest.mark.parametrize("kind,request_", [(k, r) for k, r, _ in STORED] + OLD)
@pytest.mark.parametrize("result", [None, {"seeds": [11, 12], "prompt": "a refined fox"}])
def test_replay_pins_seeds_exactly_as_before(kind, request_, result):
    job = record(kind, request_, result)
    assert stored_bytes(replay_payload(job).to_request()) == stored_bytes(legacy_replay(job))
    assert job.request == request_  # the replayed record is left alone


def test_a_replay_of_a_generation_with_no_seed_at_all_is_refused():
    unseeded = {"sdxl": sdxl_section(), "refine": None}
    assert replay_seed_missing(record("images.generations", unseeded))
    assert not replay_seed_missing(record("images.generations", unseeded, {"seeds": [3, 4]}))
    assert not replay_seed_missing(record("images.generations", STORED[0][1]))
    assert not replay_seed_missing(record("images.text_to_image_hd", STORED[4][1]))


def test_video_source_key_and_job_prompt_read_what_the_dicts_gave():
    for kind, request_, _ in STORED:
        job = record(kind, request_)
        assert video_source_key(job) == (request_.get("svd") or {}).get("image_key")
        for result in (None, {"prompt": "ran as"}, {"prompt": ""}):
            job.result = result
            legacy = (job.result or {}).get("prompt") or (job.request.get("sdxl") or {}).get("prompt") or ""
            assert job_prompt(job) == legacy
    assert job_prompt(record("some.other_kind", {"sdxl": {"prompt": "x"}})) == ""
