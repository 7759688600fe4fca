"""The review web UI in real headless Chromium against the real daemon."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import FAST_ENV, REPO, DaemonProcess, make_image, store_target
from test_review_api import auth, make_token

from triage.replay.dicom_writer import image_dataset, write_dataset

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
CT_IN_SCOPE = {"TRIAGE__SCOPE__MODALITIES": "[CR, DX, CT]"}


@pytest.fixture
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium not found at /usr/bin/chromium (make test installs it)")
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright not installed")
    with playwright.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield chromium
        chromium.close()


def test_sign_in_read_and_label_with_the_keyboard(
    tmp_path: Path, browser, pydicom_files: Path
) -> None:
    # label_rate 1: both cold-start studies are routed to the reader
    # a real CT (anatomy, window presets) is read here: the scope admits CT
    env = {**FAST_ENV, "TRIAGE__GATE__LABEL_RATE": "1.0", **CT_IN_SCOPE}
    proc = DaemonProcess(tmp_path / "home", env, []).start()
    try:
        shutil.copyfile(pydicom_files / "CT_small.dcm", proc.inbox / "ct.dcm")  # real anatomy
        proc.wait_for(lambda s: s["queue"]["pending"] == 1, 40, "the CT queued")
        make_image(proc.inbox / "second.dcm", study_uid="2.25.301", seed=1, size=256)
        proc.wait_for(lambda s: s["queue"]["pending"] == 2, 40, "two studies queued")
        # two retrains trained on the second study: forgotten twice in one, never learned
        # in the other (what the retrain worker stores)
        second = _forgotten(proc.home, "2.25.301", [(2, True), (1, False)])
        token = make_token(proc, "radiologist", "Dr Reader")
        page = browser.new_page(viewport={"width": 1366, "height": 768})
        outside = []
        page.on("request", lambda r: outside.append(r.url)
                if not r.url.startswith((proc.url, "blob:", "data:")) else None)
        page.goto(proc.url + "/")
        page.fill("#token", "trg_wrong")
        page.click("button[type=submit]")
        page.wait_for_selector("#signin-error:has-text('unknown token')")
        page.fill("#token", token)
        page.click("button[type=submit]")
        page.wait_for_selector("#reader:not([hidden])")
        page.wait_for_function(
            "() => { const i = document.getElementById('image');"
            " return i.complete && i.naturalWidth === 128; }")
        assert page.is_hidden("#prediction-card"), "the prediction is hidden by default"
        assert "no model yet" in page.inner_text("#why-text")
        assert "Dr Reader" in page.inner_text("#who")
        # no review.viewer_url: the study's DICOMweb URL is shown for a viewer
        page.wait_for_selector("#dicomweb-url:not([hidden])")
        assert f"{proc.url}/dicomweb/studies/" in page.inner_text("#dicomweb-url")
        first = json.loads(page.evaluate("() => JSON.stringify(state.study.study_id)"))
        # window/level: a CT preset re-renders the image on the server
        before = page.get_attribute("#image", "src")
        page.click("#presets button:has-text('Mediastinum')")
        page.wait_for_function(f"() => document.getElementById('image').src !== '{before}'")
        page.screenshot(path=str(tmp_path / "review.png"))
        if os.environ.get("TRIAGE_SCREENSHOTS"):  # refresh the README's picture on request
            shutil.copyfile(tmp_path / "review.png", REPO / "docs" / "screenshot-review.png")
        assert page.input_value("#ww") == "400" and page.input_value("#wc") == "40"
        assert "forgotten in training" not in page.inner_text("#why-numbers")  # never trained
        held = []  # the second study's image is held back: the reader is still loading it
        page.route(f"**/api/studies/{second}/images/**", lambda route: held.append(route))
        page.keyboard.press("2")  # pneumonia
        page.wait_for_function(f"() => state.study && state.study.study_id !== {first}")
        assert json.loads(page.evaluate("() => JSON.stringify(state.study.study_id)")) == second
        numbers = page.inner_text("#why-numbers")
        assert "forgotten in training" in numbers
        assert "3× over 2 trainings, never learned in 1" in numbers
        page.wait_for_selector("#tally:has-text('Today: 1 labeled')")
        history = httpx.get(f"{proc.url}/api/studies/{first}/labels",
                            headers=auth(token), timeout=5).json()["labels"]
        assert [(h["label"], h["reader"]) for h in history] == [("pneumonia", "Dr Reader")]
        page.keyboard.press("s")  # while its image loads: said, not silently dropped
        page.wait_for_selector("#toast:has-text('Still loading this study')")
        assert json.loads(page.evaluate("() => JSON.stringify(state.study.study_id)")) == second
        page.wait_for_function("() => state.busy")
        held[0].continue_()
        page.wait_for_function("() => !state.busy")  # its image loaded: keys act now
        page.keyboard.press("s")  # skip the second study
        page.wait_for_selector("#empty:not([hidden])")
        assert outside == [], f"the page requested other hosts: {outside}"
    finally:
        proc.stop(signal.SIGKILL)


def _forgotten(home: Path, study_uid: str, runs: list[tuple[int, bool]]) -> int:
    """Store forgetting events of the study `study_uid` for one retrain run each."""
    import time

    from triage.store import db as store
    from triage.training.runs import create_run, finish_run, record_forgetting

    db = store.connect(store_target(home))
    try:
        (study,) = db.execute("SELECT id FROM studies WHERE study_uid = ?",
                              [study_uid]).fetchone()
        for events, learned in runs:
            run_id = create_run(db, "manual", time.time())
            finish_run(db, run_id, "rejected", "for the test", {})
            record_forgetting(db, run_id, [(study, events, learned)])
    finally:
        db.close()
    return int(study)


STUDY_TEXT = "<script>window.__pwned = 'study'</script>"
SERIES_TEXT = "\"><img src=x onerror=\"window.__pwned='series'\">"
PATIENT_TEXT = "<script>window.__pwned</script>"  # PN: no '=' (its group separator)


def test_header_text_is_shown_as_text_and_never_runs(tmp_path: Path, browser) -> None:
    env = {**FAST_ENV, "TRIAGE__GATE__LABEL_RATE": "1.0", "TRIAGE__REVIEW__SHOW_PHI": "true",
           **CT_IN_SCOPE}
    proc = DaemonProcess(tmp_path / "home", env, []).start()
    try:
        pixels = np.random.default_rng(0).normal(40, 200, (64, 64)).astype(np.int16)
        ds = image_dataset(pixels, study_uid="2.25.666", patient_name=PATIENT_TEXT)
        ds.StudyDescription = STUDY_TEXT
        ds.SeriesDescription = SERIES_TEXT
        write_dataset(ds, proc.inbox / "hostile.dcm")
        proc.wait_for(lambda s: s["queue"]["pending"] == 1, 40, "the study queued")
        token = make_token(proc, "radiologist", "Dr Careful")
        page = browser.new_page()
        dialogs, violations = [], []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.on("console", lambda m: violations.append(m.text)
                if "Content Security Policy" in m.text else None)
        response = page.goto(proc.url + "/")
        assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
        assert response.headers["x-content-type-options"] == "nosniff"
        page.fill("#token", token)
        page.click("button[type=submit]")
        page.wait_for_selector("#reader:not([hidden])")
        page.wait_for_function("() => document.getElementById('image').naturalWidth > 0")
        assert STUDY_TEXT in page.inner_text("#ov-study")
        assert SERIES_TEXT in page.inner_text("#ov-pos")
        assert PATIENT_TEXT in page.inner_text("#patient")
        page.wait_for_timeout(300)  # an injected <img src=x> would have failed by now
        assert page.evaluate("() => window.__pwned") is None
        assert page.locator("#reader script, #reader img:not(#image)").count() == 0
        assert dialogs == [] and violations == [], (dialogs, violations)
    finally:
        proc.stop(signal.SIGKILL)
