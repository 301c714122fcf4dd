"""Datasets through the HTTP API on the running app: upload, dedupe, thumbnails, URL import job."""

from __future__ import annotations

import io
import uuid
import zipfile

import pytest
from PIL import Image

from tests.media import noise_image_server
from tests.serve.helpers import noise_image, wait_for_job

pytestmark = pytest.mark.serve


@pytest.fixture(scope="module")
def image_server():
    with noise_image_server(24) as url:
        yield url


@pytest.fixture()
def dataset(client) -> dict:
    response = client.post("/v1/datasets", json={"name": f"pets-{uuid.uuid4().hex[:8]}", "trigger_word": "sks"})
    assert response.status_code == 201, response.text
    return response.json()


def _upload(client, dataset_id: str, count: int, offset: int = 0):
    files = []
    for i in range(offset, offset + count):
        files.append(("files", (f"img{i}.png", noise_image(32 + i, 40, seed=i), "image/png")))
        files.append(("files", (f"img{i}.txt", f"caption {i}".encode(), "text/plain")))
    return client.post(f"/v1/datasets/{dataset_id}/images", files=files)


def test_upload_dedupe_versions_and_thumbnails(client, dataset):
    first = _upload(client, dataset["id"], 8)
    assert first.status_code == 200, first.text
    assert first.json()["added"] == 8 and first.json()["version"] == 1

    again = _upload(client, dataset["id"], 8).json()
    assert again["added"] == 0 and len(again["duplicates"]) == 8

    more = _upload(client, dataset["id"], 2, offset=8).json()
    assert more["added"] == 2 and more["version"] == 2

    view = client.get(f"/v1/datasets/{dataset['id']}").json()
    assert view["latest_version"] == 2 and view["images"] == 10
    assert [v["images"] for v in view["versions"]] == [8, 10]
    assert 1 <= len(view["thumbnails"]) <= 4
    thumb = client.get(view["thumbnails"][0])
    assert thumb.status_code == 200
    assert Image.open(io.BytesIO(thumb.content)).size[1] == 40
    assert dataset["id"] in {d["id"] for d in client.get("/v1/datasets").json()["data"]}


def test_corrupt_image_is_reported_by_name_and_the_rest_lands(client, dataset):
    files = [("files", ("good.png", noise_image(16, 16, seed=1), "image/png")),
             ("files", ("broken.png", b"\x89PNG not really", "image/png"))]
    result = client.post(f"/v1/datasets/{dataset['id']}/images", files=files).json()
    assert result["added"] == 1
    assert [r["filename"] for r in result["rejected"]] == ["broken.png"]


def test_zip_bomb_upload_is_refused_with_413(client, dataset):
    """100 MB of zeros deflate to about 100 KB: under the upload limit, but over what the zips of
    one upload may expand to (4 x max_upload_bytes by default), so it is refused unread."""
    buffer, chunk = io.BytesIO(), bytes(1024 * 1024)
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("bomb.png", "w") as entry:
            for _ in range(100):
                entry.write(chunk)
        archive.writestr("ok.png", noise_image(16, 16, seed=3))
    response = client.post(f"/v1/datasets/{dataset['id']}/images",
                           files=[("files", ("bomb.zip", buffer.getvalue(), "application/zip"))])
    assert response.status_code == 413, response.text
    assert response.json()["error"]["param"] == "files" and "bomb.zip" in response.json()["error"]["message"]
    assert client.get(f"/v1/datasets/{dataset['id']}").json()["images"] == 0


def test_url_import_runs_as_a_job(client, dataset, image_server):
    urls = [f"{image_server}/{i}.png" for i in range(3)]
    job = client.post(f"/v1/datasets/{dataset['id']}/imports", json={"urls": urls})
    assert job.status_code == 202, job.text
    final = wait_for_job(client, job.json()["id"])
    assert final["status"] == "completed", final
    assert final["result"]["added"] == 3
    assert client.get(f"/v1/datasets/{dataset['id']}").json()["images"] == 3


@pytest.mark.parametrize("body, param", [
    ({"urls": ["file:///etc/passwd"]}, "urls.0"),
    ({"urls": ["http://169.254.169.254/latest/meta-data"]}, "urls.0"),
    ({"prefix": "../../etc"}, "prefix"),
])
def test_refused_imports_name_the_field(client, dataset, body, param):
    response = client.post(f"/v1/datasets/{dataset['id']}/imports", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_bad_names_unknown_ids_and_delete_confirmation(client, dataset):
    assert client.post("/v1/datasets", json={"name": "../escape"}).status_code == 400
    assert client.post("/v1/datasets", json={"name": dataset["name"]}).status_code == 409
    assert client.get("/v1/datasets/ds_doesnotexist").status_code == 404
    refused = client.delete(f"/v1/datasets/{dataset['id']}", params={"confirm": "wrong"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "confirm"
    assert client.delete(f"/v1/datasets/{dataset['id']}", params={"confirm": dataset["name"]}).status_code == 200
    assert client.get(f"/v1/datasets/{dataset['id']}").status_code == 404
