"""The Monitor page (issue 22) in headless Chromium against the real app: it charts GET /v1/stats.

The page runs under the app's real Content-Security-Policy here (no bypass), so Chart.js's bundle
(web/vendor/charts.js, `make web`) is shown to draw without inline script or style. Screenshots
land in artifacts/ui/.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.serve.helpers import wait_for_job

pytestmark = pytest.mark.serve

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "ui"
REFRESH_S = 5  # web/pages/monitor.js REFRESH_MS

# prompt → text_to_image → select (index 5 of 1 image: fails when it runs) → output
FAILING_WORKFLOW = {
    "name": "monitor-fails",
    "nodes": [{"id": "prompt", "type": "prompt", "params": {"text": "a kite the monitor watches fail"}},
              {"id": "t2i", "type": "text_to_image", "params": {"size": "32x32", "steps": 2, "seed": 1}},
              {"id": "pick", "type": "select", "params": {"index": 5}},
              {"id": "out", "type": "output", "params": {"name": "kite"}}],
    "edges": [{"source": "prompt", "source_port": "text", "target": "t2i", "target_port": "prompt"},
              {"source": "t2i", "source_port": "images", "target": "pick", "target_port": "images"},
              {"source": "pick", "source_port": "image", "target": "out", "target_port": "value"}],
}

# How many pixels of a canvas are exactly one colour (a bar's fill), and how many are drawn at all.
PIXELS = """([id, rgb]) => {
  const c = document.getElementById(id);
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let drawn = 0, exact = 0;
  for (let i = 0; i < d.length; i += 4) {
    if (d[i + 3] > 0) drawn++;
    if (d[i] === rgb[0] && d[i + 1] === rgb[1] && d[i + 2] === rgb[2] && d[i + 3] === 255) exact++;
  }
  return { drawn, exact, width: c.width, height: c.height };
}"""

# Every table of the page, by id: its header row and its body rows, as text.
TABLES = """() => Object.fromEntries([...document.querySelectorAll('#page-monitor table')].map((t) => [t.id, {
  head: [...t.querySelectorAll('thead th')].map((c) => c.textContent),
  rows: [...t.querySelectorAll('tbody tr')].map((r) => [...r.children].map((c) => c.textContent)),
}]))"""


def rgb(hex_colour: str) -> list[int]:
    return [int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)]


def until(check, timeout_s: float = 30, message: str = ""):
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        assert time.monotonic() < deadline, message or "timed out"
        time.sleep(0.2)
    return value


def by_row(table: dict) -> dict[str, dict[str, str]]:
    """{row header: {column header: cell}} of a numbers table."""
    head = table["head"]
    return {row[0]: dict(zip(head[1:], row[1:])) for row in table["rows"] if len(row) == len(head)}


def counts_of(table: dict) -> dict[str, dict[str, int]]:
    """A counts table as the API's shape: zeros and the total column left out."""
    return {name: {col: int(v) for col, v in cells.items() if col != "total" and int(v)}
            for name, cells in by_row(table).items()}


def matches(tables: dict, stats: dict) -> bool:
    """Whether the page's tables say what `stats` (a GET /v1/stats answer) says."""
    jobs, errors = tables["mon-jobs-table"], tables["mon-errors-table"]
    timing = {m: (int(c["jobs"]), float(c["mean (s)"]), float(c["p95 (s)"]))
              for m, c in by_row(tables["mon-timing-table"]).items()}
    expected_timing = {m: (t["count"], t["mean_s"], t["p95_s"]) for m, t in stats["generation_s"].items()}
    replicas = {d: {s.upper(): int(v) for s, v in states.items() if int(v)}
                for d, states in by_row(tables["mon-replicas"]).items()}
    expected_replicas = {d: {s: n for s, n in states.items() if n} for d, states in (stats["replicas"] or {}).items()}
    failures = [row for row in tables["mon-failures"]["rows"] if len(row) == 5]
    return (counts_of(jobs) == stats["jobs"]
            and all(int(cells["total"]) == sum(stats["jobs"][k].values()) for k, cells in by_row(jobs).items())
            and counts_of(errors) == stats["errors"]
            and timing.keys() == expected_timing.keys()
            and all(timing[m][0] == expected_timing[m][0]
                    and timing[m][1:] == pytest.approx(expected_timing[m][1:], abs=0.0051) for m in timing)
            and replicas == expected_replicas
            and [row[2] for row in failures] == [f["id"] for f in stats["recent_failures"]]
            and all(row[3:] == [f["type"], f["message"]] for row, f in zip(failures, stats["recent_failures"])))


