"""Scenarios that damage what the daemon stands on: a corrupt serving model, an
unreadable archive file, a full disk, a locked database, a wall clock that jumps."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from faults_support import (
    Batch,
    all_expected,
    log_problems,
    scalar,
    single_studies,
    store_of,
    wait_until,
    wave_one,
    wave_two,
)

from faultbench.common import CLASSES, LEASE_SECONDS, LOCK_SECONDS, read_rows, write_sql
from faultbench.rig import Reviewer, Rig, drop_and_decide, import_model, is_labeled, routed_pending


def _damage_checkpoint(path: Path, rng: random.Random) -> str:
    data = path.read_bytes()
    how = rng.choice(("flip", "truncate", "delete", "empty"))
    if how == "flip":
        buf = bytearray(data)
        for _ in range(rng.randint(1, 64)):
            buf[rng.randrange(len(buf))] ^= 0xFF
        path.write_bytes(bytes(buf))
    elif how == "truncate":
        path.write_bytes(data[: rng.randrange(len(data))])
    elif how == "delete":
        path.unlink()
    else:
        path.write_bytes(b"")
    return how


def corrupt_serving_model(rig: Rig, trials: int) -> None:
    """The serving checkpoint (and sometimes every promoted one) is damaged: flipped
    bytes, truncated, deleted or emptied, while the daemon runs or between runs. Studies
    must be scored by the last version that loads (degraded serving), or wait when none
    does, never fall back to cold start; once the file is restored and the daemon
    restarted, waiting studies are scored."""
    rig.mechanism.add("checkpoint file damaged on disk (flip bytes / truncate / delete / "
                      "empty), then SIGKILL and restart")
    rig.start()
    import_model(rig, 1)
    import_model(rig, 2)
    for t in range(trials):
        rng = rig.rng(t)
        since = rig.snapshot()
        promoted = read_rows(rig.home, "SELECT version, path, status FROM models WHERE "
                                       "promoted_at IS NOT NULL ORDER BY status = 'serving' DESC")
        victims = promoted if rng.random() < 0.3 else promoted[:1]
        saved = {Path(p): Path(p).read_bytes() for _, p, _ in victims}
        hows = [_damage_checkpoint(Path(p), rng) for _, p, _ in victims]
        if rng.random() < 0.5:  # while running: seen at the next load (a restart)
            time.sleep(rng.uniform(0, 1.0))
        rig.restart()
        drop_and_decide(rig, 30_000 + 100 * t, 10, f"t{t}/")
        rig.settle(waiting_ok=True)
        _serving_visible(rig, expect_ok=False)
        state = read_rows(rig.home, "SELECT served_version FROM serving_state WHERE id = 1")
        served = state[0][0] if state else None
        waited = scalar(rig.home, "SELECT COUNT(*) FROM studies WHERE state = 'waiting_model'")
        rig.points[f"{'every promoted' if len(victims) > 1 else 'serving'} checkpoint "
                   f"{hows[0]}: " + (f"served {served}" if served else
                                     f"none loads, {waited} studies waited")] += 1
        rig.check_final(waiting_ok=True)
        rig.measure_flood(since)
        for path, data in saved.items():  # the operator restores the files
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        rig.kill()
        time.sleep(rng.uniform(0, 0.5))
        rig.start()
        rig.settle()
        _serving_visible(rig, expect_ok=True)
        rig.check_final()
        rig.measure_flood(since)
    rig.stop()


def _serving_visible(rig: Rig, *, expect_ok: bool) -> None:
    """Degraded serving is loud: the status row and the gauge say so."""
    rows = read_rows(rig.home, "SELECT ok, reason FROM serving_state WHERE id = 1")
    ok = bool(rows[0][0]) if rows else None
    try:
        text = httpx.get(rig.url + "/metrics", timeout=10).text
        gauge = next((line.split()[-1] for line in text.splitlines()
                      if line.startswith("triage_serving_model_ok ")), None)
    except httpx.HTTPError:
        gauge = None
    if expect_ok and ok is False:
        rig.note("stuck", f"serving not restored after the file came back: {rows}")
    if not expect_ok and (ok is not False or gauge != "0.0" or not rows[0][1]):
        rig.note("other", f"damaged serving model not reported: row {rows}, gauge {gauge}")


def unreadable_archive_file(rig: Rig, trials: int) -> None:
    """An archived file is made unreadable (chmod 000, the daemon without root's read
    override), deleted or truncated, or a study's stored pixels are damaged in the
    database, after ingest and before the study is scored. The scorer reads the stored
    pixels, not the archive: a damaged archive file must not stop scoring and the image
    endpoint names the cause; damaged pixels end the study `error` with a reason, retried
    after the backoff (scored once restored, else left for an operator)."""
    from conftest import drop_without_root_read

    rig.prefix = drop_without_root_read()
    rig.mechanism.add("archive file chmod 000 (daemon run with setpriv -dac_override,"
                      "-dac_read_search)" if rig.prefix else
                      "archive file chmod 000 (not root: plain permissions)")
    rig.mechanism.add("archive file deleted or truncated; stored pixel blob truncated in "
                      "the database")
    rig.env["TRIAGE__STUDIES__STABLE_AGE_SECONDS"] = "3"
    rig.start()
    reader = Reviewer(rig.home, "viewer")
    for t in range(trials):
        rng = rig.rng(t)
        since = rig.snapshot()
        seed = 1000 * rig.seed + t
        wave_one(rig.inbox, rig.scratch, seed, rig.batch, prefix=f"t{t}/")
        uids = [f"2.25.{1000 * (seed + 1) + s}" for s in range(3)]
        marks = ", ".join("?" * len(uids))

        def archived(uids: list[str] = uids, marks: str = marks) -> list[tuple]:
            return read_rows(rig.home, "SELECT instances.id, instances.study_id, instances.path "
                                       "FROM instances JOIN studies ON studies.id = study_id "
                                       f"WHERE study_uid IN ({marks}) AND studies.state = 'open'",
                             uids)

        wait_until(lambda: len(archived()) >= 3, 20, 0.01)
        time.sleep(rng.uniform(0, 0.8))
        candidates = archived()
        if not candidates:
            rig.note("other", f"trial {t}: studies completed before the fault")
            continue
        instance_id, study_id, path = rng.choice(candidates)
        how = rng.choice(("chmod000", "delete", "truncate", "blob"))
        saved_blob, restored = None, False
        target = rig.home / path
        if how == "chmod000":
            target.chmod(0)
        elif how == "delete":
            target.unlink()
        elif how == "truncate":
            target.write_bytes(target.read_bytes()[:200])
        else:
            saved_blob = read_rows(rig.home, "SELECT data FROM images WHERE instance_id = ?",
                                   [instance_id])[0][0]
            write_sql(rig.home, "UPDATE images SET data = substr(data, 1, 10) WHERE "
                                "instance_id = ?", [instance_id])
        if how != "blob":
            rig.damaged.add(path)
        crashed = rng.random() < 0.6
        if crashed:  # a crash on top, while the study waits or is retried
            time.sleep(rng.uniform(0, 3.0))
            rig.restart()
        wave_two(rig.inbox, rig.scratch, seed, rig.batch, prefix=f"t{t}/")
        if how == "blob":
            wait_until(lambda sid=study_id: scalar(
                rig.home, "SELECT COUNT(*) FROM studies WHERE id = ? AND state = 'error'",
                [sid]) > 0, 20, 0.05)
            restored = rng.random() < 0.6
            if restored:  # restored from a backup: the next retry scores it
                write_sql(rig.home, "UPDATE images SET data = ? WHERE instance_id = ?",
                          [saved_blob, instance_id])
        rig.settle()
        rig.check_final()
        answer = _image_answer(rig, reader, study_id, instance_id) if how != "blob" else None
        state, errors = read_rows(rig.home, "SELECT state, error_count FROM studies WHERE id = ?",
                                  [study_id])[0]
        rig.points[f"{how}{' + SIGKILL' if crashed else ''}"
                   f"{(', restored' if restored else ', not restored') if how == 'blob' else ''}"
                   f": study {state} after {errors} errors"
                   f"{f', image answered {answer}' if answer else ''}"] += 1
        rig.measure_flood(since)
    rig.stop()
    for path in rig.damaged:
        if (rig.home / path).exists():
            (rig.home / path).chmod(0o644)


def _image_answer(rig: Rig, reader: Reviewer, study_id: int, instance_id: int) -> int | None:
    """The image endpoint names a damaged archive file instead of failing bare; the
    status it answered."""
    try:
        response = httpx.get(f"{rig.url}/api/studies/{study_id}/images/{instance_id}/0.png",
                             headers=reader.headers, timeout=30)
    except httpx.HTTPError as exc:
        rig.note("other", f"image of study {study_id}: no answer ({type(exc).__name__})")
        return None
    if response.status_code != 200 and (
            response.status_code != 500 or "cannot be read" not in response.text):
        rig.note("other", f"image of study {study_id}: {response.status_code} "
                          f"{response.text[:120]}")
    return response.status_code


def _mount_tmpfs(path: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True)
    return done.returncode == 0


def _fill(home: Path, keep: int) -> Path:
    """Leave ``keep`` bytes free on the file system of ``home``."""
    filler = home / ".filler"
    stat = os.statvfs(home)
    free = stat.f_bavail * stat.f_frsize
    with open(filler, "ab") as out:
        size = max(0, free - keep)
        chunk = b"\0" * (1 << 20)
        while size > 0:
            try:
                size -= out.write(chunk[: min(size, len(chunk))])
            except OSError:
                break
    return filler


WAVE_FILES = {"wave_one": 13, "wave_two": 4}


def _try_drop(rig: Rig, wave: Callable, seed: int, prefix: str) -> int:
    """Drop a wave; a file the sender cannot write (ENOSPC) was never delivered, nor the
    ones after it. Returns how many files were not delivered."""
    trial = Batch()
    try:
        wave(rig.inbox, rig.scratch, seed, trial, prefix=prefix)
    except OSError:
        for part in rig.inbox.rglob("*.part"):
            part.unlink()
    # a wave records each file after its delivery (the rename) succeeded
    rig.batch.expect.update(trial.expect)
    rig.batch.bad_codes.update(trial.bad_codes)
    rig.batch.copies += trial.copies
    rig.batch.studies |= trial.studies
    for uid, rels in trial.study_files.items():
        rig.batch.study_files.setdefault(uid, []).extend(rels)
    return WAVE_FILES[wave.__name__] - len(all_expected(trial))


def disk_full(rig: Rig, trials: int) -> None:
    """The state directory fills up while files arrive: a real ENOSPC on a small tmpfs
    mounted as the home (root), or, seeded per trial, the ingest back-pressure floor
    (``ingest.min_free_bytes``) reached on it. Space comes back after a few seconds,
    sometimes after a SIGKILL while full."""
    mounted = _mount_tmpfs(rig.home, "48m")
    rig.stderr = rig.workdir / "stderr.log"
    try:
        if mounted:
            rig.mechanism.add("real ENOSPC: home on a 48 MiB tmpfs filled to 0-64 KiB free "
                              "(ingest.min_free_bytes 0)")
            rig.mechanism.add("back-pressure: the same tmpfs filled below "
                              "ingest.min_free_bytes = 4 MiB")
        else:
            rig.mechanism.add("no tmpfs (not root or mount refused): back-pressure only, "
                              "ingest.min_free_bytes set above the free space")
        rig.env["TRIAGE__INGEST__MIN_FREE_BYTES"] = "0"
        rig.start()
        for t in range(trials):
            rng = rig.rng(t)
            since = rig.snapshot()
            seed = 1000 * rig.seed + t
            mode = rng.choice(("enospc", "enospc", "backpressure")) if mounted \
                else "backpressure"
            log_mark = rig.stderr.stat().st_size if rig.stderr.exists() else 0
            env = {}
            if mode == "backpressure":
                env["TRIAGE__INGEST__MIN_FREE_BYTES"] = str(
                    4 << 20 if mounted else 1 << 62)
                rig.restart(env)
            undelivered = _try_drop(rig, wave_one, seed, f"t{t}/")
            time.sleep(rng.uniform(0, 1.5))
            filler = _fill(rig.home, rng.randint(0, 64 << 10) if mode == "enospc"
                           else 2 << 20) if mounted else None
            undelivered += _try_drop(rig, wave_two, seed, f"t{t}/")
            time.sleep(rng.uniform(0.5, 2.5))
            if rng.random() < 0.4:  # a crash while full; the restart happens when space is back
                rig.kill()
            if filler is not None:
                filler.unlink()
            crashed = not (rig.proc and rig.proc.alive)
            if crashed or mode == "backpressure":
                rig.restart({})
            rig.settle()
            with open(rig.stderr, "rb") as log:
                log.seek(log_mark)
                text = log.read().decode(errors="replace")
            errors = text.count('"level": "error"')
            rig.points[f"{mode}: {errors} daemon errors, sender could not write {undelivered} "
                       f"files{', paused' if 'ingest_paused_disk_low' in text else ''}"
                       f"{', SIGKILL while full' if crashed else ''}"] += 1
            rig.check_final()
            rig.measure_flood(since)
        rig.stop()
        # the log file handler cannot write on a full disk: Python's logging prints that
        # to stderr ("--- Logging error ---" and its traceback); anything else counts
        rig.record([p for p in log_problems(rig.home, rig.stderr)
                    if not ("Logging error" in p.detail and "Errno 28" in p.detail)])
    finally:
        if rig.proc is not None and rig.proc.alive:
            rig.proc.kill()
        if mounted:
            snapshot = rig.workdir / "home-copy"
            shutil.copytree(rig.home, snapshot, symlinks=True)
            subprocess.run(["umount", str(rig.home)], capture_output=True)


_LOCKER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], timeout=60, isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("ROLLBACK")
"""
# On PostgreSQL the store's write lock is one advisory lock (triage/store/postgres.py):
# another session holds it inside a transaction, as BEGIN IMMEDIATE holds SQLite's.
_PG_LOCKER = """
import sys, time, psycopg
from triage.store.postgres import WRITE_LOCK
with psycopg.connect(sys.argv[1]) as conn:
    conn.execute("SELECT pg_advisory_xact_lock(%s)", [WRITE_LOCK])
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
    conn.rollback()
"""


