"""Fixtures shared across the suites: a real S3 API server (moto) on loopback, and storage on both backends."""

from __future__ import annotations

import uuid

import pytest

from storage import Storage
from tests.s3_server import S3Server

S3_BUCKET = "atelier-test"


@pytest.fixture(scope="session")
def s3_server():
    with S3Server() as server:
        server.make_bucket(S3_BUCKET)
        yield server


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path) -> Storage:
    if request.param == "local":
        return Storage(str(tmp_path / "root"))
    server = request.getfixturevalue("s3_server")
    return Storage(f"s3://{S3_BUCKET}/prefix-{uuid.uuid4().hex[:10]}", server.storage_options())
