"""Long videos (issue 22, item 5): `seconds` past one SVD clip chains clips into one video job.

The clip plan and the crossfade are pure functions, tested on numbers and numpy frames. The chain
itself runs on the job runner without Ray, with the real SVD deployment class on the tiny model
(4 frames a clip at 64x64) behind a handle that calls it in-process, as Serve's would: the video
of 3 clips is decoded and checked for its frame count and its continuity at the joins, and a
cancel between clips stops the rest. Resuming after a dead replica uses a fake SVD handle.
"""

from __future__ import annotations

import asyncio
import io
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from ray.exceptions import ActorDiedError

from deployments.errors import InvalidRequestError
from deployments.media import crossfade, decode_mp4, join_clips
from deployments.sdxl.contract import SDXLConfig, SDXLLimits
from deployments.svd import contract
from deployments.svd.contract import (
    SVDChain,
    SVDConfig,
    SVDJoinResponse,
    SVDLimits,
    SVDProgress,
    SVDRequest,
    SVDResponse,
    SVDSegment,
)
from deployments.svd.deployment import SVDDeployment
from deployments.upscaler.contract import UpscalerConfig, UpscalerLimits
from graphs.job_runner import JobRunnerDeployment
from graphs.payloads import ImageToVideoPayload
from local.tiny_models import ensure_tiny_models
from tests.unit.test_videos_service import build, run, stored_output, video

REPO = Path(__file__).resolve().parents[2]
CLIP = 4  # the tiny SVD's UNet num_frames: one clip


# --- the clip plan ---------------------------------------------------------------------------------


def frames_of(plan: list[SVDSegment], overlap: int) -> int:
    return sum(segment.num_frames for segment in plan) - overlap * (len(plan) - 1)


@pytest.mark.parametrize("num_frames, clip, overlap, counts", [
    (1, 4, 2, [1]),
    (4, 4, 2, [4]),  # fits one clip: no chain
    (5, 4, 2, [4, 3]),  # the last clip: what is left plus the overlap
    (8, 4, 2, [4, 4, 4]),
    (9, 4, 2, [4, 4, 4, 3]),
    (8, 4, 3, [4, 4, 4]),  # the overlap is at most half a clip
    (25, 25, 3, [25]),
    (210, 25, 3, [25] * 9 + [12]),  # 30 s at 7 fps on SVD-XT: 25 + 8 x 22 + 9
    (30, 14, 0, [14, 14, 2]),  # no overlap: clips end to end
])
def test_the_plan_makes_exactly_the_frames_asked(num_frames, clip, overlap, counts):
    chain = SVDChain(clip_frames=clip, overlap=overlap)
    plan = chain.plan(num_frames, seed=100)
    assert [segment.num_frames for segment in plan] == counts
    assert [segment.index for segment in plan] == list(range(len(counts)))
    assert frames_of(plan, chain.overlap_frames()) == num_frames
    assert all(chain.overlap_frames() < segment.num_frames <= clip for segment in plan[1:])


def test_clip_seeds_follow_the_request_seed_and_wrap():
    chain = SVDChain(clip_frames=4, overlap=2)
    assert [s.seed for s in chain.plan(10, seed=7)] == [7, 8, 9, 10]
    assert [s.seed for s in chain.plan(10, seed=2**32 - 2)] == [2**32 - 2, 2**32 - 1, 0, 1]
    assert chain.plan(10, seed=7) == chain.plan(10, seed=7)  # the same seed, the same clips
    with pytest.raises(ValueError):
        chain.plan(0, seed=1)


def test_limits_pin_the_chain_from_the_config():
    limits = SVDLimits.from_config(SVDConfig(model="m", default_width=64, default_height=64, max_num_frames=25))
    assert (limits.max_seconds, limits.segment_overlap) == (30.0, 3)
    assert limits.chain() == SVDChain(clip_frames=25, overlap=3)
    small = SVDLimits.from_config(SVDConfig(model="m", default_width=64, default_height=64, max_num_frames=4,
                                            segment_overlap=3, max_seconds=12))
    assert small.chain() == SVDChain(clip_frames=4, overlap=2) and small.describe()["max_seconds"] == 12


