"""Fixtures shared across the suites: a real S3 API server (moto) on loopback, and storage on both backends."""

from __future__ import annotations

import os
import uuid

import pytest

from storage import Storage
from tests.s3_server import S3Server

S3_BUCKET = "atelier-test"

# The two-node cluster suite (tests/cluster: two Ray nodes, Redis, S3, `serve deploy`). `make test`
# runs its core: deploy and placement on both nodes, a broker outage, and losing a node under load
# with a fine-tuning run across both (about 6 minutes here). The longer parts, autoscaling up and
# down with broken apps beside it and `ray job submit` with the token, run in `make test-cluster`
# (ATELIER_CLUSTER_TESTS=all), which runs the whole suite; ATELIER_CLUSTER_TESTS=0 skips it all.
CLUSTER_LONG = ["cluster/test_4_autoscaling.py", "cluster/test_5_job_submit.py"]
_cluster = os.environ.get("ATELIER_CLUSTER_TESTS", "core").lower()
collect_ignore = ["cluster"] if _cluster in ("0", "no", "false") else [] if _cluster == "all" else CLUSTER_LONG


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
