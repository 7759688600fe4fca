"""Study assembly and hand-off to the scorer, through the real daemon."""

from __future__ import annotations

import time

from conftest import DaemonProcess, make_image, store_rows


def _rows(daemon: DaemonProcess, sql: str) -> list[tuple]:
    return store_rows(daemon.home, sql)


def test_study_completes_after_quiet_period_and_a_late_instance_rescores_it(
    daemon: DaemonProcess,
) -> None:
    study = "2.25.4242"
    for i in range(3):
        make_image(daemon.inbox / f"s{i}.dcm", study_uid=study, seed=i)
    make_image(daemon.inbox / "other.dcm", study_uid="2.25.77", seed=9)
    status = daemon.wait_for(lambda s: s["studies"]["scored"] == 2, 30, "two studies scored")
    assert status["studies"]["total"] == 2
    ((study_id, n_instances, n_images, round_),) = _rows(
        daemon, f"SELECT id, n_instances, n_images, round FROM studies WHERE study_uid='{study}'"
    )
    assert (n_instances, n_images, round_) == (3, 3, 1)
    results = _rows(
        daemon, f"SELECT round, status, detail FROM study_results WHERE study_id={study_id}"
    )
    assert results == [(1, "routed", '{"reason": "cold_start"}')]  # no model yet

    make_image(daemon.inbox / "late.dcm", study_uid=study, seed=5)
    daemon.wait_for(lambda s: s["files"]["archived"] == 5, 30, "late instance archived")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        results = _rows(daemon, f"SELECT round FROM study_results WHERE study_id={study_id}")
        if len(results) == 2:
            break
        time.sleep(0.3)
    assert results == [(1,), (2,)]
    assert _rows(daemon, f"SELECT n_instances, state FROM studies WHERE id={study_id}") == [
        (4, "scored")
    ]


def test_studies_are_scored_one_at_a_time_in_completion_order(daemon: DaemonProcess) -> None:
    for i in range(4):
        make_image(daemon.inbox / f"o{i}.dcm", study_uid=f"2.25.{900 + i}", seed=i)
        time.sleep(0.6)  # stagger arrivals so completion times differ
    daemon.wait_for(lambda s: s["studies"]["scored"] == 4, 40, "four studies scored")
    completed = [
        row[0] for row in _rows(daemon, "SELECT id FROM studies ORDER BY completed_at, id")
    ]
    scored = [row[0] for row in _rows(daemon, "SELECT study_id FROM study_results ORDER BY id")]
    assert scored == completed


def test_a_study_without_images_is_unscoreable_not_scored(
    daemon: DaemonProcess, pydicom_files
) -> None:
    import shutil

    shutil.copyfile(pydicom_files / "rtplan.dcm", daemon.inbox / "plan.dcm")
    status = daemon.wait_for(lambda s: s["studies"]["unscoreable"] == 1, 30, "unscoreable study")
    assert status["files"]["unsupported"] == 1 and status["studies"]["scored"] == 0