# --- the crossfade -----------------------------------------------------------------------------------


def solid(values: list[int]) -> np.ndarray:
    return np.stack([np.full((2, 3, 3), v, np.uint8) for v in values])


def test_crossfade_steps_evenly_from_one_run_to_the_other():
    blended = crossfade(solid([0, 0, 0]), solid([200, 200, 200]))
    assert blended[:, 0, 0, 0].tolist() == [50, 100, 150]  # weights 1/4, 2/4, 3/4 of the new run
    assert blended.dtype == np.uint8 and blended.shape == (3, 2, 3, 3)
    with pytest.raises(ValueError):
        crossfade(solid([0, 0]), solid([0, 0, 0]))


def test_join_clips_overlaps_and_crossfades_each_join():
    joined = join_clips([solid([0, 10, 20, 30]), solid([100, 110, 120, 130]), solid([200, 210, 220])], 2)
    assert len(joined) == 4 + 4 + 3 - 2 * 2
    # clip 1's first 2 frames fade over clip 0's last 2; clip 2's over clip 1's last 2
    assert joined[:, 0, 0, 0].tolist() == [0, 10, 47, 83, 147, 183, 220]  # 2/3·20 + 1/3·100, ...
    assert join_clips([solid([5, 6])], 2)[:, 0, 0, 0].tolist() == [5, 6]  # one clip: as it is
    assert join_clips([solid([1, 2]), solid([3, 4])], 0)[:, 0, 0, 0].tolist() == [1, 2, 3, 4]  # end to end


def test_a_crossfade_smooths_a_jump_between_clips():
    """Two clips that disagree by 120 levels: cut end to end, the join is one jump of 120; crossfaded
    over 3 frames, no step between neighbours is more than a quarter of it."""
    first, second = solid([100] * 6), solid([220] * 6)
    cut = np.abs(np.diff(join_clips([first, second], 0).astype(np.int16), axis=0)).max(axis=(1, 2, 3))
    faded = np.abs(np.diff(join_clips([first, second], 3).astype(np.int16), axis=0)).max(axis=(1, 2, 3))
    assert cut.max() == 120 and faded.max() == 30


def test_join_clips_refuses_what_it_cannot_join():
    with pytest.raises(ValueError):
        join_clips([], 1)
    with pytest.raises(ValueError):
        join_clips([solid([1, 2]), np.zeros((2, 4, 4, 3), np.uint8)], 1)  # another frame size
    with pytest.raises(ValueError):
        join_clips([solid([1, 2]), solid([3, 4])], 3)  # an overlap longer than a clip


# --- the check: seconds up to the cap, past one clip only for a chained video --------------------------


@pytest.fixture
def limits() -> SVDLimits:
    return SVDLimits.from_config(SVDConfig(model="svd-folder", default_width=64, default_height=64, min_size=32,
                                           max_size=256, max_num_frames=CLIP))


def test_seconds_up_to_the_cap_is_a_chain_for_a_video_job_only(limits):
    long = SVDRequest(seconds=30, fps=7)
    contract.check(long, limits, chain=True)
    assert contract.num_frames_of(long, limits) == 210
    with pytest.raises(InvalidRequestError) as one_call:  # one SVD call stays within one clip
        contract.check(long, limits)
    assert one_call.value.param == "seconds" and "1 to 4 frames" in one_call.value.message


@pytest.mark.parametrize("fields, param, message", [
    ({"seconds": 30.5, "fps": 7}, "seconds",
     "seconds must be at most 30 (the longest video, chained from clips of up to 4 frames); got 30.5"),
    ({"seconds": 1e308, "fps": 7}, "seconds",
     "seconds must be at most 30 (the longest video, chained from clips of up to 4 frames); got 1e+308"),
    ({"seconds": 1e-9, "fps": 7}, "seconds",
     "seconds=1e-09 at 7 fps is 0 frames; the model makes 1 to 4 frames (at most 0.57 s at this fps; lower fps "
     "for longer clips)"),
    ({"num_frames": 5, "seconds": 1}, "num_frames", "num_frames must be between 1 and 4; got 5"),  # one clip
    ({"num_frames": 4, "handoff_frame": 4}, "handoff_frame", "handoff_frame must be between -4 and 3; got 4"),
])
def test_a_chained_request_is_refused_naming_its_field(limits, fields, param, message):
    with pytest.raises(InvalidRequestError) as raised:
        contract.check(SVDRequest(**fields), limits, chain=True)
    assert (raised.value.param, raised.value.message) == (param, message)


