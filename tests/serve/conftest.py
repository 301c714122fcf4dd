"""The real app from configs/local.yaml, started with `serve run` on a local Ray instance."""

from __future__ import annotations

import httpx
import pytest

from configs.local_runner import LocalServeApp


@pytest.fixture(scope="session")
def atelier(tmp_path_factory) -> LocalServeApp:
    app = LocalServeApp(tmp_path_factory.mktemp("atelier"))
    with app:
        yield app


@pytest.fixture()
def client(atelier) -> httpx.Client:
    with httpx.Client(base_url=atelier.base_url, timeout=120) as http:
        yield http
