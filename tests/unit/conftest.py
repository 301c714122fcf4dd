"""Fixtures shared by unit tests that run deployment classes in process, outside Ray Serve."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def batching_outside_a_replica():
    # serve.batch looks up the replica context only to warn about max_ongoing_requests.
    from ray.serve.batching import _BatchQueue

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests", lambda self: None)
        yield