def test_no_cap_means_one_clip(limits):
    one_clip = limits.model_copy(update={"max_seconds": 0.0})
    with pytest.raises(InvalidRequestError) as raised:
        contract.check(SVDRequest(seconds=1, fps=7), one_clip, chain=True)
    assert raised.value.message.startswith("seconds must be at most 0.571429 ")
    contract.check(SVDRequest(seconds=4 / 7, fps=7), one_clip, chain=True)


# --- POST /v1/videos: the job it stores and what it costs ------------------------------------------------


class Charges:
    def __init__(self):
        self.units: list[tuple[int, str]] = []

    def charge(self, units: int, param: str) -> None:
        self.units.append((units, param))


@pytest.fixture
def api(tmp_path):
    app = build(tmp_path, {
        "sdxl": SDXLLimits.from_config(SDXLConfig(model="tiny-sdxl"), styles={}),
        "svd": SVDLimits.from_config(SVDConfig(model="tiny-svd", default_width=64, default_height=64,
                                               max_num_frames=14, max_seconds=20)),
        "upscaler": UpscalerLimits.from_config(UpscalerConfig(model="tiny-up", max_input_size=512, max_frames=100),
                                               scale=4, max_noise_level=350),
    })
    app.videos.rate = Charges()
    return app


def test_a_long_video_pins_its_chain_and_is_charged_for_every_clip(api):
    key = stored_output(api)
    view = run(video(api, input_reference_key=key, seconds=5, fps=7, seed=3, steps=10))
    record = api.store.get(view.id)
    assert record.stages == ["video"] and (view.num_frames, view.seconds) == (35, "5")
    assert record.request["svd"]["num_frames"] == 35 and record.request["chain"] == {"clip_frames": 14, "overlap": 3}
    assert list(record.request)[-1] == "chain"  # after every key a short video stores
    payload = ImageToVideoPayload.model_validate({**record.request, "kind": record.kind})
    assert [s.num_frames for s in payload.chain.plan(35, 3)] == [14, 14, 13]  # 14 + 11 + 10 new frames
    assert api.videos.rate.units == [((14 + 14 + 13) * 10, "seconds")]  # every clip's frames x steps

    short = run(video(api, input_reference_key=key, seconds=2, fps=7, steps=10))
    assert "chain" not in api.store.get(short.id).request
    assert api.videos.rate.units[-1] == (14 * 10, "seconds")


def test_a_long_video_past_the_cap_or_too_long_to_upscale_is_refused(api):
    key = stored_output(api)
    error = pytest.raises(InvalidRequestError, run, video(api, input_reference_key=key, seconds=21, fps=7)).value
    assert error.param == "seconds" and "at most 20" in error.message
    # the upscaler takes the whole joined video, so its frame limit counts all of it
    error = pytest.raises(InvalidRequestError, run, video(api, input_reference_key=key, seconds=20, fps=7,
                                                            upscale_video=True)).value
    assert error.param == "upscale_video" and "140" in error.message
    assert not api.queue.sent


def test_deleting_a_long_video_deletes_its_clips(api):
    key = stored_output(api)
    view = run(video(api, input_reference_key=key, seconds=5, fps=7))
    files = {name: api.storage.put_bytes(f"outputs/2026/01/01/{view.id}.{name}", b"x")
             for name in ("clip0.mp4", "clip0.png", "clip0-handoff.png", "clip1.mp4", "clip1.png", "joined.mp4")}
    clip = lambda i: {"key": files[f"clip{i}.mp4"], "poster_key": files[f"clip{i}.png"],  # noqa: E731
                      "handoff_key": files.get(f"clip{i}-handoff.png")}
    api.store.update(view.id, status="completed", result={"stages": {
        "video.clip-0": clip(0), "video.clip-1": clip(1),
        "video": {"key": files["joined.mp4"], "poster_key": files["clip0.png"]}}})
    assert run(api.videos.delete(view.id)).deleted
    assert not any(api.storage.exists(k) for k in files.values())
    assert api.storage.exists(key)  # the referenced input stays


