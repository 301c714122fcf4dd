"""Issue 22, item 3 (presets): built-in styles read-only, each owner's own image and video presets
(create, edit, delete), and their use: an image preset as `style`, a video preset as `preset`."""

from __future__ import annotations

import pytest

from tests.keyed_app import keyed_app

KEYS = {"ann": ("ann-key", ["generate"]), "ben": ("ben-key", ["generate"]), "viewer": ("view-key", ["read"])}


def bearer(who: str) -> dict:
    return {"Authorization": f"Bearer {KEYS[who][0]}"}


@pytest.fixture()
def app(tmp_path):
    return keyed_app(tmp_path, KEYS)


def test_builtins_are_listed_and_read_only(app):
    client = app.client
    listed = client.get("/v1/presets", headers=bearer("ann")).json()["data"]
    assert {"photographic", "anime"} <= {p["name"] for p in listed if p["builtin"]}
    assert client.get("/v1/presets/anime", headers=bearer("ann")).json()["prompt"].startswith("anime artwork of")
    for method in ("PUT", "DELETE"):
        refused = client.request(method, "/v1/presets/anime", headers=bearer("ann"),
                                 json={"name": "anime", "prompt": "x {prompt}"} if method == "PUT" else None)
        assert refused.status_code == 403 and refused.json()["error"]["param"] == "name", refused.text
    taken = client.post("/v1/presets", headers=bearer("ann"), json={"name": "anime", "prompt": "x {prompt}"})
    assert taken.status_code == 403


def test_an_owner_creates_edits_and_deletes_its_presets(app):
    client = app.client
    made = client.post("/v1/presets", headers=bearer("ann"), json={
        "name": "product", "category": "product", "prompt": "studio product photo of {prompt}, white background",
        "negative_prompt": "clutter", "size": "96x64", "steps": 7, "guidance_scale": 4.5})
    assert made.status_code == 201, made.text
    assert client.post("/v1/presets", headers=bearer("ann"), json={"name": "product", "prompt": "{prompt}"}
                       ).status_code == 409
    assert client.get("/v1/presets/product", headers=bearer("ben")).status_code == 404  # ann's own
    assert "product" not in {p["name"] for p in client.get("/v1/presets", headers=bearer("ben")).json()["data"]}
    edited = client.put("/v1/presets/product", headers=bearer("ann"),
                        json={"name": "product", "prompt": "catalog shot of {prompt}", "steps": 9})
    assert edited.status_code == 200 and edited.json()["steps"] == 9
    assert client.get("/v1/presets/product", headers=bearer("ann")).json()["prompt"] == "catalog shot of {prompt}"
    assert client.post("/v1/presets", headers=bearer("viewer"), json={"name": "v", "prompt": "{prompt}"}
                       ).status_code == 403  # a read key makes none
    assert client.delete("/v1/presets/product", headers=bearer("ben")).status_code == 404
    assert client.delete("/v1/presets/product", headers=bearer("ann")).json()["deleted"] is True
    assert client.get("/v1/presets/product", headers=bearer("ann")).status_code == 404


