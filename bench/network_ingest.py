"""Network ingest: DCMTK's storescu sends 512x512 CT to (a) triage's built-in receiver,
(b) DCMTK's storescp writing into triage's inbox folder, (c) Orthanc when installed.

Each target gets the same files, ``--runs`` times, in one association per run, on
127.0.0.1. Also measured: the receiver reading each instance as it arrives
(``dicom.defer_reading_seconds: 0``; by default reading waits while the sender sends),
the receiver with ``ingest.fsync: false`` (acknowledged before the bytes reach the disk,
as a server without fsync does), and pynetdicom answering Success without storing
anything (the library's ceiling). Reported per run:
instances/s as storescu sees it (start to exit), and for the triage targets the time
from storescu's exit to the study's decision row (the built-in receiver completes a
study when its association ends; the folder path waits ``studies.stable_age_seconds``
of quiet, 30 s by default). Orthanc makes no decision.

Then ``--latency-studies`` single-image DX studies (in the model's default scope) are sent
one storescu call each to the built-in receiver, at the default settings: the p50/p95
time from storescu's exit to the decision row is the issue's "≤ 1 s" figure. With
``--under-load`` (default) the same studies are sent again, one by one, while CT studies
of ``--n`` instances arrive back to back from another association (CT in scope too, so
the scorer has them to score): the decision latency of a modality's study while another
modality sends a large series. Twice: back to back (``latency_under_load``: the studies
meet one CT association while it is received) and ``--latency-gap`` seconds apart
(``latency_under_load_spread``: they spread over several CT associations and also meet
ended CTs being read and scored).

Before each timed send the page cache is written out (``os.sync``) and the bench waits a
second: otherwise a target's run pays for the writeback the previous target left (a
daemon's archive, storescp's unsynced files), which moves with the order of targets.

Nagle's algorithm: DCMTK turns it off when the environment has ``TCP_NODELAY=1``; the
built-in receiver always turns it off on its own sockets. Both storescu and the
DCMTK-based receivers (storescp, Orthanc) run with ``TCP_NODELAY`` set to
``--tcp-nodelay`` (default 1), and the output says so.

The CT studies are outside the default model scope (CR/DX chest), so for (a) and (b)
the daemon runs with ``scope.modalities: []`` and ``scope.body_parts: []``: the CT study
is scored, as a site that has a CT model would. Everything else is the shipped
config.yaml. Prints one JSON object (and writes it with ``--out``).

On PostgreSQL (Debian's `postgresql`, a private server with fsync on,
tests/pg_server.py): ``receiver_postgres``, one receiver whose store is the server, and
``two_receivers_postgres``, two daemons (all roles) on one database with one shared
archive, each sent a CT study of ``--n / 2`` instances by its own storescu at the same
time: their total instances/s (all instances over the time until both storescu exit)
beside one receiver's, and the later of the two studies' decisions after exit.

    .venv/bin/python bench/network_ingest.py --n 500 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from triage.replay.dicom_writer import image_dataset, write_dataset  # noqa: E402
from triage.store import db as store  # noqa: E402

CONFIG = REPO / "config.yaml"
# the CT studies are outside the shipped scope (CR/DX chest): admitted here, so scored
ANY_SCOPE = {"TRIAGE__SCOPE__MODALITIES": "[]", "TRIAGE__SCOPE__BODY_PARTS": "[]"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_ct(folder: Path, n: int, size: int, seed: int) -> str:
    """``n`` single-frame CT slices of one study in 5 series; return the study UID."""
    rng = np.random.default_rng(seed)
    study = f"2.25.{rng.integers(1, 2**62)}"
    series = [f"2.25.{rng.integers(1, 2**62)}" for _ in range(5)]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = rng.normal(40, 300, (size, size)).astype(np.int16)
        ds = image_dataset(pixels, modality="CT", study_uid=study, series_uid=series[i % 5],
                           instance_number=i // 5 + 1, window=(40.0, 400.0),
                           rescale=(1.0, -1024.0))
        write_dataset(ds, folder / f"{i:06d}.dcm")
    return study


def write_dx(folder: Path, seed: int) -> str:
    rng = np.random.default_rng(seed)
    study = f"2.25.{rng.integers(1, 2**62)}"
    pixels = rng.integers(0, 255, (256, 256)).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    write_dataset(image_dataset(pixels, modality="DX", study_uid=study), folder / "dx.dcm")
    return study


def storescu(port: int, folder: Path, called: str, nodelay: str,
             settle: bool = False) -> tuple[float, int]:
    """Send every file under ``folder`` in one association; (seconds, files sent).

    ``settle`` (the throughput runs): first write out what earlier runs left in the page
    cache and wait a second, so that one target's writeback (an archive being filled, a
    receiver that does not sync) is not timed in the next target's run."""
    env = {**os.environ, "TCP_NODELAY": nodelay}
    if settle:
        _settle()
    started = time.perf_counter()
    result = subprocess.run(
        ["storescu", "-aet", "BENCH", "-aec", called, "+sd", "+r", "-v",
         "127.0.0.1", str(port), str(folder)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"storescu failed: {result.stderr[-1500:]}")
    sent = result.stderr.count("Received Store Response (Success)")
    return seconds, sent


def _settle() -> None:
    """Write out what earlier runs left in the page cache, then rest a second."""
    os.sync()
    time.sleep(1.0)


class Triage:
    """``triage serve`` on a fresh state directory, with or without the receiver."""

    def __init__(self, home: Path, receiver: bool, env: dict[str, str]) -> None:
        self.home = home
        self.url = env.get("TRIAGE__STORE__URL")  # PostgreSQL, else the SQLite file
        self.http = free_port()
        self.dicom = free_port() if receiver else None
        self.env = {**os.environ, "TRIAGE_HOME": str(home),
                    "TRIAGE__DICOM__PORT": str(self.dicom) if receiver else "null",
                    "TRIAGE__DICOM__HOST": "127.0.0.1", **env}
        home.mkdir(parents=True, exist_ok=True)
        self.log = open(home / "stderr.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "triage", "serve", "--config", str(CONFIG),
             "--port", str(self.http)], env=self.env, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError((home / "stderr.log").read_text()[-2000:])
            try:
                if httpx.get(f"http://127.0.0.1:{self.http}/healthz", timeout=1).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("triage did not become healthy")

    def decided_at(self, study_uid: str, timeout: float) -> float | None:
        """Wall time (time.time) the study's first decision row appeared, polling 10 ms."""
        deadline = time.monotonic() + timeout
        db = None
        while time.monotonic() < deadline:
            try:
                if db is None:
                    db = (store.connect(self.url, readonly=True) if self.url else
                          sqlite3.connect(f"file:{self.home / 'triage.db'}?mode=ro", uri=True))
                row = db.execute(
                    "SELECT MIN(decisions.created_at) FROM decisions JOIN studies "
                    "ON studies.id = decisions.study_id WHERE studies.study_uid = ?",
                    [study_uid]).fetchone()
                if row and row[0] is not None:
                    return time.time()
            except store.DATABASE_ERRORS:
                db = None
            time.sleep(0.01)
        return None

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def run_receiver(files: Path, study: str, scratch: Path, nodelay: str, env: dict) -> dict:
    daemon = Triage(scratch / "home", receiver=True, env=env)
    try:
        seconds, sent = storescu(daemon.dicom, files, "TRIAGE", nodelay, settle=True)
        exited = time.time()
        decided = daemon.decided_at(study, timeout=300)
    finally:
        daemon.stop()
    return {"sent": sent, "seconds": round(seconds, 3),
            "instances_per_s": round(sent / seconds, 1),
            "decision_after_exit_s": round(decided - exited, 3) if decided else None}


def run_storescp(files: Path, study: str, scratch: Path, nodelay: str, env: dict) -> dict:
    daemon = Triage(scratch / "home", receiver=False, env=env)
    port = free_port()
    # storescp writes each instance straight into the watched inbox.
    target = daemon.home / "inbox" / "storescp"
    target.mkdir(parents=True, exist_ok=True)
    scp = subprocess.Popen(["storescp", "-aet", "STORESCP", "-od", str(target), str(port)],
                           env={**os.environ, "TCP_NODELAY": nodelay},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port)
        seconds, sent = storescu(port, files, "STORESCP", nodelay, settle=True)
        exited = time.time()
        decided = daemon.decided_at(study, timeout=300)
    finally:
        scp.terminate()
        scp.wait(timeout=30)
        daemon.stop()
    return {"sent": sent, "seconds": round(seconds, 3),
            "instances_per_s": round(sent / seconds, 1),
            "decision_after_exit_s": round(decided - exited, 3) if decided else None}


def run_two_receivers(files: list[Path], studies: list[str], scratch: Path, nodelay: str,
                      env: dict) -> dict:
    """Two daemons on one PostgreSQL database (`env` names it) and one shared archive,
    each sent its own study by its own storescu at the same time."""
    shared = {f"TRIAGE__PATHS__{name.upper()}": str(scratch / "shared" / name)
              for name in ("archive", "models", "quarantine")}
    daemons = [Triage(scratch / f"home{i}", receiver=True,
                      env={**env, **shared, "TRIAGE__REPLICA__NAME": f"bench-{i}"})
               for i in range(2)]
    results: list[tuple[float, int] | None] = [None, None]
    try:
        def send(i: int) -> None:
            results[i] = storescu(daemons[i].dicom, files[i], "TRIAGE", nodelay)

        _settle()
        started = time.perf_counter()
        senders = [threading.Thread(target=send, args=(i,)) for i in range(2)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        seconds = time.perf_counter() - started
        exited = time.time()
        decided = [daemon.decided_at(study, timeout=300)
                   for daemon, study in zip(daemons, studies, strict=True)]
    finally:
        for daemon in daemons:
            daemon.stop()
    sent = sum(r[1] for r in results if r is not None)
    return {"sent": sent, "seconds": round(seconds, 3),
            "instances_per_s": round(sent / seconds, 1),
            "per_receiver_seconds": [round(r[0], 3) for r in results if r is not None],
            "decision_after_exit_s": round(max(decided) - exited, 3)
            if all(decided) else None}


def run_pynetdicom_null(files: Path, nodelay: str) -> dict:
    """The library's ceiling: pynetdicom answering Success without storing anything."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    ae = AE(ae_title="NULL")
    ae.maximum_pdu_size = 262_144
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)])
    try:
        seconds, sent = storescu(port, files, "NULL", nodelay, settle=True)
    finally:
        server.shutdown()
    return {"sent": sent, "seconds": round(seconds, 3),
            "instances_per_s": round(sent / seconds, 1)}


def run_orthanc(files: Path, scratch: Path, nodelay: str) -> dict:
    port, http = free_port(), free_port()
    store = scratch / "orthanc"
    store.mkdir(parents=True, exist_ok=True)
    config = scratch / "orthanc.json"
    config.write_text(json.dumps({
        "Name": "bench", "StorageDirectory": str(store), "IndexDirectory": str(store),
        "DicomAet": "ORTHANC", "DicomPort": port, "HttpPort": http,
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False, "Plugins": [], "StorageCompression": False,
        # its default since 1.7.4, stated: Orthanc, too, syncs each file before Success
        "SyncStorageArea": True,
    }))
    proc = subprocess.Popen(["Orthanc", str(config)], env={**os.environ, "TCP_NODELAY": nodelay},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port, timeout=60)
        seconds, sent = storescu(port, files, "ORTHANC", nodelay, settle=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return {"sent": sent, "seconds": round(seconds, 3),
            "instances_per_s": round(sent / seconds, 1)}


def latency(scratch: Path, studies: int, nodelay: str) -> dict:
    """Single-image DX studies at the shipped settings: storescu exit to decision row."""
    daemon = Triage(scratch / "home", receiver=True, env={})
    try:
        waits = [_decision_wait(daemon, scratch / f"dx{i}", 10_000 + i, nodelay)
                 for i in range(studies)]
    finally:
        daemon.stop()
    return {"studies": studies, **_spread(waits)}


def latency_under_load(scratch: Path, studies: int, n_ct: int, size: int,
                       nodelay: str, gap: float) -> dict:
    """`studies` single-image DX studies sent one by one (one storescu call each) while
    CT studies of `n_ct` instances arrive back to back on another association, CT and DX
    both in scope (so the scorer also has the CT to score): storescu exit to decision
    row for each DX study (`gap` seconds apart, so that they spread over several CT
    associations and meet the scorer busy with a CT study), and how many of them were
    sent while the CT sender was still sending."""
    daemon = Triage(scratch / "home", receiver=True, env=ANY_SCOPE)
    cts = [scratch / f"ct{i}" for i in range(2)]
    for i, folder in enumerate(cts):
        write_ct(folder, n_ct, size, seed=20_000 + i)
    sending = threading.Event()
    done = threading.Event()
    ct_sent: list[int] = []

    def send_ct() -> None:
        i = 0
        while not done.is_set():
            sending.set()
            ct_sent.append(storescu(daemon.dicom, cts[i % len(cts)], "TRIAGE", nodelay)[1])
            i += 1

    waits, loaded = [], 0
    sender = threading.Thread(target=send_ct, daemon=True)
    try:
        sender.start()
        sending.wait(timeout=30)
        time.sleep(0.5)  # the CT association is well under way
        for i in range(studies):
            loaded += sender.is_alive()
            waits.append(_decision_wait(daemon, scratch / f"dx{i}", 30_000 + i, nodelay))
            time.sleep(gap)
        done.set()
        sender.join(timeout=600)
    finally:
        done.set()
        daemon.stop()
    return {"studies": studies, "sent_while_ct_in_flight": loaded,
            "ct_instances_sent": sum(ct_sent), "ct_associations": len(ct_sent),
            **_spread(waits)}


def _decision_wait(daemon: Triage, folder: Path, seed: int, nodelay: str) -> float:
    """Send one single-image DX study; seconds from storescu's exit to its decision row
    (inf when none came within 2 minutes)."""
    study = write_dx(folder, seed=seed)
    storescu(daemon.dicom, folder, "TRIAGE", nodelay)
    exited = time.time()
    decided = daemon.decided_at(study, timeout=120)
    return decided - exited if decided else float("inf")


def _spread(waits: list[float]) -> dict:
    return {"p50_s": round(statistics.median(waits), 3),
            "p95_s": round(float(np.percentile(waits, 95)), 3),
            "max_s": round(max(waits), 3)}


def _wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


def _summary(runs: list[dict]) -> dict:
    rates = [run["instances_per_s"] for run in runs]
    out = {"runs": runs, "instances_per_s_min": min(rates), "instances_per_s_max": max(rates),
           "instances_per_s_median": statistics.median(rates)}
    waits = [run["decision_after_exit_s"] for run in runs if run.get("decision_after_exit_s")]
    if "decision_after_exit_s" in runs[0]:
        out["decision_after_exit_s_max"] = max(waits) if len(waits) == len(runs) else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="CT instances per run")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--latency-studies", type=int, default=20)
    parser.add_argument("--under-load", action=argparse.BooleanOptionalAction, default=True,
                        help="also send the latency studies while CT studies of --n "
                        "instances arrive on another association")
    parser.add_argument("--latency-gap", type=float, default=0.5,
                        help="seconds between the latency studies in the spread run "
                        "under load (the first run sends them back to back)")
    parser.add_argument("--tcp-nodelay", default="1", choices=["0", "1"])
    parser.add_argument("--targets",
                        default="receiver,receiver_read_at_once,receiver_nofsync,storescp,"
                                "orthanc,pynetdicom_null,receiver_postgres,"
                                "two_receivers_postgres")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if shutil.which("storescu") is None:
        sys.exit("storescu not found: install Debian's dcmtk (make system-deps)")
    targets = args.targets.split(",")
    results: dict[str, object] = {}
    server = None
    if {"receiver_postgres", "two_receivers_postgres"} & set(targets):
        sys.path.insert(0, str(REPO / "tests"))
        from pg_server import PostgresServer, missing_reason

        if missing_reason() is None:
            server = PostgresServer(fsync=True).start()  # durable commits, as SQLite's
        else:
            targets = [t for t in targets if not t.endswith("_postgres")]
            results["postgres"] = missing_reason()
    with tempfile.TemporaryDirectory(prefix="triage-netbench-") as tmp:
        tmp_path = Path(tmp)
        runs: dict[str, list[dict]] = {name: [] for name in targets}
        for run in range(args.runs):
            files = tmp_path / f"ct{run}"
            study = write_ct(files, args.n, args.size, seed=run)
            for name in targets:
                scratch = tmp_path / f"{name}{run}"
                if name == "receiver":
                    runs[name].append(run_receiver(files, study, scratch, args.tcp_nodelay,
                                                   ANY_SCOPE))
                elif name == "receiver_read_at_once":
                    runs[name].append(run_receiver(
                        files, study, scratch, args.tcp_nodelay,
                        {**ANY_SCOPE, "TRIAGE__DICOM__DEFER_READING_SECONDS": "0"}))
                elif name == "receiver_nofsync":
                    runs[name].append(run_receiver(
                        files, study, scratch, args.tcp_nodelay,
                        {**ANY_SCOPE, "TRIAGE__INGEST__FSYNC": "false"}))
                elif name == "pynetdicom_null":
                    runs[name].append(run_pynetdicom_null(files, args.tcp_nodelay))
                elif name == "storescp" and shutil.which("storescp"):
                    runs[name].append(run_storescp(files, study, scratch, args.tcp_nodelay,
                                                   ANY_SCOPE))
                elif name == "orthanc" and shutil.which("Orthanc"):
                    runs[name].append(run_orthanc(files, scratch, args.tcp_nodelay))
                elif name == "receiver_postgres" and server is not None:
                    runs[name].append(run_receiver(
                        files, study, scratch, args.tcp_nodelay,
                        {**ANY_SCOPE, "TRIAGE__STORE__URL": server.new_database()}))
                elif name == "two_receivers_postgres" and server is not None:
                    halves = [tmp_path / f"half{run}-{i}" for i in range(2)]
                    uids = [write_ct(half, args.n // 2, args.size, seed=100 + 2 * run + i)
                            for i, half in enumerate(halves)]
                    runs[name].append(run_two_receivers(
                        halves, uids, scratch, args.tcp_nodelay,
                        {**ANY_SCOPE, "TRIAGE__STORE__URL": server.new_database()}))
                    for half in halves:
                        shutil.rmtree(half, ignore_errors=True)
                shutil.rmtree(scratch, ignore_errors=True)
            shutil.rmtree(files, ignore_errors=True)
        for name, items in runs.items():
            if args.runs:  # --runs 0: only the latency parts
                results[name] = _summary(items) if items else "not installed"
        if args.latency_studies:
            results["single_image_latency"] = latency(tmp_path / "latency",
                                                      args.latency_studies, args.tcp_nodelay)
        if args.latency_studies and args.under_load:
            # back to back: the studies meet one CT association while it is received
            # (the case); spread: they also meet ended CTs being read and scored
            for key, gap in (("latency_under_load", 0.0),
                             ("latency_under_load_spread", args.latency_gap)):
                results[key] = {"gap_s": gap, **latency_under_load(
                    tmp_path / key, args.latency_studies, args.n, args.size,
                    args.tcp_nodelay, gap)}
    if server is not None:
        server.stop()
    out = {
        "benchmark": "network_ingest",
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "command": "bench/network_ingest.py " + " ".join(sys.argv[1:]),
        "instances": args.n, "size": args.size,
        "tcp_nodelay_env": args.tcp_nodelay,
        "receiver_tcp_nodelay": True,
        "scope_for_ct": "modalities [] and body_parts [] (CT scored); latency part: shipped scope",
        "orthanc_version": _version(["Orthanc", "--version"]),
        "orthanc_sync_storage_area": True,
        "dcmtk_version": _version(["storescu", "--version"]),
        **results,
    }
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


def _version(command: list[str]) -> str | None:
    if shutil.which(command[0]) is None:
        return None
    result = subprocess.run(command, capture_output=True, text=True)
    lines = (result.stdout or result.stderr).strip().splitlines()
    return lines[0] if lines else None


if __name__ == "__main__":
    main()