# --- the chain on the tiny SVD, without Ray ---------------------------------------------------------------


class LocalHandle:
    """A deployment instance behind a DeploymentHandle's sync interface, as the job runner uses it:
    `.options(stream=True).generate_stream.remote(r)` iterates (and `.cancel()`s) the async
    generator on an event loop thread; `.join.remote(r).result()` awaits a coroutine there."""

    def __init__(self, deployment):
        self.deployment = deployment
        self.calls: list[tuple[str, object, float]] = []  # (method, request, when)
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="local-handle", daemon=True).start()

    def options(self, **_):
        return self

    def __getattr__(self, name: str):
        method = getattr(self.deployment, name)
        handle = self

        class Method:
            @staticmethod
            def remote(request):
                handle.calls.append((name, request, time.time()))
                result = method(request)
                if hasattr(result, "__anext__"):
                    return LocalStream(handle.loop, result)
                return SimpleNamespace(result=lambda timeout_s=None: asyncio.run_coroutine_threadsafe(
                    result, handle.loop).result(timeout_s))

        return Method()

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)


class LocalStream:
    def __init__(self, loop, generator):
        self.loop, self.generator = loop, generator
        self.pending = None
        self.cancelled = False

    def __iter__(self):
        while not self.cancelled:
            self.pending = asyncio.run_coroutine_threadsafe(self.generator.__anext__(), self.loop)
            try:
                yield self.pending.result()
            except StopAsyncIteration:
                return

    def cancel(self):
        """As Serve's: the replica's generator is closed, so its run stops at the next step."""
        self.cancelled = True
        if self.pending is not None:
            self.pending.cancel()


FAST = {"steps": 2, "min_guidance_scale": 1.0, "max_guidance_scale": 1.0}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("long-videos")
    model = ensure_tiny_models(REPO / "models" / "tiny")["svd"]
    svd = SVDDeployment.func_or_class({"model": str(model), "storage_root": str(root), "default_width": 64,
                                       "default_height": 64, "min_size": 32, "max_size": 256,
                                       "torch_num_threads": 1})
    return SimpleNamespace(svd=svd, root=root)


def job_runner(root, monkeypatch) -> JobRunnerDeployment:
    monkeypatch.setattr("celery.current_task", None)
    queue = {"broker_url": "memory://", "backend_url": "cache+memory://", "reap_interval_s": 3600, "lease_s": 30,
             "heartbeat_s": 0.05}
    return JobRunnerDeployment(queue, storage_root=str(root))


@pytest.fixture
def runner(tiny, monkeypatch):
    """The job runner with the tiny SVD deployment behind a local handle."""
    runner = job_runner(tiny.root, monkeypatch)
    handle = LocalHandle(tiny.svd)
    runner.handles = {"svd": handle}
    yield SimpleNamespace(runner=runner, handle=handle, storage=tiny.svd.storage, limits=tiny.svd.limits)
    runner._stop.set()
    handle.close()


@pytest.fixture
def fake_runner(tmp_path, monkeypatch):
    """The job runner for fake model handles (no model loaded); clips of 4 frames, as the tiny SVD's."""
    runner = job_runner(tmp_path, monkeypatch)
    limits = SimpleNamespace(chain=lambda: SVDChain(clip_frames=CLIP, overlap=2))
    yield SimpleNamespace(runner=runner, storage=runner.store.storage, limits=limits)
    runner._stop.set()


