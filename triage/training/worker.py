"""The training process: ``python -m triage.training.worker --run-id N --settings FILE``.

Started by :class:`triage.training.scheduler.RetrainScheduler` (daemon or `triage retrain`)
after it inserted the `running` row N, so ingestion, scoring and the web server keep their
cores and their GIL. The settings travel as a JSON file written by the scheduler (the
daemon's exact configuration, environment overrides included); ``--config``/``--home``
work too. The process lowers its priority, uses `retrain.threads` torch threads, logs
JSON lines to stderr (the scheduler sends them to ``<logs>/retrain.log``) and ends the
run row: `promoted`, `rejected`, `succeeded`, or `failed` with the reason (also on
SIGTERM). Exit status 0 unless the run failed (1) or the arguments were bad (2).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType

from triage.errors import ConfigError, TriageError

log = logging.getLogger("triage.retrain")


class Cancelled(BaseException):
    """SIGTERM arrived: stop training, record the run as failed."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Cancelled()


def _settings(args: argparse.Namespace):
    from triage.config import Settings, load_settings

    if args.settings is not None:
        try:
            data = json.loads(args.settings.read_text(encoding="utf-8"))
            return Settings.model_validate(data)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read retrain settings file: {exc}") from None
    return load_settings(args.config, home=args.home)


def _failure_message(exc: BaseException) -> str:
    if isinstance(exc, TriageError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"{type(exc).__name__}: {exc.strerror or 'I/O error'}"
    return f"{type(exc).__name__}: {exc}"[:300]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m triage.training.worker")
    parser.add_argument("--run-id", type=int, required=True, help="the running retrain_runs row")
    parser.add_argument("--settings", type=Path, default=None, help="settings JSON file")
    parser.add_argument("--config", type=Path, default=None, help="YAML configuration file")
    parser.add_argument("--home", type=Path, default=None, help="state directory")
    args = parser.parse_args(argv)
    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    from triage.telemetry.logs import JsonFormatter, event

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.getLogger().addHandler(handler)
    logging.getLogger("triage").setLevel(settings.log.level)
    signal.signal(signal.SIGTERM, _on_sigterm)

    import torch
    from monai.data import set_track_meta

    from triage.store import db as store
    from triage.training.pipeline import run_retrain
    from triage.training.runs import finish_run, set_pid

    os.nice(settings.retrain.nice)
    torch.set_num_threads(settings.retrain.threads)
    set_track_meta(False)
    db = store.connect(settings.database())
    try:
        row = db.execute("SELECT state FROM retrain_runs WHERE id = ?", [args.run_id]).fetchone()
        if row is None or row[0] != "running":
            print(f"retrain run {args.run_id} is not running", file=sys.stderr)
            return 2
        set_pid(db, args.run_id, os.getpid())
        event(log, "retrain_started", run_id=args.run_id, pid=os.getpid())
        try:
            state = run_retrain(settings, db, args.run_id)
        except (Exception, Cancelled) as exc:
            message = "cancelled" if isinstance(exc, Cancelled) else _failure_message(exc)
            if db.conn.in_transaction:
                db.execute("ROLLBACK")
            with store.transaction(db):
                finish_run(db, args.run_id, "failed", message)
            event(log, "retrain_failed", logging.ERROR, run_id=args.run_id, reason=message)
            return 1
        event(log, "retrain_finished", run_id=args.run_id, state=state)
        return 0
    finally:
        db.close()
        if args.settings is not None:
            args.settings.unlink(missing_ok=True)


if __name__ == "__main__":
    raise SystemExit(main())
