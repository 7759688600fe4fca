"""``triage replay``: stream a labelled image set into a daemon, label what it routes.

Two ways to run:

- against a running daemon: ``--url``, ``--home`` (its TRIAGE_HOME: the inbox to write
  into and the database to read) and ``--token`` (a radiologist's);
- ``--spawn``: start ``triage serve`` on a fresh state directory (``--home``, else a
  temporary one) with ``--strategy``, ``--coverage`` and ``--set section.key=value``
  overrides passed as ``TRIAGE__...`` variables, and make its own radiologist token.

It writes the studies at ``--rate`` per second, an oracle labels the routed ones with
the truth (``--label-delay``, ``--label-noise``), then it waits (at most ``--timeout``
seconds) until every study is ingested and scored, the queue holds none of them and no
retrain is running or due, and writes ``report.json`` and ``curves.png`` to ``--report``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from triage.config import Settings, load_settings, override_environ
from triage.errors import ConfigError, TriageError
from triage.gate.strategies import STRATEGIES as GATE_STRATEGIES

if TYPE_CHECKING:  # the rest loads numpy, torch, pydicom: only when a replay runs
    from triage.replay.oracle import Oracle
    from triage.replay.stream import StreamWriter

ORDERS = ("shuffled", "drift")  # triage.replay.stream.ORDERS
STRATEGIES = tuple(sorted(GATE_STRATEGIES))
# a replay writes each study at once: there is no need to wait 30 s for late instances
SPAWN_DEFAULTS = {
    "TRIAGE__INGEST__SETTLE_SECONDS": "1.0",
    "TRIAGE__INGEST__CLOSED_SETTLE_SECONDS": "0.2",
    "TRIAGE__INGEST__RESCAN_SECONDS": "5",
    "TRIAGE__STUDIES__STABLE_AGE_SECONDS": "2",
    "TRIAGE__STUDIES__CHECK_SECONDS": "0.5",
}
QUIET_SECONDS = 7.0  # > the daemon's retrain check period (5 s)


class ReplayError(TriageError):
    """The replay cannot run or did not finish."""


@dataclass
class ReplayOptions:
    url: str | None = None
    home: Path | None = None
    token: str | None = None
    source: str = "pneumoniamnist"
    split: str = "train"
    n: int | None = 500
    dicom_dir: Path | None = None
    labels_csv: Path | None = None
    rate: float = 20.0
    order: str = "shuffled"
    scarce_class: str | None = None
    drift_at: float = 0.5
    early_share: float = 0.1
    images_per_study: int = 1
    seed: int = 0
    label_delay: float = 0.0
    label_noise: float = 0.0
    report: Path = Path("replay-report")
    spawn: bool = False
    config: Path | None = None
    strategy: str | None = None
    coverage: str | None = None
    overrides: list[str] = field(default_factory=list)
    timeout: float = 1800.0
    external_eval: bool = True
    holdout_eval: bool = False
    progress: bool = True
    keep_daemon: bool = False


# -- the spawned daemon ------------------------------------------------------------------
def override_env(options: ReplayOptions) -> dict[str, str]:
    """The ``TRIAGE__...`` variables of a spawned daemon (defaults, strategy, --set)."""
    env = dict(SPAWN_DEFAULTS)
    if options.strategy is not None:
        if options.strategy not in STRATEGIES:
            raise ConfigError(f"--strategy must be one of {', '.join(STRATEGIES)}")
        env["TRIAGE__GATE__STRATEGY"] = options.strategy
    if options.coverage == "off":
        env["TRIAGE__RETRAIN__COVERAGE_QUERIES"] = "0"
    elif options.coverage not in (None, "on"):
        raise ConfigError("--coverage must be on or off")
    env.update(override_environ(options.overrides))
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SpawnedDaemon:
    """``triage serve`` on its own state directory, its HTTP server and DICOM node on
    free ports (unless ``--set dicom.port=...``), so it runs beside a daemon already
    serving the configuration's ports."""

    def __init__(self, home: Path, config: Path | None, overrides: dict[str, str]) -> None:
        self.home = home
        self.config = config
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        base = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE__")}
        self.env = {**base, "TRIAGE_HOME": str(home), "TRIAGE__DICOM__PORT": str(_free_port()),
                    **overrides}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = home / "daemon.stderr.log"

    def _command(self, *args: str) -> list[str]:
        config = ["--config", str(self.config)] if self.config else []
        return [sys.executable, "-m", "triage", *args, *config, "--home", str(self.home)]

    def settings(self) -> Settings:
        return load_settings(self.config, home=self.home, environ=self.env)

    def start(self, timeout: float = 90.0) -> SpawnedDaemon:
        import httpx

        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(self._command("serve") + ["--port", str(self.port)],
                                         env=self.env, stdout=err, stderr=err)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log.read_text(errors="replace").strip().splitlines()[-1:]
                raise ReplayError(f"the spawned daemon exited ({self.proc.returncode}): "
                                  f"{tail[0] if tail else 'no output'}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise ReplayError(f"the spawned daemon did not become healthy in {timeout:.0f} s "
                          f"(see {self.log})")

    def create_token(self, name: str = "Replay oracle") -> str:
        out = subprocess.run(self._command("token", "create", "--role", "radiologist",
                                           "--name", name),
                             env=self.env, capture_output=True, text=True)
        if out.returncode != 0:
            raise ReplayError(f"token create failed: {out.stderr.strip()[-300:]}")
        return out.stdout.strip().splitlines()[-1]

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