def test_the_monitor_page_charts_the_stats_and_refreshes_only_while_shown(browser, atelier, client):
    # 1. A job that completes and one that fails, so every chart has something to draw.
    done = client.post("/v1/images/generations", params={"async": "true"},
                       json={"prompt": "a small red kite", "size": "64x64", "steps": 2, "seed": 4})
    failing = client.post("/v1/workflows/runs", json={"workflow": FAILING_WORKFLOW})
    assert done.status_code == 202 and failing.status_code == 202, (done.text, failing.text)
    assert wait_for_job(client, done.json()["id"])["status"] == "completed"
    failed = wait_for_job(client, failing.json()["id"], timeout_s=240)
    assert failed["status"] == "failed", failed
    stats = client.get("/v1/stats").json()
    assert stats["jobs"]["workflows.run"]["failed"] >= 1 and stats["generation_s"] and stats["recent_failures"]

    # 2. The page, under the real CSP; every JavaScript error and console error is collected.
    context = browser.new_context(viewport={"width": 1280, "height": 900}, base_url=atelier.base_url)
    page = context.new_page()
    page.set_default_timeout(60_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
    page.on("console", lambda m: errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    stats_requests: list[float] = []
    answers = []  # the page's GET /v1/stats responses, in order
    page.on("request", lambda r: stats_requests.append(time.monotonic()) if "/v1/stats" in r.url else None)
    page.on("response", lambda r: answers.append(r) if "/v1/stats" in r.url else None)
    try:
        page.goto("/#/monitor")
        page.wait_for_selector("#mon-jobs-table tbody th")
        assert page.title() == "Monitor · Atelier"
        assert page.get_attribute("nav a[href='#/monitor']", "aria-current") == "page"

        # 3. The charts are drawn: each canvas has pixels, and each bar colour is there.
        bars = {"mon-jobs-canvas": ["#2f9e44", "#e03131"],  # completed, failed
                "mon-timing-canvas": ["#4c6ef5", "#f76707"],  # mean, p95
                "mon-errors-canvas": ["#e8590c"]}  # the first error type
        for canvas, colours in bars.items():
            for colour in colours:
                pixels = until(lambda: (p := page.evaluate(PIXELS, [canvas, rgb(colour)]))["exact"] > 50 and p,
                               message=f"{canvas} has no {colour} bar: {page.evaluate(PIXELS, [canvas, rgb(colour)])}")
                assert pixels["width"] > 200 and pixels["height"] > 80, pixels
                assert pixels["drawn"] > pixels["exact"], pixels  # axes, labels and the legend too
        assert page.eval_on_selector("#mon-jobs-canvas", "c => c.toDataURL()").startswith("data:image/png;base64,")

        # 4. The numbers in the tables are those of GET /v1/stats: the page's latest answer, and
        # (nothing has run since) the one the test reads itself.
        until(lambda: matches(page.evaluate(TABLES), answers[-1].json()), message=str(page.evaluate(TABLES)))
        tables = page.evaluate(TABLES)
        ours = client.get("/v1/stats").json()
        assert counts_of(tables["mon-jobs-table"]) == ours["jobs"]
        assert counts_of(tables["mon-errors-table"]) == ours["errors"]
        assert set(by_row(tables["mon-timing-table"])) == set(ours["generation_s"])
        shown = answers[-1].json()
        assert page.inner_text("#mon-queue") == str(shown["queue_depth"])
        assert page.inner_text("#mon-total") == str(shown["window"])
        assert shown["replicas"], "Serve's replica counts are missing"
        assert any("SDXL" in name for name in shown["replicas"])
        failure_row = page.locator("#mon-failures tbody tr", has_text=failed["id"])
        assert failure_row.count() == 1 and "pick" in failure_row.inner_text()

        # 5. Accessible: a caption per chart, a summary of its numbers on the canvas, the table
        # shown on request.
        for figure in ("mon-jobs", "mon-timing", "mon-errors"):
            assert page.inner_text(f"#{figure} figcaption")
            assert page.get_attribute(f"#{figure}-canvas", "role") == "img"
        label = page.get_attribute("#mon-jobs-canvas", "aria-label")
        assert "workflows.run" in label and "failed" in label and "table" in label, label
        wrap_width = "t => t.closest('.table-wrap').getBoundingClientRect().width"
        assert page.eval_on_selector("#mon-jobs-table", wrap_width) <= 1  # there for screen readers only
        page.check("#mon-numbers")
        assert page.eval_on_selector("#mon-jobs-table", wrap_width) > 200
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "monitor.png"), full_page=True)

        # 6. It refreshes while shown...
        # (Playwright's own wait, not time.sleep: the request events are delivered while it waits.)
        before = len(stats_requests)
        deadline = time.monotonic() + 3 * REFRESH_S + 10
        while len(stats_requests) < before + 2:
            assert time.monotonic() < deadline, f"it did not refresh every {REFRESH_S} s: {stats_requests}"
            page.wait_for_timeout(250)
        gaps = [b - a for a, b in zip(stats_requests, stats_requests[1:])]
        assert min(gaps) > REFRESH_S - 1, gaps  # one loop at a time, never faster than its period
        # ...and stops when another page is shown, and starts again when it is shown again.
        page.click("nav a[href='#/gallery']")
        page.wait_for_selector("#page-monitor", state="hidden")
        page.wait_for_timeout(500)
        hidden_at = len(stats_requests)
        page.wait_for_timeout((REFRESH_S + 2) * 1000)
        assert len(stats_requests) == hidden_at, "the Monitor page kept polling while hidden"
        with page.expect_request(lambda r: "/v1/stats" in r.url, timeout=3_000):
            page.click("nav a[href='#/monitor']")

        # 7. At phone width the charts and tables fit: nothing scrolls sideways.
        page.set_viewport_size({"width": 375, "height": 800})
        until(lambda: page.evaluate("document.getElementById('mon-jobs-canvas').getBoundingClientRect().right") <= 375)
        assert page.evaluate("document.documentElement.scrollWidth - window.innerWidth") <= 0
        page.screenshot(path=str(ARTIFACTS / "phone_monitor.png"), full_page=True)
    finally:
        context.close()
    assert not errors, errors
