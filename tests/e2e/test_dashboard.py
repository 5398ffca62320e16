"""The dashboard in a real headless Chromium (Debian's chromium, driven by playwright's Python API; no
browser is downloaded), against a live `gradtune serve` with one worker, on SQLite and PostgreSQL:
enter the key, see the jobs, open a running job and watch its chart's points grow to the last
iteration, read its settings, cancel another job from its page; on SQLite also the studies' list and
a study's page after its first update, its jobs linked both ways.

Screenshots go to the test's tmp_path; with GRADTUNE_SCREENSHOT_DIR set they are also written there
(docs/ holds the ones the README shows)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import small_job, wait_for
from tests.e2e.test_embedded_serve import _admin, _serve, _stop, _up

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def _browser():
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI") == "true":
            pytest.fail("Debian's chromium is not installed (.ci/run installs it)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    return sync_playwright()


def _shot(page, tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    target = os.environ.get("GRADTUNE_SCREENSHOT_DIR")
    if target:
        shutil.copy(path, Path(target) / name)


def _per_layer_job() -> dict:
    job = small_job(iterations=4, tasks=2, steps=30)
    job["name"] = "iris-per-layer"
    job["hyperparameters"].update(per_layer=True, schedule_segments=2)
    return job


def _study_pages(page, base: str, auth: dict, tmp_path: Path) -> None:
    """A study with one tiny job (two tasks: one trained on, one held out) and its one update: its
    row in #/studies, then #/study/<id> with the update's point, the held-out row, the snippet and
    the job in its jobs' table, whose page links back to the study."""
    tiny = {"meta_batch": 1, "rounds": 1, "iterations": 1, "check_tasks": 1}
    body = {"name": "iris-study", "holdout_every": 2, "meta": tiny}
    study = httpx.post(f"{base}/v1/studies", json=body, headers=auth)
    assert study.status_code == 201, study.text
    sid = study.json()["id"]
    job = small_job(iterations=2, tasks=2, steps=20)
    del job["hyperparameters"]  # the study's
    job["study"] = sid
    jid = httpx.post(f"{base}/v1/jobs", json=job, headers=auth).json()["id"]
    history = lambda: httpx.get(f"{base}/v1/studies/{sid}/history", headers=auth).json()["items"]  # noqa: E731
    wait_for(lambda: len(history()) == 1, 120, "the study's update after its job")
    page.goto(f"{base}/#/studies")
    held_out = page.locator(f"tr[data-study='{sid}'] td.held-out")
    wait_for(lambda: held_out.inner_text() not in ("", "–"), 30, "the study's held-out val loss in the list")
    page.click(f"tr[data-study='{sid}'] a")
    page.wait_for_selector("#study-history svg[data-points='1']")
    assert page.locator("#study-history .chart").first.locator("circle").count() == 1
    assert "torch.optim.SGD(" in page.inner_text("#snippet")
    assert page.locator("#study-evaluation tbody tr").count() == 2  # the held-out task and the mean
    assert page.locator(f"#study-updates a[href='#/job/{jid}']").count() == 1
    assert page.locator(f"#study-jobs tr[data-job='{jid}'] .status.succeeded").count() == 1
    _shot(page, tmp_path, "dashboard-study.png")
    page.click(f"#study-jobs tr[data-job='{jid}'] a[href='#/job/{jid}'] >> nth=0")
    page.wait_for_selector(f"#job-head a#job-study[href='#/study/{sid}']")


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_dashboard_follows_a_job_and_cancels_another(tmp_path, backend, request):
    extra = {"GRADTUNE_EVENTS_POLL_SECONDS": "0.2"}
    if backend == "postgresql":
        extra["GRADTUNE_DATABASE_URL"] = request.getfixturevalue("pg_url")
    proc, base, _env = _serve(tmp_path, **extra)
    try:
        wait_for(lambda: _up(base, "/readyz"), 120, "gradtune serve and its worker")
        auth = _admin(tmp_path)
        key = auth["Authorization"].split()[1]
        post = lambda body: httpx.post(f"{base}/v1/jobs", json=body, headers=auth).json()["id"]  # noqa: E731
        with _browser() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{base}/#/jobs")
            page.fill("#key-input", key)  # asked once, kept in the tab's session storage
            page.click("#key button")
            page.wait_for_selector("#jobs")
            # the jobs start once the browser is up (starting it can take longer than the job runs)
            watched = post(small_job(iterations=10, tasks=4, steps=400))  # a few seconds: long enough to watch
            waiting = post(small_job(iterations=200, tasks=2, steps=60))  # queued behind it: one worker
            page.goto(f"{base}/#/job/{watched}")
            page.wait_for_selector("#charts svg")

            seen: list[int] = []
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                n = int(page.get_attribute("#charts svg", "data-points") or 0)
                if not seen or n != seen[-1]:
                    seen.append(n)
                if n == 10 and page.locator("#job-head .status.succeeded").count():
                    break
                time.sleep(0.1)
            assert seen[-1] == 10, seen
            assert seen == sorted(seen) and len(seen) >= 3, f"the points did not grow live: {seen}"
            page.wait_for_selector("#evaluation")
            assert "optimizer = torch.optim.SGD(" in page.inner_text("#snippet")
            history = httpx.get(f"{base}/v1/jobs/{watched}/history", headers=auth).json()["items"]
            circles = page.locator("#charts .chart").first.locator("circle").count()
            assert circles == len([i for i in history if i["meta_loss"] is not None]) == 10

            page.goto(f"{base}/#/job/{waiting}")  # the key is still there: no form
            page.wait_for_selector("#cancel")
            page.click("#cancel")
            page.wait_for_selector("#job-head .status.cancelled, #job-head button[disabled]#cancel", timeout=30_000)
            wait_for(
                lambda: httpx.get(f"{base}/v1/jobs/{waiting}", headers=auth).json()["status"] == "cancelled",
                60,
                "the job cancelled from its page",
            )
            page.wait_for_selector("#job-head .status.cancelled", timeout=30_000)

            page.goto(f"{base}/#/jobs")
            page.wait_for_selector(f"tr[data-job='{watched}']")
            assert page.locator("#jobs tbody tr").count() == 2
            page.select_option("#status-filter", "cancelled")
            # (no wait_for_function: the page's Content-Security-Policy forbids evaluating strings)
            wait_for(lambda: page.locator("#jobs tbody tr").count() == 1, 30, "the filtered list")
            if backend == "sqlite":
                rich = post(_per_layer_job())
                wait_for(
                    lambda: httpx.get(f"{base}/v1/jobs/{rich}", headers=auth).json()["status"] == "succeeded",
                    120,
                    "the per-layer job",
                )
                page.goto(f"{base}/#/jobs")
                page.wait_for_selector(f"tr[data-job='{rich}'] .spark polyline")
                _shot(page, tmp_path, "dashboard-jobs.png")
                page.goto(f"{base}/#/job/{rich}")
                page.wait_for_selector("table.heatmap[data-field='lr']")
                _shot(page, tmp_path, "dashboard-job.png")
                for view, selector in (("workers", "#workers"), ("datasets", "#datasets"), ("models", "#models")):
                    page.goto(f"{base}/#/{view}")
                    page.wait_for_selector(selector)
                _study_pages(page, base, auth, tmp_path)
            assert errors == [], errors
            browser.close()
    finally:
        _stop(proc)
