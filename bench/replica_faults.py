"""Replicas under faults: three daemons on one PostgreSQL database, and what breaks when
one of them dies, the database server restarts, or a replica is cut off from it.

    .venv/bin/python bench/replica_faults.py                       # 20 trials per scenario
    .venv/bin/python bench/replica_faults.py --trials 2 --out /tmp/replicas.json
    .venv/bin/python bench/replica_faults.py --scenarios partitioned_replica --trials 3

Three real ``triage serve`` processes, all roles, each with its own home, share one
database on a private PostgreSQL server (tests/pg_server.py: Debian's `postgresql`) and
one archive, models and quarantine folder. A promoted tiny network scores (MC dropout).
Each trial sends a wave of studies over DICOM C-STORE (pynetdicom), each study to a
seeded replica, as a load balancer would; an instance that was not answered Success is
sent again to another replica, as a modality retries. Reviewers label what is routed
through the HTTP API of whichever replica is up. Then the fault:

* ``kill_one_of_three``: SIGKILL of a seeded replica at a seeded stage: while it holds
  received instances not yet read (ingest), while it scores a study (scoring), while it
  answers a label (label). The others go on; what it was scoring is scored by another
  once its lease (`replica.lease_seconds`) lapses; it restarts and reads what it had
  acknowledged.
* ``database_restart``: the PostgreSQL server stops at once (``pg_ctl -m immediate``, as
  a crash) at a seeded moment of the wave and starts again.
* ``partitioned_replica``: one replica reaches the server through a TCP proxy that stops
  forwarding (a black hole, not a refusal) for longer than the lease and the server's
  idle-in-transaction timeout, at a seeded moment while it scores: its claims are taken
  over, and what it stores when the link returns is refused or dropped.

After each trial every replica is up and the bench waits for the store to settle, then
counts (per scenario, summed over trials):

* ``lost``: an acknowledged instance without its instance row or archive file, a sent
  study never assembled, a routed study without its queue item, an acknowledged label
  not stored;
* ``duplicated``: two instances of one SOP Instance UID, a study round decided twice,
  two current labels, two serving models;
* ``stuck``: after settling, a file in flight, a study open/complete/scoring/batched, a
  claim held by a replica that is not live;
* ``flooded``: per trial, queue items beyond ``label_rate x decisions`` plus a binomial
  slack (3 sigma + 2), as bench/faults.py counts it; and ``routed_share``, all routed
  decisions over all decisions of the scenario, against `gate.label_rate` (within
  +-20 % is the target);
* ``other``: the store's other invariants (tests/faults_support.py), a traceback or
  patient identifier in a replica's logs.

Writes ``bench/results/replica_faults.json`` (``--out``) and prints the same JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import math
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from faultbench import REPO  # noqa: E402 - puts the repository and tests/ on sys.path
from faultbench.common import BASE_ENV, LABEL_RATE  # noqa: E402
from conftest import free_port  # noqa: E402
from faults_support import (  # noqa: E402
    HarnessDaemon,
    Problem,
    _decision_problems,
    _label_problems,
    _registry_problems,
    image_bytes,
    log_problems,
)

import httpx  # noqa: E402
import pydicom  # noqa: E402
from pg_server import PostgresServer, missing_reason  # noqa: E402

from triage.store import db as store  # noqa: E402

SCENARIOS = ("kill_one_of_three", "database_restart", "partitioned_replica")
REPLICAS = 3
LEASE_SECONDS = 3.0
PARTITION_SECONDS = 13.0  # > the lease and the server's idle-in-transaction timeout (10 s)
SETTLE_SECONDS = 90.0
STUDIES_PER_TRIAL = 12
ENV = {
    **BASE_ENV,
    "TRIAGE__REPLICA__HEARTBEAT_SECONDS": "0.5",
    "TRIAGE__REPLICA__LEASE_SECONDS": str(LEASE_SECONDS),
    "TRIAGE__DICOM__HOST": "127.0.0.1",
    "TRIAGE__DICOM__DEFER_READING_SECONDS": "0",
    "TRIAGE__SCOPE__MODALITIES": "[DX]",
    "TRIAGE__MODEL__MC_SAMPLES": "20",  # scoring takes tens of ms: a fault can land in it
}
MECHANISM_EVENTS = ("replica_claims_taken_over", "scoring_claim_lost",
                    "scoring_interrupted_requeued", "gate_decision_settled",
                    "api_store_unavailable", "scoring_loop_error", "retrain_lease_taken")
DONE = ("scored", "unscoreable", "out_of_scope", "error")
DEFINITIONS = {
    "lost": "an acknowledged instance without its instance row or archive file; a sent "
            "study never assembled; a routed study without its queue item; an "
            "acknowledged label not stored",
    "duplicated": "two instances of one SOP Instance UID; a study round decided twice; "
                  "two current labels; two serving models",
    "stuck": "after settling: a file in flight; a study open, complete, scoring or "
             "batched; a claim held by a replica that is not live",
    "flooded": "per trial, queue items routed beyond label_rate x decisions + 3 sigma + 2",
    "other": "the store's other invariants; a traceback or patient identifier in a "
             "replica's logs",
}


# -- a TCP link that can be cut ------------------------------------------------------------


class Link:
    """A TCP proxy to the database server that can stop forwarding (a partition: bytes
    are neither delivered nor refused, as when a network path goes dark). It runs in a
    process of its own (this one is busy sending and reviewing): SIGUSR1 cuts the link,
    SIGUSR2 restores it."""

    def __init__(self, target_port: int) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--link", str(target_port)],
            stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None
        self.port = int(self._proc.stdout.readline())

    def cut(self) -> None:
        self._proc.send_signal(signal.SIGUSR1)

    def restore(self) -> None:
        self._proc.send_signal(signal.SIGUSR2)

    def close(self) -> None:
        self._proc.kill()
        self._proc.wait()


def serve_link(target_port: int) -> None:
    """The proxy process of :class:`Link`: prints its port, forwards until killed."""
    loop = asyncio.new_event_loop()
    is_open = asyncio.Event()
    is_open.set()
    loop.add_signal_handler(signal.SIGUSR1, is_open.clear)
    loop.add_signal_handler(signal.SIGUSR2, is_open.set)

    async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while True:
                await is_open.wait()
                data = await src.read(65536)
                if not data:
                    break
                await is_open.wait()  # cut meanwhile: held, not delivered
                dst.write(data)
                await dst.drain()
        except OSError:
            pass
        finally:
            dst.close()

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    async def main() -> None:
        server = await asyncio.start_server(client, "127.0.0.1", 0)
        print(server.sockets[0].getsockname()[1], flush=True)
        await server.serve_forever()

    loop.run_until_complete(main())


# -- the site: three replicas on one database -----------------------------------------------


class Replica:
    def __init__(self, site: Site, index: int, url: str) -> None:
        self.name = f"r{index}"
        self.home = site.workdir / self.name
        self.dicom_port = free_port()
        self.env = {**ENV, "TRIAGE__STORE__URL": url, "TRIAGE__REPLICA__NAME": self.name,
                    "TRIAGE__DICOM__PORT": str(self.dicom_port),
                    **{f"TRIAGE__PATHS__{p.upper()}": str(site.shared / p)
                       for p in ("archive", "models", "quarantine")}}
        self.proc: HarnessDaemon | None = None
        self.log = self.home / "stderr.log"

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        proc = HarnessDaemon(self.home, self.env, [])
        proc.log = self.log
        self.proc = proc.start()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive

    @property
    def url(self) -> str:
        assert self.proc is not None
        return self.proc.url

    def kill(self) -> None:
        if self.alive:
            assert self.proc is not None
            self.proc.kill()


class Site:
    def __init__(self, workdir: Path, server: PostgresServer, partition: bool) -> None:
        self.workdir, self.server = workdir, server
        self.shared = workdir / "shared"
        self.url = server.new_database()
        self.link = Link(server.port) if partition else None
        linked = (self.url.replace(f":{server.port}/", f":{self.link.port}/")
                  if self.link is not None else self.url)
        # the last replica reaches the server through the link that can be cut
        self.replicas = [Replica(self, i, linked if (self.link and i == REPLICAS - 1)
                                 else self.url) for i in range(REPLICAS)]
        self.acked: dict[str, str] = {}  # SOP Instance UID -> study UID, answered Success
        self.sent_studies: set[str] = set()
        self.labels: dict[int, str] = {}  # study id -> label acknowledged (201)
        self.tokens: list[str] = []
        self.problems: dict[tuple[str, str], None] = {}
        self.flooded = 0
        self.flood_details: list[str] = []
        self.points: Counter = Counter()

    def rows(self, sql: str, params: list | tuple = ()) -> list[tuple]:
        for _ in range(60):  # the server may be restarting
            try:
                db = store.connect(self.url, readonly=True)
                try:
                    return db.execute(sql, list(params)).fetchall()
                finally:
                    db.close()
            except store.DATABASE_ERRORS:
                time.sleep(0.5)
        raise RuntimeError("the database did not answer for 30 s")

    def scalar(self, sql: str, params: list | tuple = ()) -> int:
        return int(self.rows(sql, params)[0][0] or 0)

    def live(self) -> list[Replica]:
        return [r for r in self.replicas if r.alive]

    def record(self, problems: list[Problem]) -> None:
        for problem in problems:
            self.problems.setdefault((problem.kind, problem.detail), None)


def _setup(site: Site) -> None:
    """Start the replicas, promote a tiny random network, make reviewer tokens."""
    import torch

    from triage.config import load_settings
    from triage.model.checkpoint import save_checkpoint
    from triage.model.lossnet import build_loss_predictor
    from triage.model.network import build_network
    from triage.model.registry import ModelRegistry
    from triage.review.auth import create_token

    for replica in site.replicas:
        replica.start()
    settings = load_settings(REPO / "config.yaml", home=site.replicas[0].home,
                             environ={**os.environ, **site.replicas[0].env})
    torch.manual_seed(1)
    path = save_checkpoint(site.workdir / "import.pt", build_network(settings.model),
                           build_loss_predictor(settings.model), settings.model)
    db = store.connect(site.url)
    try:
        registry = ModelRegistry(db, settings.path("models"), settings.model)
        registry.promote(registry.add(path, source="import:bench").version, note="bench")
        for k in range(2):
            site.tokens.append(create_token(db, name=f"reader{k}", role="radiologist")[1])
    finally:
        db.close()


# -- traffic: a sender and reviewers ------------------------------------------------------


def _wave(site: Site, trial: int, rng: random.Random) -> list[tuple[str, list[bytes]]]:
    """This trial's studies: mostly single images, a few of two."""
    scratch = site.workdir / "scratch"
    studies = []
    for s in range(STUDIES_PER_TRIAL):
        study = f"2.25.{900000 + 100 * trial + s}"
        n = 2 if s % 6 == 5 else 1
        studies.append((study, [image_bytes(scratch, study, 100000 * (trial + 1) + 10 * s + i,
                                            i + 1) for i in range(n)]))
        site.sent_studies.add(study)
    rng.shuffle(studies)
    return studies