def sqlite_busy(rig: Rig, trials: int) -> None:
    """Another process holds the write lock (BEGIN IMMEDIATE) on triage.db for 10 s
    while files arrive and reviewers label; sometimes the daemon is SIGKILLed while it
    waits and restarted under the lock."""
    target = store_of(rig.home)
    on_postgres = isinstance(target, str)
    how = ("the advisory lock, in a PostgreSQL transaction" if on_postgres
           else "BEGIN IMMEDIATE on triage.db")
    rig.mechanism.add(f"a separate process holds the store's write lock ({how}) for "
                      f"{LOCK_SECONDS:g} s, starting at a seeded moment")
    rig.label_rate = 0.5
    rig.env["TRIAGE__GATE__LABEL_RATE"] = "0.5"
    rig.start()
    readers = [Reviewer(rig.home, "reader-a"), Reviewer(rig.home, "reader-b")]
    for t in range(trials):
        rng = rig.rng(t)
        since = rig.snapshot()
        drop_and_decide(rig, 50_000 + 100 * t, 6, f"t{t}/pre/")
        claims = [(r, r.claim_next(rig.url)) for r in readers]
        locker = subprocess.Popen([sys.executable, "-c",
                                   _PG_LOCKER if on_postgres else _LOCKER, str(target),
                                   str(LOCK_SECONDS)], stdout=subprocess.PIPE, text=True)
        assert locker.stdout is not None
        locker.stdout.readline()
        time.sleep(rng.uniform(0, 2.0))
        seed = 1000 * rig.seed + t
        wave_one(rig.inbox, rig.scratch, seed, rig.batch, prefix=f"t{t}/")
        answers: dict[int, list] = {}
        url = rig.url
        senders = []
        for reader, study in claims:
            if study is None:
                continue
            value = rng.choice(CLASSES)
            answers[study] = [value]
            senders.append(threading.Thread(
                target=lambda r=reader, s=study, v=value, a=answers, u=url: a[s].append(
                    r.label(u, s, v))))
        for sender in senders:
            sender.start()
        point = rng.choice(("no kill", "SIGKILL and restart under the lock"))
        if point != "no kill":
            time.sleep(rng.uniform(0, LOCK_SECONDS - 3))
            rig.kill()
            rig.new_proc().spawn()  # starts while the lock is still held
        for sender in senders:
            sender.join(60)
        locker.wait(60)
        for study, (value, *code) in answers.items():
            if code and code[0] == 201:
                rig.acked[study] = value
        codes = sorted(str(code[0]) if code else "-" for _, *code in answers.values())
        rig.points[f"{point}: labels sent under the lock answered {', '.join(codes)}"] += 1
        if point != "no kill":
            if not wait_until(lambda: _healthy(rig), 60, 0.2):
                rig.note("stuck", f"trial {t}: daemon not healthy after the lock")
        wave_two(rig.inbox, rig.scratch, seed, rig.batch, prefix=f"t{t}/")
        for reader, study in claims:  # whatever was not stored is labelled now
            if study is not None and study not in rig.acked:
                value = answers[study][0]
                code = reader.label(rig.url, study, value)
                if code == 409 and reader.claim(rig.url, study) == 200:
                    code = reader.label(rig.url, study, value)
                if code == 201:
                    rig.acked[study] = value
                elif not is_labeled(rig, study):
                    rig.note("stuck", f"study {study}: cannot be labelled after the lock "
                                      f"({code})")
        rig.settle()
        rig.check_final()
        rig.measure_flood(since)
    rig.stop()