# -- progress ----------------------------------------------------------------------------
class Progress:
    """One line on stderr, rewritten in place on a terminal (a line every 10 s otherwise)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.started = time.monotonic()
        self._last = 0.0

    def show(self, written: int, state: dict[str, int], runs: dict[str, Any],
             phase: str, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not self.tty and not final and now - self._last < 10:
            return
        self._last = now
        width = 24
        done = int(width * state.get("scored", 0) / max(self.total, 1))
        line = (f"[{'#' * done}{'.' * (width - done)}] {phase:<8} written {written}/{self.total}"
                f" scored {state.get('scored', 0)} routed {state.get('routed', 0)}"
                f" labelled {state.get('labeled', 0)} retrains {runs.get('runs', 0)}"
                f" (promoted {runs.get('promoted', 0)}{', running' if runs.get('running') else ''})"
                f" {now - self.started:.0f}s")
        if self.tty:
            sys.stderr.write("\r" + line + "\x1b[K" + ("\n" if final else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


# -- the replay --------------------------------------------------------------------------
def _load_items(options: ReplayOptions, class_names: list[str]):
    from triage.replay.source import folder_items, pneumoniamnist_items

    if options.source == "pneumoniamnist":
        return pneumoniamnist_items(options.split, options.n, seed=options.seed)
    if options.source == "folder":
        if options.dicom_dir is None or options.labels_csv is None:
            raise ConfigError("--source folder needs --dicom-dir and --labels-csv")
        return folder_items(options.dicom_dir, options.labels_csv, class_names, options.n,
                            seed=options.seed)
    raise ConfigError(f"--source must be pneumoniamnist or folder (got {options.source!r})")


def _labels_due(db_path: Path, names: list[str]) -> int:
    from triage.store import db as store
    from triage.training.runs import labels_since_last_run

    db = store.connect(db_path, readonly=True)
    try:
        return labels_since_last_run(db, names)
    finally:
        db.close()


def _coverage_pending(db_path: Path, since_run: int) -> bool:
    import sqlite3

    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(
            "SELECT COUNT(*) FROM retrain_runs WHERE id > ? AND state = 'promoted' "
            "AND coverage_routed IS NULL", [since_run]).fetchone()[0] > 0
    finally:
        conn.close()


def run_replay(options: ReplayOptions, settings: Settings | None = None) -> dict[str, Any]:
    """Run a replay to the end and write its report; return the report.

    Args:
        options: What to replay, where, and how.
        settings: The target daemon's settings (attach mode: for its inbox, database,
            class names and `retrain.min_new_labels`); loaded from ``--home``/``--config``
            when None. Ignored with ``spawn``.

    Raises:
        ConfigError: Bad options. ReplayError / SourceError / OracleError: it cannot run
        or did not finish within ``timeout`` (the report is written either way once the
        stream started).
    """
    from triage.replay import report as rep
    from triage.replay.oracle import Oracle
    from triage.replay.source import SourceError
    from triage.replay.stream import StreamWriter, build_studies, order_indices

    if options.rate < 0:
        raise ConfigError("--rate must be >= 0 (0: as fast as possible)")
    if not 0 <= options.label_noise <= 1:
        raise ConfigError("--label-noise must be within [0, 1]")
    if options.order not in ORDERS:
        raise ConfigError(f"--order must be one of {', '.join(ORDERS)}")
    daemon: SpawnedDaemon | None = None
    temp_home: Path | None = None
    overrides: dict[str, str] = {}
    if options.spawn:
        overrides = override_env(options)
        home = options.home
        if home is None:
            home = temp_home = Path(tempfile.mkdtemp(prefix="triage-replay-"))
        daemon = SpawnedDaemon(home.resolve(), options.config, overrides)
        settings = daemon.settings()  # validates the overrides before starting anything
    else:
        if options.url is None or options.token is None or (options.home is None
                                                             and settings is None):
            raise ConfigError("replay needs --url, --home and --token of a running daemon, "
                              "or --spawn")
        if settings is None:
            settings = load_settings(options.config, home=options.home)
    assert settings is not None
    names = list(settings.model.labels)
    items = _load_items(options, names)
    if not items:
        raise SourceError("the source holds no images")
    order = order_indices([it.label for it in items], options.order, options.seed,
                          scarce_class=(_scarce(options.scarce_class, names)),
                          drift_at=options.drift_at, early_share=options.early_share)
    studies = build_studies(items, order, options.images_per_study)
    truth = {s.uid: s.label for s in studies}
    uids = set(truth)
    started_at = time.time()
    try:
        if daemon is not None:
            daemon.start()
            url, token = daemon.url, daemon.create_token()
        else:
            url, token = options.url, options.token
        db_path = settings.path("database")
        if not db_path.exists():
            raise ReplayError(f"no database at {db_path}: is --home the daemon's TRIAGE_HOME?")
        before = rep.baseline(db_path)
        oracle = Oracle(url, token, db_path, truth, names, delay=options.label_delay,
                        noise=options.label_noise, seed=options.seed + 1)
        oracle.start()
        tag = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        writer = StreamWriter(settings.path("inbox"), studies, rate=options.rate, tag=tag)
        writer.start()
        finished, phase = _wait(options, settings, db_path, uids, before, writer, oracle)
        writer.stop()
        oracle.stop()
        report = _report(options, settings, db_path, studies, before, oracle, overrides,
                         started_at, finished, phase, daemon)
        if not finished:
            raise ReplayError(f"the replay did not finish in {options.timeout:.0f} s "
                              f"({phase}); report written to {options.report}")
        return report
    finally:
        if daemon is not None and not options.keep_daemon:
            daemon.stop()
            if temp_home is not None:
                shutil.rmtree(temp_home, ignore_errors=True)


def _scarce(name: str | None, names: list[str]) -> int | None:
    if name is None:
        return None
    if name in names:
        return names.index(name)
    if name.isdigit() and int(name) < len(names):
        return int(name)
    raise ConfigError(f"--scarce-class must be one of {names} or an index")


def _wait(options: ReplayOptions, settings: Settings, db_path: Path, uids: set[str],
          before: dict[str, Any], writer: StreamWriter, oracle: Oracle) -> tuple[bool, str]:
    """Until everything is scored and labelled and retraining is quiet, or the timeout."""
    from triage.replay import report as rep

    progress = Progress(len(uids), options.progress)
    deadline = time.monotonic() + options.timeout
    quiet_since: float | None = None
    phase = "writing"
    state: dict[str, int] = {}
    runs: dict[str, Any] = {}
    while time.monotonic() < deadline:
        for part in (writer, oracle):
            if part.error is not None:
                raise part.error
        state = rep.study_progress(db_path, uids)
        runs = rep.retrain_state(db_path, before["last_run_id"])
        if not writer.done:
            phase = "writing"
        elif state["scored"] < len(uids):
            phase = "scoring"
        elif state["pending"] or state["claimed"] or not oracle.idle:
            phase = "labels"
        elif (runs["running"]
              or (settings.retrain.enabled
                  and _labels_due(db_path, list(settings.model.labels))
                  >= settings.retrain.min_new_labels)
              or _coverage_pending(db_path, before["last_run_id"])):
            phase = "retrain"
        else:
            phase = "quiet"
        if phase == "quiet":
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= QUIET_SECONDS:
                progress.show(writer.written, state, runs, "done", final=True)
                return True, phase
        else:
            quiet_since = None
        progress.show(writer.written, state, runs, phase)
        time.sleep(0.5)
    progress.show(writer.written, state, runs, "timeout", final=True)
    return False, phase


def _report(options: ReplayOptions, settings: Settings, db_path: Path, studies, before,
            oracle: Oracle, overrides: dict[str, str], started_at: float, finished: bool,
            phase: str, daemon: SpawnedDaemon | None) -> dict[str, Any]:
    from triage.replay import report as rep

    names = list(settings.model.labels)
    uids = {s.uid for s in studies}
    truth_names = {s.uid: names[s.label] for s in studies}
    positions = {s.uid: s.position for s in studies}
    curve = rep.learning_curve(db_path, before["last_run_id"], before["serving_version"])
    routing = rep.routing(db_path, uids, positions, truth_names)
    scored_at = routing["stream_scored_at"]
    for point in curve:
        point["scored_before"] = sum(t < (point["finished_at"] or 0) for t in scored_at)
        point["labels_given_before"] = sum(r.at < (point["started_at"] or 0) and r.status == 201
                                           for r in oracle.labels)
    external = None
    if (options.external_eval and options.source == "pneumoniamnist"
            and options.split == "train"):
        from triage.replay.datasets import load_pneumoniamnist_dev

        dev = load_pneumoniamnist_dev()
        rep.external_curve(curve, dev["val_images"], dev["val_labels"])
        external = {"set": "pneumoniamnist_dev val", "n": int(len(dev["val_labels"])),
                    "preprocessing": "the daemon's ingest pipeline (full-range window)"}
    progress = rep.study_progress(db_path, uids)
    final_serving = rep.baseline(db_path)["serving_version"]
    gate = settings.gate
    report: dict[str, Any] = {
        "completed": finished,
        "end_phase": phase,
        "started_at": started_at,
        "seconds": round(time.time() - started_at, 1),
        "replay": {
            "mode": "spawn" if daemon is not None else "attach",
            "url": daemon.url if daemon is not None else options.url,
            "home": str(settings.home),
            "source": options.source,
            "split": options.split if options.source == "pneumoniamnist" else None,
            "images": sum(len(s.items) for s in studies),
            "studies": len(studies),
            "images_per_study": options.images_per_study,
            "order": options.order,
            "drift": {"scarce_class": options.scarce_class, "drift_at": options.drift_at,
                      "early_share": options.early_share} if options.order == "drift" else None,
            "rate_studies_per_second": options.rate,
            "seed": options.seed,
            "class_counts": {n: sum(s.label == i for s in studies) for i, n in enumerate(names)},
            "stream_labels": [names[s.label] for s in studies],
        },
        "outcome": {**progress, "written": sum(s.written_at is not None for s in studies),
                    "retrain_runs": len(curve),
                    "promoted": sum(p["state"] == "promoted" for p in curve),
                    "serving_before": before["serving_version"],
                    "serving_after": final_serving},
        "learning_curve": curve,
        "external_eval": external,
        "routing": routing,
        "budget": {
            "strategy": gate.strategy, "label_rate": gate.label_rate,
            "daily_cap": gate.daily_cap, "exploration_rate": gate.exploration_rate,
            "warmup": gate.warmup, "window": gate.window,
            "min_new_labels": settings.retrain.min_new_labels,
            "coverage_queries": settings.retrain.coverage_queries,
            "labels_given": oracle.summary()["labels"],
            "note": None if daemon is not None else
            "attach mode: settings as read here from --config/--home and this environment",
        },
        "seeds": {"replay": options.seed, "oracle_noise": options.seed + 1,
                  "gate": gate.seed, "training": settings.model.training.seed},
        "overrides": overrides,
        "oracle": {**oracle.summary(), "records": oracle.records()},
        "versions": rep.versions(),
        "holdout": None,
    }
    if options.holdout_eval:
        report["holdout"] = _holdout(db_path)
    out = Path(options.report)
    rep.write_report(out, report)
    png = rep.plot(out, report)
    report["plot"] = str(png) if png else None
    rep.write_report(out, report)
    return report


def _holdout(db_path: Path) -> dict[str, Any]:
    import sqlite3

    from triage.replay import report as rep
    from triage.replay.datasets import find_data_dir

    data_dir = find_data_dir()
    if data_dir is None or not (data_dir / rep.HOLDOUT_FILE).is_file():
        return {"error": f"{rep.HOLDOUT_FILE} not found"}
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    try:
        row = conn.execute("SELECT version, path FROM models WHERE status = 'serving'"
                           ).fetchone()
    finally:
        conn.close()
    if row is None:
        return {"error": "no serving model"}
    return {"version": row[0], **rep.holdout_eval(Path(row[1]), data_dir)}


# -- argparse ----------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``replay`` options (``--config``/``--home`` come from the common parent)."""
    parser.add_argument("--url", help="the running daemon, e.g. http://127.0.0.1:8000")
    parser.add_argument("--token", help="a radiologist token of that daemon "
                        "(or TRIAGE_REPLAY_TOKEN)", default=os.environ.get("TRIAGE_REPLAY_TOKEN"))
    parser.add_argument("--spawn", action="store_true",
                        help="start a daemon on --home (default: a temporary directory)")
    parser.add_argument("--strategy", choices=STRATEGIES, help="gate.strategy (--spawn)")
    parser.add_argument("--coverage", choices=("on", "off"),
                        help="off: retrain.coverage_queries 0 (--spawn)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="config override (--spawn), repeatable")
    parser.add_argument("--keep-daemon", action="store_true",
                        help="leave the spawned daemon running and its home in place")
    parser.add_argument("--source", choices=("pneumoniamnist", "folder"),
                        default="pneumoniamnist")
    parser.add_argument("--split", choices=("train", "val"), default="train",
                        help="PneumoniaMNIST development split (never the holdout)")
    parser.add_argument("--n", type=int, default=500, help="images to replay (0: all)")
    parser.add_argument("--dicom-dir", type=Path, help="folder source: DICOM files")
    parser.add_argument("--labels-csv", type=Path, help="folder source: CSV file,label")
    parser.add_argument("--rate", type=float, default=20.0,
                        help="studies per second (0: as fast as possible)")
    parser.add_argument("--order", choices=ORDERS, default="shuffled")
    parser.add_argument("--scarce-class", help="drift: the class that arrives late "
                        "(default: the rarest)")
    parser.add_argument("--drift-at", type=float, default=0.5,
                        help="drift: share of the stream before the scarce class arrives")
    parser.add_argument("--early-share", type=float, default=0.1,
                        help="drift: share of the scarce class allowed early")
    parser.add_argument("--images-per-study", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label-delay", type=float, default=0.0,
                        help="seconds the oracle spends on each study")
    parser.add_argument("--label-noise", type=float, default=0.0,
                        help="probability the oracle gives a wrong class")
    parser.add_argument("--report", type=Path, default=Path("replay-report"),
                        help="folder for report.json and curves.png")
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="most seconds to wait for the end (default 1800)")
    parser.add_argument("--no-external-eval", action="store_true",
                        help="skip scoring each serving model on the dev val split")
    parser.add_argument("--holdout-eval", action="store_true",
                        help="score the final serving model once on the holdout test split")
    parser.add_argument("--no-progress", action="store_true")