def noise_png(seed: int = 0) -> bytes:
    pixels = (np.random.default_rng(seed).random((64, 64, 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def long_video_job(r, num_frames: int, seed: int = 5, **svd) -> str:
    """A videos.image_to_video job as POST /v1/videos stores one past a clip."""
    key = r.storage.put_bytes("uploads/long-video-input.png", noise_png())
    payload = ImageToVideoPayload.create(
        model="svd", prompt=None, size="64x64", seconds=str(num_frames / 8), num_frames=num_frames, fps=8, seed=seed,
        upscale_video=None, chain=r.limits.chain(),
        svd={"num_frames": num_frames, "fps": 8, "width": 64, "height": 64, "seed": seed, **FAST, **svd,
             "image_key": key})
    return r.runner.store.create("videos.image_to_video", payload.to_request(), stages=["video"]).id


def decoded(storage, key: str) -> np.ndarray:
    frames, fps = decode_mp4(storage.get_bytes(key))
    assert fps == 8
    return np.stack([np.asarray(frame) for frame in frames]).astype(np.int16)


def neighbour_differences(frames: np.ndarray) -> np.ndarray:
    """Mean absolute pixel difference between each frame and the next."""
    return np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3))


def test_a_video_of_three_clips_is_one_continuous_mp4(runner):
    r = runner
    assert r.limits.chain() == SVDChain(clip_frames=4, overlap=2)  # the tiny SVD: 4 frames a clip
    job_id = long_video_job(r, num_frames=8)  # 4 + 2 + 2 new frames: 3 clips
    progress: list[float] = []
    save = r.runner.store.save

    def spy(record):
        if record.id == job_id and record.stage == "video":
            progress.append(record.progress)
        return save(record)

    r.runner.store.save = spy
    assert r.runner.run_job(job_id)["status"] == "completed"
    record = r.runner.store.get(job_id)

    # One job, one "video" stage; its progress ran once from 0 to 100 over all three clips.
    assert record.stages == ["video"] and record.progress == 100
    assert progress == sorted(progress) and progress[0] == 0 and progress[-1] == 100
    assert len([p for p in progress if 0 < p < 100]) >= 3  # per clip, not only at the end

    # Each clip is recorded with its key, seed and frames; each after the first started from the
    # stored frame of the one before.
    stages = record.result["stages"]
    clips = [stages[f"video.clip-{i}"] for i in range(3)]
    assert [c["seed"] for c in clips] == [5, 6, 7] and [c["num_frames"] for c in clips] == [4, 4, 4]
    assert clips[1]["image_key"] == clips[0]["handoff_key"] and clips[2]["image_key"] == clips[1]["handoff_key"]
    assert clips[2]["handoff_key"] is None  # the last clip hands nothing on
    handoff = np.asarray(Image.open(io.BytesIO(r.storage.get_bytes(clips[0]["handoff_key"]))), dtype=np.int16)
    first = decoded(r.storage, clips[0]["key"])
    assert np.abs(handoff - first[-2]).mean() < np.abs(handoff - first[-1]).mean()  # where the crossfade begins

    # The joined video: 8 frames at 64x64, the output the client downloads, with the first clip's poster.
    video = stages["video"]
    assert (video["num_frames"], video["clips"], video["overlap"], video["seed"]) == (8, 3, 2, 5)
    assert [o.extra.get("role") for o in record.outputs] == ["video", "thumbnail"]
    assert record.outputs[0].key == video["key"] and record.outputs[1].key == clips[0]["poster_key"]
    frames = decoded(r.storage, video["key"])
    assert frames.shape == (8, 64, 64, 3)
    # The first clip's own frames come through untouched (but for the codec).
    assert np.abs(frames[:2] - first[:2]).mean() < 4

    # Continuity: at each join (the first frames that mix two clips), neighbouring frames differ no
    # more than within a clip. Measured on this model: join steps 18-23 against a median of 25 within.
    steps = neighbour_differences(frames)
    joins = [1, 2, 3, 4, 5]  # frames 2-3 and 4-5 are crossfades: steps 1..5 touch a join
    within = np.median(np.concatenate([neighbour_differences(decoded(r.storage, c["key"])) for c in clips]))
    assert steps[joins].max() <= 1.25 * within, (steps, within)

    # A cut end to end (no crossfade) of the same clips would jump more than the crossfade does.
    cut = join_clips([decoded(r.storage, c["key"]).astype(np.uint8) for c in clips], 0)
    assert neighbour_differences(cut.astype(np.int16))[[3, 7]].mean() > steps[joins].mean()

    # The same seed gives the same video.
    again = long_video_job(r, num_frames=8)
    assert r.runner.run_job(again)["status"] == "completed"
    assert np.array_equal(decoded(r.storage, r.runner.store.get(again).result["stages"]["video"]["key"]), frames)


def test_cancel_between_clips_starts_no_more_clips(runner):
    r = runner
    job_id = long_video_job(r, num_frames=10)  # 4 clips
    store, cancelled_at = r.runner.store, []
    save = store.save

    def cancel_after_the_first_clip(record):
        saved = save(record)
        stages = (record.result or {}).get("stages") or {}
        if record.id == job_id and "video.clip-0" in stages and not cancelled_at:
            store.request_cancel(job_id)  # as POST /v1/videos/{id}/cancel does
            cancelled_at.append(time.time())
        return saved

    store.save = cancel_after_the_first_clip
    assert r.runner.run_job(job_id)["status"] == "cancelled"
    store.save = save
    record = store.get(job_id)
    clips = [name for name in record.result["stages"] if name.startswith("video.clip-")]
    assert clips == ["video.clip-0"] and "video" not in record.result["stages"] and record.outputs == []
    # one clip ran; nothing was started after the cancel: no other clip, no join
    assert [name for name, _, _ in r.handle.calls] == ["generate_stream"]
    assert all(when < cancelled_at[0] for _, _, when in r.handle.calls)
    assert record.status == "cancelled" and record.progress < 50


# --- resume: a retried job starts after its last finished clip -------------------------------------------


class FlakySVD:
    """A fake SVD handle whose replica dies during clip `dies_at` once; it records each call."""

    def __init__(self, dies_at: int):
        self.dies_at = dies_at
        self.clips: list[SVDRequest] = []
        self.joins: list = []

    def options(self, **_):
        return self

    @property
    def generate_stream(self):
        fake = self

        class Method:
            @staticmethod
            def remote(request: SVDRequest):
                fake.clips.append(request)
                index = int(request.output_id.rsplit("-", 1)[1])

                class Stream:
                    def __iter__(self):
                        yield SVDProgress(step=1, total_steps=2)
                        if index == fake.dies_at:
                            fake.dies_at = None
                            raise ActorDiedError()
                        yield SVDProgress(step=2, total_steps=2)
                        yield SVDResponse(
                            model="svd", video_key=f"outputs/{request.output_id}.mp4",
                            poster_key=f"outputs/{request.output_id}.png",
                            handoff_key=f"outputs/{request.output_id}-handoff.png" if request.handoff_frame else None,
                            num_frames=request.num_frames, fps=request.fps, width=64, height=64, seed=request.seed,
                            steps=2, motion_bucket_id=127, noise_aug_strength=0.02, elapsed_s=0.1)

                    def cancel(self):
                        pass

                return Stream()

        return Method()

    @property
    def join(self):
        fake = self

        class Method:
            @staticmethod
            def remote(request):
                fake.joins.append(request)
                return SimpleNamespace(result=lambda timeout_s=None: SVDJoinResponse(
                    model="svd", video_key=f"outputs/{request.output_id}.mp4", num_frames=10, fps=request.fps,
                    width=64, height=64, elapsed_s=0.1))

        return Method()


def test_a_retried_job_resumes_after_its_last_finished_clip(fake_runner):
    r = fake_runner
    flaky = FlakySVD(dies_at=2)
    r.runner.handles = {"svd": flaky}
    job_id = long_video_job(r, num_frames=10, seed=40)  # 4 clips; the replica dies in clip 2
    assert r.runner.run_job(job_id)["status"] == "completed"
    record = r.runner.store.get(job_id)
    assert record.attempts == 2
    # clips 0 and 1 ran once; clip 2 twice (it died); clip 3 once; then one join of all four
    assert [int(c.output_id.rsplit("-", 1)[1]) for c in flaky.clips] == [0, 1, 2, 2, 3]
    assert [c.seed for c in flaky.clips] == [40, 41, 42, 42, 43]
    assert [c.image_key for c in flaky.clips[1:]] == [
        f"outputs/{job_id}.video-0-handoff.png", f"outputs/{job_id}.video-1-handoff.png",
        f"outputs/{job_id}.video-1-handoff.png", f"outputs/{job_id}.video-2-handoff.png"]
    assert [c.handoff_frame for c in flaky.clips] == [-2, -2, -2, -2, None]
    assert len(flaky.joins) == 1 and flaky.joins[0].video_keys == [
        f"outputs/{job_id}.video-{i}.mp4" for i in range(4)] and flaky.joins[0].overlap == 2
    assert record.result["stages"]["video"]["clips"] == 4 and record.outputs[0].key == f"outputs/{job_id}.video.mp4"


class FakeStream:
    """What a streamed handle call gives the runner: progress events, then the response."""

    def __init__(self, progress, response):
        self.events = [progress(step=1, total_steps=2), progress(step=2, total_steps=2), response]

    def __iter__(self):
        return iter(self.events)

    def cancel(self):
        pass


class FakeModel:
    """`handle.options(...).<method>.remote(request)`: streams `answer(request)`, recording the request."""

    def __init__(self, method: str, progress, answer):
        self.requests = []
        model = self

        class Method:
            @staticmethod
            def remote(request):
                model.requests.append(request)
                return FakeStream(progress, answer(request))

        setattr(self, method, Method())

    def options(self, **_):
        return self


def test_text_to_video_chains_from_the_still_and_upscales_the_joined_video(fake_runner):
    from deployments.sdxl.contract import SDXLImage, SDXLProgress, SDXLRequest, SDXLResponse
    from deployments.upscaler.contract import UpscaleProgress, UpscaleResponse
    from graphs.payloads import TextToVideoPayload

    r = fake_runner
    svd = FlakySVD(dies_at=None)
    sdxl = FakeModel("generate_stream", SDXLProgress, lambda q: SDXLResponse(
        model="sdxl", mode=q.mode, prompt=q.prompt, negative_prompt="", steps=2, guidance_scale=5.0, batch_images=1,
        elapsed_s=0.1, images=[SDXLImage(seed=q.seed, width=64, height=64, key=f"outputs/{q.output_id}-0.png")]))
    upscaler = FakeModel("upscale_stream", UpscaleProgress, lambda q: UpscaleResponse(
        model="upscaler", media="video", key=f"outputs/{q.output_id}.mp4", width=256, height=256, num_frames=10,
        fps=8, tiles=1, seed=q.seed, steps=2, noise_level=20, elapsed_s=0.1))
    r.runner.handles = {"svd": svd, "sdxl": sdxl, "upscaler": upscaler}
    payload = TextToVideoPayload.create(
        model="svd", prompt="a kite", size="256x256", seconds="1.25", num_frames=10, fps=8, seed=9,
        upscale_video={"steps": 2, "noise_level": None, "seed": 9},
        sdxl=SDXLRequest(mode="text_to_image", prompt="a kite", n=1, width=64, height=64, steps=2, seed=9),
        refine=None, upscale=None, svd={"num_frames": 10, "fps": 8, "width": 64, "height": 64, "seed": 9,
                                        "image_key": None},
        chain=SVDChain(clip_frames=4, overlap=2))
    job_id = r.runner.store.create("videos.text_to_video", payload.to_request(),
                                   stages=["generate", "video", "upscale_video"]).id
    assert r.runner.run_job(job_id)["status"] == "completed"
    record = r.runner.store.get(job_id)
    assert list(record.result["stages"]) == ["generate", *[f"video.clip-{i}" for i in range(4)], "video",
                                             "upscale_video"]
    assert svd.clips[0].image_key == f"outputs/{job_id}-0.png"  # the first clip animates the still
    assert [c.seed for c in svd.clips] == [9, 10, 11, 12]
    # the upscaler gets the joined video, once, and its output is what the client downloads
    assert [q.video_key for q in upscaler.requests] == [f"outputs/{job_id}.video.mp4"]
    assert record.outputs[0].key == f"outputs/{job_id}.upscale_video.mp4" and record.outputs[0].width == 256
