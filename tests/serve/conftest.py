"""The real app from configs/local.yaml, started with `serve run` on a local Ray instance.

Its Collect sources (Unsplash and Pexels) point at the loopback stand-in (tests/source_standin.py),
which runs in this process for as long as the app: `atelier.standin`, None when attached to a
running app (ATELIER_TEST_APP), whose sources are whatever it was started with.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from local.runner import LocalServeApp
from tests.source_standin import PEXELS_KEY, UNSPLASH_KEY, StandIn


# Package scope (tests/serve is a package): the app and its Ray instance stop once the serve tests
# are done, so the unit tests after them do not share the two cores with an idle app.
@pytest.fixture(scope="package")
def atelier(tmp_path_factory) -> LocalServeApp:
    if os.environ.get("ATELIER_TEST_APP"):  # "BASE_URL[,RAY_ADDRESS]" of a running app, while developing
        app = LocalServeApp.attached(os.environ["ATELIER_TEST_APP"])
        app.standin = None
        yield app
        return
    with StandIn() as standin:
        # The sources' base URLs and download hosts from config; their keys by environment variable
        # name (api_key_env), as in production. URL imports from the tests' own HTTP servers on
        # loopback are allowed explicitly.
        ingress = {**standin.ingress(), "dataset_import": {"allow_private_hosts": ["127.0.0.1"]}}
        app = LocalServeApp(tmp_path_factory.mktemp("atelier"), args_update={"ingress": ingress})
        app.standin = standin
        # `serve run` passes its environment to the Ray node it starts, whose workers (the ingress,
        # the job runner) read the keys: set for the start only.
        with pytest.MonkeyPatch.context() as env:
            env.setenv("TEST_UNSPLASH_KEY", UNSPLASH_KEY)
            env.setenv("TEST_PEXELS_KEY", PEXELS_KEY)
            app.start()
        try:
            yield app
        finally:
            app.stop()


@pytest.fixture()
def client(atelier) -> httpx.Client:
    with httpx.Client(base_url=atelier.base_url, timeout=120) as http:
        yield http


CHROMIUM = os.environ.get("ATELIER_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
# As root and on a closed network: no sandbox, and none of Chromium's background fetches.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM:
        message = "no chromium: `make test` installs Debian's chromium package"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "ui"  # a screenshot of each page test


@pytest.fixture()
def page(browser, atelier, request):
    """A desktop-sized page on the app; fails the test on any JavaScript error, and leaves its
    screenshot in artifacts/ui/. bypass_csp: Playwright's own string predicates (wait_for_function)
    run through eval, which the app's Content-Security-Policy forbids; the UI itself runs under it
    in test_web_ui.py's test_the_ui_runs_under_its_csp."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, base_url=atelier.base_url,
                                  bypass_csp=True)
    page = context.new_page()
    page.set_default_timeout(60_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