def run_replay_command(settings: Settings | None, args: argparse.Namespace) -> int:
    """``triage replay``; errors propagate to triage.cli as one line (exit 1 or 2)."""
    options = ReplayOptions(
        url=args.url, home=args.home, token=args.token, source=args.source, split=args.split,
        n=args.n or None, dicom_dir=args.dicom_dir, labels_csv=args.labels_csv,
        rate=args.rate, order=args.order, scarce_class=args.scarce_class,
        drift_at=args.drift_at, early_share=args.early_share,
        images_per_study=args.images_per_study, seed=args.seed,
        label_delay=args.label_delay, label_noise=args.label_noise, report=args.report,
        spawn=args.spawn, config=args.config, strategy=args.strategy, coverage=args.coverage,
        overrides=args.overrides, timeout=args.timeout,
        external_eval=not args.no_external_eval, holdout_eval=args.holdout_eval,
        progress=not args.no_progress, keep_daemon=args.keep_daemon,
    )
    try:
        report = run_replay(options, None if args.spawn else settings)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    outcome, routing = report["outcome"], report["routing"]
    last = next((p for p in reversed(report["learning_curve"]) if p["serving_auroc"]), None)
    print(json.dumps({
        "report": str(Path(options.report) / "report.json"), "studies": outcome["written"],
        "scored": outcome["scored"], "routed_fraction": routing["routed_fraction"],
        "labels": report["oracle"]["labels"], "retrains": outcome["retrain_runs"],
        "promoted": outcome["promoted"],
        "last_serving_auroc": last["serving_auroc"] if last else None,
        "holdout": report["holdout"], "seconds": report["seconds"],
    }))
    return 0
