"""storage.datasets_cli: every subcommand through ``main([...])`` on a local storage root."""

from __future__ import annotations

import json
import zipfile

import pytest

from storage.datasets import DatasetStore
from storage.datasets_cli import main
from storage.fs import Storage
from storage.jobs import JobOutput, JobStore
from storage.keys import output_key
from tests.media import noise_image, noise_image_server


@pytest.fixture()
def root(tmp_path) -> str:
    return str(tmp_path / "root")


@pytest.fixture()
def cli(root, capsys):
    """``cli(*args)`` -> (exit code, stdout, stderr) of one run against ``root``."""

    def run(*args: str) -> tuple[int, str, str]:
        code = main(["--storage-root", root, *args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def json_documents(text: str) -> list:
    """The JSON documents printed one after another (``show`` prints two)."""
    decoder, docs, at = json.JSONDecoder(), [], 0
    while text[at:].strip():
        at += len(text[at:]) - len(text[at:].lstrip())
        doc, at = decoder.raw_decode(text, at)
        docs.append(doc)
    return docs


def test_create_add_list_and_show(cli, root, tmp_path):
    code, out, _ = cli("create", "cats", "--trigger-word", "sks", "--license", "cc-by-4.0", "--description", "mine")
    assert code == 0
    created = json.loads(out)
    assert (created["name"], created["trigger_word"], created["license"], created["latest_version"]) == (
        "cats", "sks", "cc-by-4.0", 0)

    code, _, err = cli("create", "cats")
    assert code == 1 and "exists" in err

    files = tmp_path / "files"
    files.mkdir()
    (files / "a.png").write_bytes(noise_image(16, 12, 1))
    (files / "a.txt").write_text("a cat on a mat\n")
    (files / "b.png").write_bytes(noise_image(20, 20, 2))
    (files / "broken.png").write_bytes(b"\x89PNG truncated")
    with zipfile.ZipFile(files / "more.zip", "w") as archive:
        archive.writestr("set/c.png", noise_image(8, 24, 3))
        archive.writestr("set/c.txt", "from the zip")
    code, out, _ = cli("add", "cats", *(str(files / n) for n in ("a.png", "a.txt", "b.png", "broken.png", "more.zip")),
                       "--tags", "cat, pet", "--captions", '{"b.png": "from the flag"}')
    assert code == 0
    added = json.loads(out)
    assert (added["version"], added["added"], added["images"]) == (1, 3, 3)
    assert [r["filename"] for r in added["rejected"]] == ["broken.png"]

    code, out, _ = cli("add", created["id"], str(files / "a.png"))  # by id; the same image again
    assert code == 0 and json.loads(out)["added"] == 0 and json.loads(out)["duplicates"] == ["a.png"]

    code, out, _ = cli("list")
    assert code == 0
    [listed] = json.loads(out)
    assert (listed["id"], listed["images"], listed["latest_version"]) == (created["id"], 3, 1)
    assert "versions" not in listed

    code, out, _ = cli("show", "cats", "--rows", "5")
    assert code == 0
    shown, rows = json_documents(out)
    assert [(v["version"], v["images"]) for v in shown["versions"]] == [(1, 3)]
    assert {r["filename"]: (r["caption"], r["width"], r["height"], r["tags"]) for r in rows} == {
        "a.png": ("a cat on a mat", 16, 12, ["cat", "pet"]),
        "b.png": ("from the flag", 20, 20, ["cat", "pet"]),
        "set/c.png": ("from the zip", 8, 24, ["cat", "pet"])}
    assert rows == DatasetStore(Storage(root)).manifest(created["id"]).to_pylist()


def test_import_prefix_and_max_pixels(cli, tmp_path):
    cli("create", "folder")
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    (source / "fits.png").write_bytes(noise_image(16, 16, 1))
    (source / "fits.txt").write_text("sixteen square")
    (source / "sub" / "wide.png").write_bytes(noise_image(17, 16, 2))
    code, out, err = cli("--max-pixels", "256", "import-prefix", "folder", str(source))
    assert code == 0 and "2/2" in err  # progress goes to stderr, the result to stdout
    result = json.loads(out)
    assert result["added"] == 1
    assert result["rejected"] == [{"filename": "sub/wide.png", "reason": "image is 17x16, over the limit of 256 pixels"}]


def test_add_outputs_by_key_and_by_job(cli, root):
    cli("create", "made")
    storage = Storage(root)
    jobs = JobStore(storage)
    record = jobs.create("images.generations", {"sdxl": {"prompt": "a lighthouse at night"}})
    key = output_key(record.id, 0)
    storage.put_bytes(key, noise_image(16, 16, 7), content_type="image/png")
    record.outputs.append(JobOutput(key=key, content_type="image/png", width=16, height=16))
    jobs.save(record.model_copy(update={"status": "completed"}))
    loose = output_key("req_0000000000000000001", 0)
    storage.put_bytes(loose, noise_image(16, 16, 8))

    code, out, _ = cli("add-outputs", "made", loose, "jobs/not-an-output.json")
    assert code == 0
    by_key = json.loads(out)
    assert by_key["added"] == 1 and [r["filename"] for r in by_key["rejected"]] == ["jobs/not-an-output.json"]

    code, out, _ = cli("add-outputs", "made", "--job", record.id, "job_unknown")
    assert code == 0
    by_job = json.loads(out)
    assert (by_job["version"], by_job["added"], by_job["images"]) == (2, 1, 2)
    assert by_job["rejected"] == [{"filename": "job_unknown", "reason": "no such job"}]
    rows = DatasetStore(storage).manifest(DatasetStore(storage).resolve("made")).to_pylist()
    assert [(r["source"], r["caption"]) for r in rows] == [(loose, ""), (key, "a lighthouse at night")]


@pytest.mark.parametrize("bad_id", ["../jobs/x", "job with spaces", ".hidden", ""])
def test_malformed_job_id_is_a_usage_error(cli, root, capsys, bad_id):
    cli("create", "made")
    with pytest.raises(SystemExit) as exit_:
        main(["--storage-root", root, "add-outputs", "made", "--job", bad_id])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--job: job id" in err and "Traceback" not in err
    assert DatasetStore(Storage(root)).versions(DatasetStore(Storage(root)).resolve("made")) == []


@pytest.fixture()
def image_server():
    with noise_image_server(12) as url:
        yield url


def test_import_urls_from_args_and_a_file(cli, tmp_path, image_server):
    cli("create", "web")
    url_file = tmp_path / "urls.txt"
    url_file.write_text(f"# a comment\n{image_server}/2.png\n\n{image_server}/3.png\n")
    code, out, _ = cli("import-urls", "web", f"{image_server}/1.png", "--file", str(url_file))
    assert code == 0
    refused = json.loads(out)  # loopback is private: refused without --allow-private
    assert refused["added"] == 0 and len(refused["rejected"]) == 3
    assert all(r["reason"].startswith("refused") for r in refused["rejected"])

    code, out, _ = cli("import-urls", "web", f"{image_server}/1.png", "--file", str(url_file),
                       "--allow-private", "127.0.0.1", "--concurrency", "2")
    assert code == 0
    result = json.loads(out)
    assert (result["added"], result["rejected"], result["version"]) == (3, [], 1)

    with pytest.raises(SystemExit) as exit_:
        cli("import-urls", "web", f"{image_server}/1.png", "--concurrency", "0")
    assert exit_.value.code == 2


def test_unknown_dataset_and_missing_file_are_errors(cli, tmp_path):
    code, _, err = cli("show", "nope")
    assert code == 1 and "no dataset with id or name 'nope'" in err
    cli("create", "cats")
    code, _, err = cli("add", "cats", str(tmp_path / "missing.png"))
    assert code == 1 and err.startswith("error:") and "missing.png" in err