def _send(site: Site, studies: list[tuple[str, list[bytes]]], rng: random.Random,
          stop: threading.Event, favour: Replica | None = None) -> None:
    """Each study in its own association to a seeded replica (`favour` is drawn four
    times as often as each other); what was not answered Success goes to another
    replica, until all are (or `stop`)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    pending = list(studies)
    while pending and not stop.is_set():
        study, images = pending.pop(0)
        targets = site.live()
        if not targets:
            time.sleep(0.2)
            pending.append((study, images))
            continue
        replica = rng.choices(targets, [4 if r is favour else 1 for r in targets])[0]
        left = []
        try:
            assoc = ae.associate("127.0.0.1", replica.dicom_port, ae_title="TRIAGE")
        except Exception:  # noqa: BLE001 - a replica going down
            assoc = None
        if assoc is None or not assoc.is_established:
            left = images
        else:
            for data in images:
                ds = pydicom.dcmread(io.BytesIO(data))
                try:
                    status = assoc.send_c_store(ds)
                except Exception:  # noqa: BLE001
                    status = None
                if status is not None and getattr(status, "Status", None) == 0x0000:
                    site.acked[str(ds.SOPInstanceUID)] = study
                else:
                    left.append(data)
            try:
                assoc.release()
            except Exception:  # noqa: BLE001
                pass
        if left:
            pending.append((study, left))
            time.sleep(0.1)


def _review(site: Site, rng: random.Random, stop: threading.Event,
            on_label: threading.Event) -> None:
    """Claim and label what is routed, through whichever replica is up."""
    while not stop.is_set():
        targets = site.live()
        if not targets:
            time.sleep(0.1)
            continue
        replica = rng.choice(targets)
        headers = {"Authorization": f"Bearer {rng.choice(site.tokens)}"}
        try:
            claimed = httpx.post(f"{replica.url}/api/queue/next", headers=headers, timeout=20)
            if claimed.status_code != 200:
                time.sleep(0.2)
                continue
            study_id = int(claimed.json()["study_id"])
            value = rng.choice(("normal", "pneumonia"))
            on_label.set()  # the kill may land while this label is answered
            answer = httpx.post(f"{replica.url}/api/studies/{study_id}/label",
                                json={"label": value}, headers=headers, timeout=20)
            if answer.status_code == 201:
                site.labels[study_id] = value
        except (httpx.HTTPError, ValueError, KeyError):
            time.sleep(0.1)


# -- faults -------------------------------------------------------------------------------


def _wait_for(predicate, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return False


def _stage_reached(site: Site, replica: Replica, stage: str, on_label: threading.Event,
                   timeout: float = 15.0) -> bool:
    if stage == "ingest":
        return _wait_for(lambda: site.scalar(
            "SELECT COUNT(*) FROM files WHERE replica = ? AND state IN "
            "('received', 'reading', 'moving')", [replica.name]) > 0, timeout)
    if stage == "scoring":
        return _wait_for(lambda: site.scalar(
            "SELECT COUNT(*) FROM studies WHERE state = 'scoring' AND claimed_by = ?",
            [replica.name]) > 0, timeout)
    on_label.clear()
    return _wait_for(on_label.is_set, timeout)


def kill_one_of_three(site: Site, rng: random.Random, on_label: threading.Event) -> None:
    victim = rng.choice(site.replicas)
    stage = rng.choice(("ingest", "scoring", "label"))
    landed = _stage_reached(site, victim, stage, on_label)
    if stage == "label":
        time.sleep(rng.uniform(0, 0.02))
    victim.kill()
    site.points[f"{stage}{'' if landed else ' (timeout)'}"] += 1
    time.sleep(LEASE_SECONDS + 1.5)  # the others take over what it was scoring
    victim.start()


def database_restart(site: Site, rng: random.Random, on_label: threading.Event) -> None:
    time.sleep(rng.uniform(0.2, 3.0))
    site.server.restart()
    site.points["restarted"] += 1


def partitioned_replica(site: Site, rng: random.Random, on_label: threading.Event) -> None:
    assert site.link is not None
    victim = site.replicas[-1]
    landed = _stage_reached(site, victim, "scoring", on_label)
    time.sleep(rng.uniform(0, 0.05))
    site.link.cut()
    site.points[f"cut while scoring{'' if landed else ' (timeout)'}"] += 1
    try:
        time.sleep(PARTITION_SECONDS)
        taken = site.scalar("SELECT COUNT(*) FROM replicas WHERE name = ? AND heartbeat_at < ?",
                            [victim.name, time.time() - LEASE_SECONDS])
        site.points["taken for dead while cut" if taken else "not taken for dead"] += 1
    finally:
        site.link.restore()


FAULTS = {"kill_one_of_three": kill_one_of_three, "database_restart": database_restart,
          "partitioned_replica": partitioned_replica}


# -- checks -------------------------------------------------------------------------------


def _settled(site: Site) -> bool:
    marks = ", ".join(f"'{s}'" for s in DONE)
    uids = sorted({*site.acked.values()})
    if site.scalar("SELECT COUNT(*) FROM files WHERE state IN "
                   "('received', 'reading', 'moving')"):
        return False
    if site.scalar(f"SELECT COUNT(*) FROM studies WHERE state NOT IN ({marks})"):
        return False
    have = {u for (u,) in site.rows("SELECT study_uid FROM studies")}
    return set(uids) <= have


def _check(site: Site) -> None:
    out: list[Problem] = []
    db = store.connect(site.url, readonly=True)
    try:
        instances = {}
        for uid, path, n in db.execute("SELECT sop_uid, MIN(path), COUNT(*) FROM instances "
                                       "GROUP BY sop_uid").fetchall():
            instances[uid] = path
            if n > 1:
                out.append(Problem("duplicated", f"SOP instance {uid} stored {n} times"))
        for uid in sorted(site.acked):
            path = instances.get(uid)
            if path is None:
                out.append(Problem("lost", f"acknowledged instance {uid} has no instance row"))
            elif not Path(path).is_file():
                out.append(Problem("lost", f"instance {uid}: archive file missing"))
        for state, stored, sha in db.execute(
                "SELECT state, stored_path, sha256 FROM files WHERE state = 'archived'"):
            try:
                data = Path(stored).read_bytes()
            except OSError:
                out.append(Problem("lost", f"archived file {stored} unreadable"))
                continue
            if hashlib.sha256(data).hexdigest() != sha:
                out.append(Problem("lost", f"archived file {stored} differs"))
        have = {u for (u,) in db.execute("SELECT study_uid FROM studies").fetchall()}
        for uid in sorted({*site.acked.values()} - have):
            out.append(Problem("lost", f"study {uid} never assembled"))
        for state, n in db.execute("SELECT state, COUNT(*) FROM files WHERE state IN "
                                   "('received', 'reading', 'moving') GROUP BY state"):
            out.append(Problem("stuck", f"{n} files left {state}"))
        for study_id, state in db.execute("SELECT id, state FROM studies WHERE state NOT IN "
                                          f"({', '.join(repr(s) for s in DONE)})"):
            out.append(Problem("stuck", f"study {study_id} left {state}"))
        for study_id, round_ in db.execute("SELECT id, round FROM studies WHERE state = "
                                           "'scored'").fetchall():
            rounds = [r for (r,) in db.execute("SELECT round FROM decisions WHERE study_id = ?",
                                               [study_id]).fetchall()]
            if round_ not in rounds:
                out.append(Problem("lost", f"study {study_id} scored without a decision of "
                                           f"round {round_}"))
        out += _decision_problems(db)
        out += _label_problems(db)
        out += _registry_problems(db)
        for study_id, value in site.labels.items():
            row = db.execute("SELECT label FROM labels WHERE study_id = ? AND superseded_by "
                             "IS NULL", [study_id]).fetchone()
            if row is None:
                out.append(Problem("lost", f"acknowledged label of study {study_id} not stored"))
            elif row[0] != value:
                out.append(Problem("other", f"study {study_id}: stored {row[0]}, "
                                            f"acknowledged {value}"))
    finally:
        db.close()
    site.record(out)


def _measure_flood(site: Site, since: tuple[int, int]) -> None:
    decision_id, item_id = since
    n = site.scalar("SELECT COUNT(*) FROM decisions WHERE id > ?", [decision_id])
    routed = site.scalar("SELECT COUNT(*) FROM queue_items WHERE id > ? AND reason != "
                         "'coverage'", [item_id])
    allowed = LABEL_RATE * n + 3 * math.sqrt(n * LABEL_RATE * (1 - LABEL_RATE)) + 2
    excess = max(0, math.ceil(routed - allowed))
    if excess:
        site.flood_details.append(f"{routed} routed of {n} decided (allowed {allowed:.1f})")
    site.flooded += excess


# -- the runner ---------------------------------------------------------------------------


def run_scenario(name: str, trials: int, seed: int, server: PostgresServer,
                 workdir: Path) -> dict:
    site = Site(workdir, server, partition=name == "partitioned_replica")
    started = time.monotonic()
    _setup(site)
    for trial in range(trials):
        rng = random.Random(f"{seed}/{name}/{trial}")
        since = (site.scalar("SELECT COALESCE(MAX(id), 0) FROM decisions"),
                 site.scalar("SELECT COALESCE(MAX(id), 0) FROM queue_items"))
        stop, on_label = threading.Event(), threading.Event()
        # the partitioned replica receives more, so it is scoring its own when cut
        favour = site.replicas[-1] if site.link is not None else None
        sender = threading.Thread(target=_send, args=(site, _wave(site, trial, rng),
                                                      random.Random(rng.random()), stop,
                                                      favour))
        reviewer = threading.Thread(target=_review, args=(site, random.Random(rng.random()),
                                                          stop, on_label))
        sender.start()
        reviewer.start()
        try:
            FAULTS[name](site, rng, on_label)
            sender.join(timeout=120)
            if not _wait_for(lambda: _settled(site), SETTLE_SECONDS):
                site.points["settle timeout"] += 1
        finally:
            stop.set()
            sender.join(timeout=60)
            reviewer.join(timeout=60)
        for replica in site.replicas:  # every replica up for the next trial
            if not replica.alive:
                replica.start()
        _check(site)
        _measure_flood(site, since)
    decided = site.scalar("SELECT COUNT(*) FROM decisions")
    routed = site.scalar("SELECT COUNT(*) FROM decisions WHERE needs_label = 1")
    events: Counter = Counter()
    for replica in site.replicas:
        replica.kill()
        site.record(log_problems(replica.home, replica.log))
        for line in replica.log.read_text(errors="replace").splitlines():
            if line.startswith("{") and any(name in line for name in MECHANISM_EVENTS):
                try:
                    events[json.loads(line)["event"]] += 1
                except (ValueError, KeyError):
                    pass
    if site.link is not None:
        site.link.close()
    counts = Counter(kind for kind, _ in site.problems)
    share = routed / decided if decided else None
    by_replica = dict(site.rows("SELECT claimed_by, COUNT(*) FROM studies GROUP BY claimed_by"))
    return {
        "name": name, "trials": trials, "replicas": REPLICAS,
        "lost": counts["lost"], "duplicated": counts["duplicated"], "stuck": counts["stuck"],
        "flooded": site.flooded, "other": counts["other"],
        "instances_acknowledged": len(site.acked), "studies_decided": decided,
        "routed_share": None if share is None else round(share, 4),
        "label_rate": LABEL_RATE,
        "routed_share_within_20_percent": share is not None
        and abs(share - LABEL_RATE) <= 0.2 * LABEL_RATE,
        "labels_acknowledged": len(site.labels),
        "studies_scored_by_replica": {str(k): int(v) for k, v in sorted(by_replica.items(),
                                                                        key=str)},
        "fault_points": dict(sorted(site.points.items())),
        # how often each recovery path ran, from the replicas' logs
        "events": {name: events[name] for name in MECHANISM_EVENTS},
        "seconds": round(time.monotonic() - started, 1),
        "details": [f"{kind}: {detail}" for kind, detail in site.problems][:40]
        + [f"flooded: {d}" for d in site.flood_details],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/replica_faults.json")
    parser.add_argument("--keep", action="store_true",
                        help="keep the replicas' homes (their logs) in a temporary folder")
    parser.add_argument("--link", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.link is not None:  # the partition proxy's own process (Link)
        serve_link(args.link)
        return 0
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios {unknown}; choose from {', '.join(SCENARIOS)}")
    reason = missing_reason()
    if reason is not None:
        print(f"replica_faults: {reason}", file=sys.stderr)
        return 2
    server = PostgresServer().start()
    root = Path(tempfile.mkdtemp(prefix="triage-replica-faults-"))
    started = time.monotonic()
    results = []
    try:
        for name in names:
            results.append(run_scenario(name, args.trials, args.seed, server, root / name))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    finally:
        server.stop()
        if args.keep:
            print(f"replica_faults: homes kept in {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    report = {
        "command": "python bench/replica_faults.py " + " ".join(argv or sys.argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.monotonic() - started, 1), "seed": args.seed,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpus": os.cpu_count()},
        "definitions": DEFINITIONS, "scenarios": results,
        "zero": all(r[k] == 0 for r in results
                    for k in ("lost", "duplicated", "stuck", "flooded", "other")),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    sys.exit(main())
