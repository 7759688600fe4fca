"""The running daemon: the ingest loop and the scoring loop, each on its own thread.

* ingest thread: finishes what a crash left in flight, then watches the inbox, ingests
  each complete file and each instance received over the network, and completes quiet
  studies, and at once those whose DICOM association ended;
* DICOM receiver (when ``dicom.port`` is set): pynetdicom's threads, one per
  association, make each instance durable (:class:`ReceivedStore`) before Success;
* scoring thread: hands completed studies to the scorer one at a time, and after each
  promoted retrain routes the core-set coverage queries;
* retrain thread: starts a training subprocess when enough labels arrived or enough
  time passed (one at a time), and reaps it;
* replica thread: writes this daemon's heartbeat to the store; on PostgreSQL a listener
  thread wakes the scoring loop when any replica completes a study (``NOTIFY``).

`replica.roles` (or ``triage serve --roles``) chooses the loops: ``receiver`` (the DICOM
node; STOW-RS in the API), ``ingest``, ``score``, ``review`` (the review API and web UI)
and ``retrain`` (the scheduler, while this replica holds the store's ``retrain`` lease).
Several daemons with their own homes may share one PostgreSQL store and the archive,
models and quarantine folders (`triage.store.replicas`).

Each thread has its own store connection. :meth:`Daemon.health` tells the HTTP server
whether the loops are alive and recent.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from monai.data import set_track_meta
from prometheus_client import CollectorRegistry, Info

from triage.config import Settings
from triage.errors import TriageError
from triage.gate.scorer import GateScorer
from triage.gate.worker import ScoringWorker
from triage.ingest.assembly import StudyAssembler
from triage.ingest.ingestor import Ingestor
from triage.ingest.received import ReceivedStore
from triage.ingest.watcher import InboxWatcher
from triage.ops.collectors import StoreCollector
from triage.ops.node import LOCK_FILE, NODE_FILE
from triage.ops.summary import OpsCollector
from triage.review.queue import recover_leases
from triage.store import db as store
from triage.store import replicas
from triage.telemetry.logs import event
from triage.telemetry.metrics import Metrics, build_metrics
from triage.training.collector import RetrainCollector
from triage.training.scheduler import RetrainScheduler

log = logging.getLogger("triage.daemon")

_IDLE_SECONDS = 0.2
_ERROR_BACKOFF_SECONDS = 5.0
_STALE_AFTER_SECONDS = 60.0
_COVERAGE_CHECK_SECONDS = 5.0
_RETRAIN_CHECK_SECONDS = 5.0
_SENDING_GAP_SECONDS = 0.25
_ENDED_BATCH = 8  # instances of an ended association read between completion checks
class AlreadyRunning(TriageError):
    """Another daemon holds the state directory."""


class Daemon:
    """Owns the threads; :meth:`start` and :meth:`stop` are called by the server."""

    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry | None = None,
        disk_free: Callable[[], int] | None = None,
    ) -> None:
        self.settings = settings
        self._disk_free = disk_free or (lambda: shutil.disk_usage(settings.home).free)
        self._paused = False
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics: Metrics = build_metrics(self.registry)
        self.registry.register(StoreCollector(self._open_readonly, settings.home,
                                              settings.replica.lease_seconds))
        self.registry.register(RetrainCollector(self._open_readonly, settings.model.labels))
        self.registry.register(OpsCollector(self._open_readonly, settings.model.labels))
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._heartbeats: dict[str, float] = {}
        self._lock_fd: int | None = None
        self._watcher: InboxWatcher | None = None
        self._scoring_wake = threading.Event()
        self._sent: queue.SimpleQueue[list[int]] = queue.SimpleQueue()
        self.received = ReceivedStore(settings, notify=self._on_received,
                                      disk_free=self._disk_free)
        self._receiver = None  # DicomReceiver, when dicom.port is set
        self.replica = settings.replica_name()
        self.roles = frozenset(settings.replica.roles)
        # which replica this scrape target is: join it on `instance` (the store-wide
        # gauges are the same from every replica: take one, not the sum)
        Info("triage_replica", "This daemon among the replicas sharing its store: name "
             "(replica.name) and roles.", registry=self.registry).info(
            {"replica": self.replica, "roles": ",".join(sorted(self.roles))})

    @property
    def database(self) -> Path | str:
        return self.settings.database()

    def _open_readonly(self):  # type: ignore[no-untyped-def]
        return store.connect(self.database, readonly=True)

    def start(self) -> None:
        """Lock the state directory, prepare the store and start both loops."""
        set_track_meta(False)  # plain tensors through MONAI transforms: no metadata cost
        # One intra-op thread (the setting is process-wide): ingest and scoring each use a
        # core. Per-image tensors are small, and two OpenMP threads contending with the
        # other loop made preprocessing 10x slower on a 2-core machine.
        torch.set_num_threads(1)
        for name in ("inbox", "archive", "quarantine", "models", "logs", "received"):
            self.settings.path(name).mkdir(parents=True, exist_ok=True)
        self._lock()
        db = store.connect(self.database)  # create and migrate before the threads
        try:
            renamed = replicas.adopt_name(db, self.settings.home, self.replica)
            replicas.register(db, self.replica, sorted(self.roles), time.time())
        finally:
            db.close()
        if renamed is not None:
            event(log, "replica_renamed", logging.WARNING, previous=renamed, name=self.replica)
        self._recover_retrain()
        self._recover_queue()
        if "receiver" in self.roles:
            self.received.adopt_orphans()
        self._stop.clear()
        loops = [("replica", self._replica_loop)]
        if "ingest" in self.roles:
            loops.append(("ingest", self._ingest_loop))
        if "score" in self.roles:
            loops.append(("scoring", self._scoring_loop))
            if store.is_postgres_url(self.database):
                loops.append(("listen", self._listen_loop))
        if "retrain" in self.roles:
            loops.append(("retrain", self._retrain_loop))
        for name, target in loops:
            self._heartbeats[name] = time.monotonic()
            thread = threading.Thread(target=target, name=f"triage-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        if self.settings.dicom.port is not None and "receiver" in self.roles:
            self._start_receiver()
        self._write_node_file()
        event(log, "daemon_started", home=str(self.settings.home), replica=self.replica,
              roles=sorted(self.roles))

    def _write_node_file(self) -> None:
        """Record what this process serves (atomically; removed again by :meth:`stop`)."""
        dicom = self.settings.dicom
        node = ({"ae_title": dicom.ae_title, "host": dicom.host, "port": self.dicom_port}
                if self._receiver is not None else None)
        path = self.settings.home / NODE_FILE
        partial = path.with_suffix(".json.partial")
        partial.write_text(json.dumps({"pid": os.getpid(), "started_at": time.time(),
                                       "dicom": node}))
        os.replace(partial, path)

    def _start_receiver(self) -> None:
        from triage.ingest.receiver import DicomReceiver  # pynetdicom only when used

        receiver = DicomReceiver(self.settings.dicom, self.received, self.association_ended,
                                 self.metrics)
        try:
            receiver.start()
        except Exception:
            self.stop()
            raise
        self._receiver = receiver

    @property
    def dicom_port(self) -> int | None:
        """The port the DICOM receiver listens on, None when it is off."""
        return self._receiver.port if self._receiver is not None else None

    def association_ended(self, file_ids: list[int]) -> None:
        """A sender released or aborted its association: the studies of the instances it
        stored are complete once those are read (:meth:`StudyAssembler.complete_sent`)."""
        if file_ids:
            self._sent.put(list(file_ids))
            self._wake_ingest()

    def _on_received(self) -> None:
        """An instance received over the network was journaled: wake the ingest loop,
        unless a DICOM sender is still sending. The loop would only find that it defers
        reading (:meth:`_sender_waiting`), and each wake is a turn of the loop and a query
        holding the GIL that the sender's association thread waits on (170 turns a
        second for a CT series); it wakes anyway when the association ends, every
        ``_IDLE_SECONDS`` and once reading is no longer deferred."""
        if not self._sending():
            self._wake_ingest()

    def _wake_ingest(self) -> None:
        if self._watcher is not None:
            self._watcher.wake()

    def stop(self) -> None:
        """Ask the loops to stop after the file or study in hand, and wait for them.

        A training subprocess that is running keeps going; the next start sees it.
        """
        if self._receiver is not None:
            self._receiver.stop()  # no new instance is acknowledged from here on
            self._receiver = None
        self._stop.set()
        self._scoring_wake.set()
        if self._watcher is not None:
            self._watcher.stop()
        for thread in self._threads:
            thread.join(timeout=30)
        self._threads.clear()
        self.received.close()
        try:
            db = store.connect(self.database)
            try:
                replicas.stopped(db, self.replica, time.time())
            finally:
                db.close()
        except store.DATABASE_ERRORS as exc:  # its heartbeat lapses instead
            event(log, "replica_stop_not_recorded", logging.WARNING,
                  error_type=type(exc).__name__)
        if self._lock_fd is not None:
            (self.settings.home / NODE_FILE).unlink(missing_ok=True)
            os.close(self._lock_fd)
            self._lock_fd = None
        event(log, "daemon_stopped")

    def health(self) -> dict[str, object]:
        """Liveness of each loop: ``ok`` is False if a loop died or stopped beating."""
        now = time.monotonic()
        loops = {
            thread.name.removeprefix("triage-"): {
                "alive": thread.is_alive(),
                "last_beat_seconds": round(now - self._heartbeats.get(
                    thread.name.removeprefix("triage-"), now), 1),
            }
            for thread in self._threads
            if thread.name != "triage-listen"  # a shortcut for the scorer, not a loop
        }
        ok = bool(loops) and all(
            item["alive"] and item["last_beat_seconds"] < _STALE_AFTER_SECONDS
            for item in loops.values()
        )
        return {"ok": ok, "loops": loops, "replica": self.replica, "roles": sorted(self.roles)}

    def _recover_retrain(self) -> None:
        """Start-up: runs left `running` by a dead worker are marked failed and their
        candidates rejected (events `retrain_process_died`, `retrain_candidate_orphaned`),
        before anything reads the registry. A worker still alive keeps its run."""
        try:
            RetrainScheduler(self.settings, self.database).check()
        except Exception as exc:  # noqa: BLE001 - the retrain loop tries again
            event(log, "retrain_recovery_error", logging.ERROR, error_type=type(exc).__name__)

    def _recover_queue(self) -> None:
        """Start-up: queue items left claimed under an expired lease are released
        (event `queue_leases_recovered`), so no study stays held by a dead session."""
        db = store.connect(self.database)
        try:
            recover_leases(db, time.time(), self.settings.review.lease_minutes * 60)
        finally:
            db.close()

    def _lock(self) -> None:
        path = self.settings.home / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise AlreadyRunning(
                f"another triage daemon is already running on {self.settings.home}"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def _beat(self, name: str) -> None:
        self._heartbeats[name] = time.monotonic()

    def _ingest_loop(self) -> None:
        db = store.connect(self.database)
        ingestor = Ingestor(self.settings, db, self.metrics)
        assembler = StudyAssembler(
            db, self.metrics, self.settings.studies.stable_age_seconds, time.time
        )
        watcher = InboxWatcher(self.settings.path("inbox"), self.settings.ingest)
        self._watcher = watcher
        ingestor.recover()
        watcher.start()
        next_assembly = 0.0
        sent: list[list[int]] = []  # ended associations whose studies are not yet complete
        while not self._stop.is_set():
            self._beat("ingest")
            try:
                completed = self._read_ended(ingestor, assembler, sent)
                while (not self._sender_waiting(db) and not self._association_ended()
                       and ingestor.ingest_received(until=self._association_ended)
                       and not self._stop.is_set()):
                    self._beat("ingest")
                completed = self._complete_ended(assembler, sent) or completed
                if self._disk_low():
                    self._stop.wait(_IDLE_SECONDS * 5)
                    continue
                for ready in watcher.poll():
                    if self._stop.is_set():
                        break
                    ingestor.ingest(ready)
                    watcher.forget(ready.path)
                    self._beat("ingest")
                self.metrics.inbox_pending.set(watcher.pending)
                if time.monotonic() >= next_assembly:
                    completed = bool(assembler.complete_due()) or completed
                    next_assembly = time.monotonic() + self.settings.studies.check_seconds
                if completed:
                    self._scoring_wake.set()
                    store.notify(db)  # and the scorers of other replicas
            except Exception as exc:  # noqa: BLE001 - keep ingesting; the journal recovers
                event(log, "ingest_loop_error", logging.ERROR, error_type=type(exc).__name__,
                      error=getattr(exc, "strerror", None) or "")
                self._stop.wait(_ERROR_BACKOFF_SECONDS)
                try:
                    ingestor.recover()
                except Exception as again:  # noqa: BLE001
                    event(log, "ingest_recovery_error", logging.ERROR,
                          error_type=type(again).__name__)
                continue
            if not self._association_ended():  # else read what it stored now
                watcher.wait(_IDLE_SECONDS)
        db.close()

    def _read_ended(self, ingestor: Ingestor, assembler: StudyAssembler,
                    sent: list[list[int]]) -> bool:
        """Read what ended associations stored, at once (even while another sender
        sends), the smallest association first and a few instances at a time, each
        association's studies completed as soon as its last instance is read: a
        modality's single image is decided while a 500-slice series that ended just
        before it is still being read; an association that ends meanwhile is taken up
        after the instance in hand. Returns whether a study was completed."""
        completed = False
        while not self._stop.is_set():
            while not self._sent.empty():
                sent.append(self._sent.get())
            for file_ids in sorted(sent, key=len):
                if ingestor.ingest_received(_ENDED_BATCH, among=file_ids,
                                            until=self._association_ended):
                    break
            else:
                break  # nothing of an ended association is left unread
            self._beat("ingest")
            done = assembler.complete_sent(file_ids)  # only this one's files changed
            if done is not None:
                sent.remove(file_ids)
                if done:
                    completed = True
                    self._scoring_wake.set()  # now, not after the rest is read
        return completed

    def _association_ended(self) -> bool:
        """An association ended that :meth:`_read_ended` has not seen: reading of other
        arrivals stops after the instance in hand, so that a modality's single image is
        not read after a batch of another sender's series."""
        return not self._sent.empty()

    @staticmethod
    def _complete_ended(assembler: StudyAssembler, sent: list[list[int]]) -> bool:
        """Complete the studies of ended associations whose instances are all read."""
        completed = False
        for file_ids in list(sent):
            done = assembler.complete_sent(file_ids)
            if done is not None:
                sent.remove(file_ids)
                completed = completed or bool(done)
        return completed

    def _sending(self) -> bool:
        """Reading is deferred (``dicom.defer_reading_seconds``) and a DICOM sender is
        sending: a C-STORE answered within the last _SENDING_GAP_SECONDS of an open
        association."""
        receiver = self._receiver
        return bool(self.settings.dicom.defer_reading_seconds and receiver is not None
                    and time.monotonic() - receiver.last_store_at <= _SENDING_GAP_SECONDS)

    def _sender_waiting(self, db) -> bool:  # type: ignore[no-untyped-def]
        """True while a DICOM sender is sending (:meth:`_sending`) and the oldest unread
        arrival is younger than ``dicom.defer_reading_seconds``: reading now would take CPU and the
        GIL from the association thread the sender waits on. Measured on 2 cores: 500 CT
        instances are received ~35 % faster, and decided ~2.5 s later (bench/network_ingest.py).
        Instances of associations that have ended are not deferred (the ingest loop reads
        them first), so a modality's study is not held back by another's long series.
        """
        if not self._sending():
            return False
        oldest = db.execute("SELECT MIN(received_at) FROM files WHERE state = 'received' "
                            "AND replica = ?", [self.replica]).fetchone()[0]
        return (oldest is not None
                and time.time() - oldest < self.settings.dicom.defer_reading_seconds)

    def _disk_low(self) -> bool:
        """Back-pressure: below ``ingest.min_free_bytes`` new files wait in the inbox.

        Resumes by itself once free space is 10 % above the floor (hysteresis, so the
        daemon does not flap around it). Nothing is deleted to make room.
        """
        floor = self.settings.ingest.min_free_bytes
        free = self._disk_free()
        if not self._paused and free < floor:
            self._paused = True
            event(log, "ingest_paused_disk_low", logging.WARNING, free_bytes=free,
                  min_free_bytes=floor)
        elif self._paused and free >= floor * 1.1:
            self._paused = False
            event(log, "ingest_resumed", free_bytes=free)
        self.metrics.ingest_paused.set(1 if self._paused else 0)
        return self._paused

    def _replica_loop(self) -> None:
        """This replica's heartbeat in the store, every `replica.heartbeat_seconds`."""
        db = store.connect(self.database)
        while not self._stop.is_set():
            self._beat("replica")
            try:
                replicas.heartbeat(db, self.replica, time.time())
            except Exception as exc:  # noqa: BLE001 - the next beat tries again
                event(log, "replica_heartbeat_error", logging.ERROR,
                      error_type=type(exc).__name__)
            self._stop.wait(self.settings.replica.heartbeat_seconds)
        db.close()

    def _listen_loop(self) -> None:
        """PostgreSQL: wake the scoring loop when any replica completes a study."""
        store.listen(self.database, store.STUDIES_CHANNEL, self._scoring_wake.set,
                     self._stop)

    def _scoring_loop(self) -> None:
        db = store.connect(self.database)
        scorer = GateScorer(self.settings, db, self.metrics, replica=self.replica)
        lease = self.settings.replica.lease_seconds
        worker = ScoringWorker(db, scorer, self.metrics,
                               error_retry_seconds=self.settings.studies.error_retry_seconds,
                               replica=self.replica, lease_seconds=lease)
        worker.requeue_interrupted()  # the first take-over, at start-up
        next_coverage = 0.0
        next_takeover = time.monotonic() + self.settings.replica.heartbeat_seconds
        while not self._stop.is_set():
            self._beat("scoring")
            try:
                if time.monotonic() >= next_takeover:  # what dead replicas held
                    worker.take_over_dead()
                    next_takeover = time.monotonic() + self.settings.replica.heartbeat_seconds
                if time.monotonic() >= next_coverage:
                    scorer.route_coverage()
                    next_coverage = time.monotonic() + _COVERAGE_CHECK_SECONDS
                if worker.run_once() is not None:
                    continue
            except Exception as exc:  # noqa: BLE001
                event(log, "scoring_loop_error", logging.ERROR, error_type=type(exc).__name__)
                self._stop.wait(_ERROR_BACKOFF_SECONDS)
                continue
            self._scoring_wake.wait(_IDLE_SECONDS * 2.5)  # set when studies complete
            self._scoring_wake.clear()
        db.close()

    def _retrain_loop(self) -> None:
        """Reap this replica's runs; start one when due, while this replica holds the
        store's `retrain` lease (renewed each check; taken by another replica once it
        lapses, `replica.lease_seconds` after this one's last check)."""
        scheduler = RetrainScheduler(self.settings, self.database)
        lease = self.settings.replica.lease_seconds
        period = min(_RETRAIN_CHECK_SECONDS, self.settings.replica.heartbeat_seconds)
        db = store.connect(self.database)
        holding = False
        while not self._stop.is_set():
            self._beat("retrain")
            try:
                scheduler.check()
                held = replicas.take_lease(db, "retrain", self.replica, time.time(), lease)
                if held != holding:
                    event(log, "retrain_lease_taken" if held else "retrain_lease_held_elsewhere",
                          holder=replicas.lease_holder(db, "retrain", time.time()))
                    holding = held
                trigger = scheduler.due() if held and self.settings.retrain.enabled else None
                if trigger is not None:
                    run_id = scheduler.start(trigger)
                    event(log, "retrain_started", run_id=run_id, trigger=trigger)
            except Exception as exc:  # noqa: BLE001 - the daemon keeps serving
                event(log, "retrain_loop_error", logging.ERROR, error_type=type(exc).__name__)
            self._stop.wait(period)
        try:
            if holding:
                replicas.release_lease(db, "retrain", self.replica)
        except Exception as exc:  # noqa: BLE001 - it lapses instead
            event(log, "retrain_lease_not_released", logging.WARNING,
                  error_type=type(exc).__name__)
        db.close()