def _healthy(rig: Rig) -> bool:
    try:
        return httpx.get(rig.url + "/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


_SHIM = '''"""Fault bench clock shim: time.time() of this process is shifted by the number of
seconds in $FAULTS_CLOCK_OFFSET_FILE (re-read every 50 ms). Monotonic time is not."""
import os
import time

_path = os.environ.get("FAULTS_CLOCK_OFFSET_FILE")
if _path:
    _real = time.time
    _state = [0.0, -1.0]

    def _offset():
        now = time.monotonic()
        if now - _state[1] > 0.05:
            _state[1] = now
            try:
                with open(_path) as handle:
                    _state[0] = float(handle.read().strip() or 0.0)
            except (OSError, ValueError):
                pass
        return _state[0]

    def _shifted_time():
        return _real() + _offset()

    time.time = _shifted_time
'''


def clock_jump(rig: Rig, trials: int) -> None:
    """The daemon's wall clock jumps (even trials back, odd trials forward, by a seeded
    30 s - 2 h) while studies are open, one reviewer holds a claim and another has
    walked away from theirs; then a SIGKILL and a restart on the jumped clock. Leases
    and the stable-age rule must neither lose nor duplicate a label, nor hold a study
    or claim much longer than configured."""
    shim = rig.workdir / "clockshim"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "sitecustomize.py").write_text(_SHIM)
    offset_file = rig.workdir / "clock-offset"
    offset_file.write_text("0")
    rig.mechanism.add("time.time() of the daemon and its subprocesses shifted at a seeded "
                      "moment by a sitecustomize shim (PYTHONPATH), as an NTP step would; "
                      "monotonic time and file mtimes unchanged. No system clock change "
                      "(not permitted here), libfaketime (hangs/EINVAL with Python 3.11's "
                      "sleeps) not used")
    rig.env["PYTHONPATH"] = os.pathsep.join(
        [str(shim), *filter(None, [os.environ.get("PYTHONPATH")])])
    rig.env["FAULTS_CLOCK_OFFSET_FILE"] = str(offset_file)
    rig.label_rate = 0.5
    rig.env["TRIAGE__GATE__LABEL_RATE"] = "0.5"

    def offset() -> float:
        return float(offset_file.read_text())

    rig.clock_offset = offset
    rig.env["TRIAGE__STUDIES__STABLE_AGE_SECONDS"] = "3"  # still open when the clock jumps
    rig.start()
    readers = [Reviewer(rig.home, "reader-a"), Reviewer(rig.home, "reader-b")]
    for t in range(trials):
        rng = rig.rng(t)
        since = rig.snapshot()
        for attempt in range(3):
            drop_and_decide(rig, 60_000 + 100 * t + 10 * attempt, 6, f"t{t}/{attempt}/")
            if len(routed_pending(rig)) >= 2:
                break
        working = readers[0].claim_next(rig.url)
        abandoned = readers[1].claim_next(rig.url)  # this reviewer walks away
        opened = single_studies(rig.inbox, rig.scratch, 60_000 + 100 * t + 50, 2, rig.batch,
                                f"t{t}/open/")
        wait_until(lambda uids=opened: scalar(
            rig.home, "SELECT COUNT(*) FROM studies WHERE state = 'open' AND study_uid IN "
                      "(?, ?)", uids) == 2, 10, 0.02)
        time.sleep(rng.uniform(0, 1.0))
        direction = "back" if t % 2 == 0 else "forward"
        jump = rng.uniform(30, 7200) * (-1 if direction == "back" else 1)
        offset_file.write_text(str(offset() + jump))
        time.sleep(0.2)
        code = None
        if working is not None:
            value = rng.choice(CLASSES)
            code = readers[0].label(rig.url, working, value)
            if code == 409 and readers[0].claim(rig.url, working) == 200:
                code = readers[0].label(rig.url, working, value)
            if code == 201:
                rig.acked[working] = value
            else:
                rig.note("other", f"study {working}: label under the jump answered {code}")
        time.sleep(rng.uniform(0, 2.0))
        rig.restart()
        # a reviewer's page lists the queue, then the abandoned lease runs out (real time)
        httpx.get(rig.url + "/api/queue", headers=readers[1].headers, timeout=10)
        time.sleep(LEASE_SECONDS + 0.5)
        taken = "none abandoned"
        if abandoned is not None:
            taken = "abandoned claim still held"
            if readers[0].claim(rig.url, abandoned) == 200:
                value = rng.choice(CLASSES)
                if readers[0].label(rig.url, abandoned, value) == 201:
                    rig.acked[abandoned] = value
                    taken = "abandoned study taken over and labelled"
        rig.points[f"{direction}: label under the jump answered {code}; {taken}"] += 1
        rig.settle(timeout=8)  # stable age 2 s: all complete within a few seconds
        rig.check_final()
        rig.measure_flood(since)
    rig.stop()