def test_an_image_preset_is_a_style_and_a_video_preset_sets_the_motion(app):
    client, store = app.client, app.services.jobs.jobs
    client.post("/v1/presets", headers=bearer("ann"), json={
        "name": "product", "prompt": "studio photo of {prompt}", "negative_prompt": "clutter", "size": "96x64",
        "steps": 7, "guidance_scale": 4.5})
    job = client.post("/v1/images/generations?async=true", headers=bearer("ann"),
                      json={"prompt": "a teapot", "style": "product", "negative_prompt": "text"})
    assert job.status_code == 202, job.text
    sdxl = store.get(job.json()["id"]).request["sdxl"]
    assert sdxl["prompt"] == "studio photo of a teapot" and sdxl["negative_prompt"] == "clutter, text"
    assert (sdxl["width"], sdxl["height"], sdxl["steps"], sdxl["guidance_scale"]) == (96, 64, 7, 4.5)
    assert sdxl["style"] is None
    # the request's own settings win over the preset's
    own = client.post("/v1/images/generations?async=true", headers=bearer("ann"),
                      json={"prompt": "a teapot", "style": "product", "steps": 3, "size": "64x64"}).json()["id"]
    assert (store.get(own).request["sdxl"]["steps"], store.get(own).request["sdxl"]["width"]) == (3, 64)
    unknown = client.post("/v1/images/generations?async=true", headers=bearer("ben"),
                          json={"prompt": "a teapot", "style": "product"})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "style"
    client.post("/v1/presets", headers=bearer("ann"), json={
        "name": "slow-pan", "kind": "video", "seconds": 1, "fps": 4, "motion_bucket_id": 40,
        "noise_aug_strength": 0.1, "steps": 3})
    video = client.post("/v1/videos", headers=bearer("ann"), json={"prompt": "waves", "preset": "slow-pan",
                                                                   "image_steps": 2})
    assert video.status_code in (200, 202), video.text
    svd = store.get(video.json()["id"]).request["svd"]
    assert (svd["num_frames"], svd["fps"], svd["motion_bucket_id"], svd["noise_aug_strength"], svd["steps"]) == \
        (4, 4, 40, 0.1, 3)
    wrong = client.post("/v1/videos", headers=bearer("ann"), json={"prompt": "waves", "preset": "product"})
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "preset"


def test_a_video_preset_may_give_its_length_in_frames(app):
    client, store = app.client, app.services.jobs.jobs
    made = client.post("/v1/presets", headers=bearer("ann"), json={
        "name": "three", "kind": "video", "num_frames": 3, "fps": 6, "motion_bucket_id": 90})
    assert made.status_code == 201 and made.json()["num_frames"] == 3, made.text
    both = client.post("/v1/presets", headers=bearer("ann"), json={  # both, agreeing: 0.5 s at 8 fps
        "name": "half", "kind": "video", "seconds": 0.5, "num_frames": 4, "fps": 8})
    assert both.status_code == 201, both.text

    def svd_of(**fields) -> dict:
        video = client.post("/v1/videos", headers=bearer("ann"), json={"prompt": "waves", "image_steps": 2, **fields})
        assert video.status_code in (200, 202), video.text
        return store.get(video.json()["id"]).request["svd"]

    svd = svd_of(preset="three")
    assert (svd["num_frames"], svd["fps"], svd["motion_bucket_id"]) == (3, 6, 90)
    assert svd_of(preset="half")["num_frames"] == 4
    # the request's own length, in either unit, wins over the preset's
    assert svd_of(preset="three", seconds=0.5)["num_frames"] == 3  # 0.5 s at the preset's 6 fps
    assert svd_of(preset="three", fps=4, seconds=0.5)["num_frames"] == 2
    assert svd_of(preset="three", num_frames=2)["num_frames"] == 2
    assert svd_of(preset="half", num_frames=1)["num_frames"] == 1


@pytest.mark.parametrize("body, param", [
    ({"name": "x", "kind": "video", "seconds": 1, "fps": 8, "num_frames": 4}, "num_frames"),  # 8 frames, not 4
    ({"name": "x", "kind": "video", "seconds": 1, "num_frames": 4}, "num_frames"),  # no fps: cannot agree
    ({"name": "x", "kind": "video", "num_frames": 0}, "num_frames"),
    ({"name": "x", "prompt": "{prompt}", "num_frames": 4}, "num_frames"),  # a video setting on an image preset
    ({"name": "x", "prompt": "no placeholder"}, "prompt"),
    ({"name": "x"}, "prompt"),  # an image preset needs a template
    ({"name": "x", "prompt": "{prompt}", "fps": 8}, "fps"),  # a video setting on an image preset
    ({"name": "x", "kind": "video", "prompt": "{prompt}"}, "prompt"),
    ({"name": "../x", "prompt": "{prompt}"}, "name"),
    ({"name": "x", "prompt": "{prompt}", "steps": 0}, "steps"),
])
def test_bad_presets_name_the_field(app, body, param):
    refused = app.client.post("/v1/presets", headers=bearer("ann"), json=body)
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["param"] == param
