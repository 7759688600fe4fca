"""The real daemon, the real watcher, SQLite file and HTTP server: nothing is lost."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx
from conftest import FAST_ENV, PHI_STRINGS, DaemonProcess, drop_without_root_read, make_image

FINAL = ("archived", "unsupported", "out_of_scope", "quarantined", "duplicate", "vanished")
# The corpus (CT, MR, NM, US, colour...) exercises every decoder: a scope admitting any image.
ANY_IMAGE = {"TRIAGE__SCOPE__MODALITIES": "[]", "TRIAGE__SCOPE__BODY_PARTS": "[]",
             "TRIAGE__SCOPE__PHOTOMETRIC": "[]", "TRIAGE__SCOPE__MIN_ROWS": "1",
             "TRIAGE__SCOPE__MIN_COLS": "1"}


def _settled(total: int):
    def check(status: dict) -> bool:
        files = status["files"]
        return status["inbox_waiting"] == 0 and files["in_flight"] == 0 and sum(
            files[state] for state in FINAL
        ) >= total
    return check


def _corpus(pydicom_files: Path) -> list[Path]:
    return sorted(p for p in pydicom_files.rglob("*") if p.is_file())


def _bad_inputs(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    empty = folder / "empty.dcm"
    empty.write_bytes(b"")
    text = folder / "notes.dcm"
    text.write_text("this is a radiology report typed into a text file\n" * 20)
    huge = folder / "huge_length.dcm"
    data = bytearray(make_image(folder / "tmp.dcm", seed=7).read_bytes())
    (folder / "tmp.dcm").unlink()
    # Declare a 4 GB length for the pixel data element (OW, 4-byte length after 2 reserved).
    marker = data.rfind(b"\xe0\x7f\x10\x00OW\x00\x00")
    data[marker + 8 : marker + 12] = (0xFFFFFFF0).to_bytes(4, "little")
    huge.write_bytes(bytes(data))
    truncated = folder / "truncated.dcm"
    full = make_image(folder / "t.dcm", seed=8).read_bytes()
    (folder / "t.dcm").unlink()
    truncated.write_bytes(full[: len(full) - 500])
    return {"empty": empty, "text": text, "huge": huge, "truncated": truncated}


def test_every_file_of_the_pydicom_corpus_and_bad_input_is_accounted_for(
    tmp_path: Path, pydicom_files: Path
) -> None:
    proc = DaemonProcess(tmp_path / "home", {**FAST_ENV, **ANY_IMAGE},
                         drop_without_root_read()).start()
    try:
        corpus = _corpus(pydicom_files)
        for i, path in enumerate(corpus):
            dest = proc.inbox / "corpus" / f"{i:03d}_{path.name}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
        bad = _bad_inputs(tmp_path / "bad")
        for path in bad.values():
            shutil.copyfile(path, proc.inbox / path.name)
        locked = proc.inbox / "locked.dcm"
        make_image(locked, seed=3)
        os.chmod(locked, 0)
        # A file that vanishes before it is read: written slowly, then deleted by its sender.
        ghost = proc.inbox / "ghost.dcm"
        ghost.write_bytes(b"DICM")
        time.sleep(0.1)
        ghost.unlink()
        expected = len(corpus) + len(bad) + 1
        status = proc.wait_for(_settled(expected), timeout=120, what="inbox to drain")
        files = status["files"]
        assert files["total"] == expected, status
        assert sum(files[state] for state in FINAL) == expected
        assert files["archived"] > 50 and files["unsupported"] > 30 and files["quarantined"] > 10
        assert files["out_of_scope"] == 0  # every image decoded
        assert list(proc.inbox.rglob("*.*")) == [], "nothing may stay in the inbox"

        sidecars = {json.loads(p.read_text())["inbox_path"]: json.loads(p.read_text())
                    for p in (proc.home / "quarantine").glob("*.json")}
        assert len(sidecars) == files["quarantined"]
        assert sidecars["empty.dcm"]["reason_code"] == "empty_file"
        assert sidecars["notes.dcm"]["reason_code"] == "not_dicom"
        assert sidecars["truncated.dcm"]["reason_code"] in ("truncated", "invalid_header")
        assert sidecars["huge_length.dcm"]["reason_code"] == "truncated"
        assert "declares 4294967280 bytes" in sidecars["huge_length.dcm"]["reason"]
        assert sidecars["locked.dcm"]["reason_code"] == "unreadable"
        assert "cannot read" in sidecars["locked.dcm"]["reason"]
        truncated_mr = next(v for k, v in sidecars.items() if k.endswith("MR_truncated.dcm"))
        assert truncated_mr["reason_code"] == "truncated"
        for sidecar in sidecars.values():
            assert sidecar["reason"], sidecar
            dcm = proc.home / "quarantine" / f"{sidecar['file_id']}-{sidecar['reason_code']}.dcm"
            assert dcm.exists()
        # Same SOP Instance UID with other content: quarantined as a conflict, original kept.
        assert any(s["reason_code"] == "conflict" for s in sidecars.values())

        health = httpx.get(f"{proc.url}/healthz", timeout=5)
        assert health.status_code == 200 and health.json()["ok"]
        metrics = httpx.get(f"{proc.url}/metrics", timeout=5).text
        assert f'triage_ingest_files_total{{outcome="archived"}} {float(files["archived"])}' in (
            metrics
        )
        assert 'triage_ingest_quarantined_total{reason="unreadable"} 1.0' in metrics
        for secret in PHI_STRINGS:
            assert secret not in metrics
            assert secret not in proc.log.read_text()
            assert secret not in (proc.home / "logs" / "triage.log").read_text()
            for sidecar in sidecars.values():
                assert secret not in json.dumps(sidecar)
    finally:
        proc.stop(signal.SIGKILL)


def test_a_file_written_slowly_in_chunks_is_not_read_half_written(daemon: DaemonProcess) -> None:
    data = make_image(daemon.home / "slow_source.dcm", seed=11, size=128).read_bytes()
    target = daemon.inbox / "slow.dcm"
    with open(target, "wb") as out:
        for start in range(0, len(data), 4096):
            out.write(data[start : start + 4096])
            out.flush()
            time.sleep(0.04)  # ~0.3 s per 32 kB: far slower than the settle poll
    status = daemon.wait_for(_settled(1), timeout=30, what="slow file ingested")
    assert status["files"]["archived"] == 1 and status["files"]["quarantined"] == 0


def test_sigkill_mid_burst_then_restart_accounts_for_every_file_once(tmp_path: Path) -> None:
    home = tmp_path / "home"
    proc = DaemonProcess(home, FAST_ENV, []).start()
    sources = [make_image(tmp_path / "src" / f"{i}.dcm", seed=i, size=256,
                          study_uid=f"2.25.{1000 + i // 10}") for i in range(120)]
    stop_writing = threading.Event()

    def burst() -> None:
        for i, src in enumerate(sources):
            shutil.copyfile(src, proc.inbox / f"b{i:03d}.dcm")
            # every tenth file is a byte-identical resend: must end as a duplicate
            if i % 10 == 0:
                shutil.copyfile(src, proc.inbox / f"b{i:03d}_resend.dcm")
            time.sleep(0.005)
        stop_writing.set()

    writer = threading.Thread(target=burst)
    writer.start()
    time.sleep(0.6)
    assert proc.stop(signal.SIGKILL) == -signal.SIGKILL
    writer.join()
    expected = len(sources) + len(sources) // 10
    proc = DaemonProcess(home, FAST_ENV, []).start()
    try:
        status = proc.wait_for(_settled(expected), timeout=120, what="restart to drain")
        files = status["files"]
        assert files["total"] == expected
        assert files["archived"] == len(sources)
        assert files["duplicate"] == len(sources) // 10
        assert files["quarantined"] == 0 and files["vanished"] == 0
        archived = [p for p in (home / "archive").rglob("*.dcm")]
        assert len(archived) == len(sources)
        assert not list(proc.inbox.rglob("*.dcm"))
    finally:
        proc.stop(signal.SIGKILL)


def test_a_second_daemon_on_the_same_home_refuses_to_start(daemon: DaemonProcess) -> None:
    second = DaemonProcess(daemon.home, FAST_ENV, [])
    try:
        second.start()
    except RuntimeError as exc:
        assert "already running" in str(exc)
        assert "Traceback" not in second.log.read_text().split("already running")[-1]
    else:
        raise AssertionError("second daemon started on the same state directory")


def test_sigterm_runs_the_orderly_stop(tmp_path: Path) -> None:
    """`kill <pid>` (SIGTERM) ends `serve` with status 0 after the daemon's own stop ran:
    uvicorn re-raises the signal after its shutdown, which must not kill the process
    before the receiver and the loops are stopped."""
    proc = DaemonProcess(tmp_path / "home", FAST_ENV, []).start()
    assert proc.stop(signal.SIGTERM) == 0
    events = [json.loads(line)["event"] for line in
              (proc.home / "logs" / "triage.log").read_text().splitlines()]
    assert "stop_signal" in events
    assert events[-1] == "daemon_stopped"
