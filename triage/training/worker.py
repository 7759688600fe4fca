"""The training process: ``python -m triage.training.worker --run-id N --settings FILE``.

Started by :class:`triage.training.scheduler.RetrainScheduler` (daemon or `triage retrain`)
after it inserted the `running` row N, so ingestion, scoring and the web server keep their
cores and their GIL. The settings travel as a JSON file written by the scheduler (the
daemon's exact configuration, environment overrides included); ``--config``/``--home``
work too. The process lowers its priority, uses `retrain.threads` torch threads, logs
JSON lines to stderr (the scheduler sends them to ``<logs>/retrain.log``) and ends the
run row: `promoted`, `rejected`, `succeeded`, or `failed` with the reason (also on
SIGTERM). Exit status 0 unless the run failed (1) or the arguments were bad (2).

With `retrain.nproc` > 1 the scheduler starts it under torchrun
(`triage.training.distributed`), once per rank. Rank 0 is the process above (its row's
pid is the launcher's, which forwards SIGTERM to every rank); the other ranks never open
the store: they train their share of each batch rank 0 sends them and exit 0, or 1 when
the group broke (rank 0 records why the run failed).
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


_ending = False  # the run's end is being recorded: a later SIGTERM must not interrupt it


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    if not _ending:
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
    global _ending
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
    _ending = False
    signal.signal(signal.SIGTERM, _on_sigterm)

    import torch
    from monai.data import set_track_meta

    from triage.store import db as store
    from triage.training import distributed
    from triage.training.pipeline import run_retrain
    from triage.training.runs import finish_run, set_pid

    world = distributed.launched_world()
    if world > 1:
        distributed.die_with_launcher()
    os.nice(settings.retrain.nice)
    torch.set_num_threads(settings.retrain.threads)
    set_track_meta(False)
    if world > 1 and int(os.environ["RANK"]) > 0:
        return _follow(settings)
    shard = None
    db = store.connect(settings.database())
    try:
        row = db.execute("SELECT state FROM retrain_runs WHERE id = ?", [args.run_id]).fetchone()
        if row is None or row[0] != "running":
            print(f"retrain run {args.run_id} is not running", file=sys.stderr)
            return 2
        pid = os.getppid() if world > 1 else os.getpid()  # under torchrun: the launcher
        set_pid(db, args.run_id, pid)
        event(log, "retrain_started", run_id=args.run_id, pid=pid, processes=world)
        try:
            shard = distributed.join()  # every rank has read the settings file by now
            if args.settings is not None:
                # read once: gone now, so a worker killed later (in the rescoring after a
                # promotion) leaves nothing for the scheduler's next check to remove
                args.settings.unlink(missing_ok=True)
            state = run_retrain(settings, db, args.run_id, shard)
        except (Exception, Cancelled) as exc:
            _ending = True  # first: a SIGTERM arriving now must not skip the record
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
        distributed.leave(shard)
        if args.settings is not None:
            args.settings.unlink(missing_ok=True)


def _follow(settings) -> int:
    """A rank other than 0 under torchrun: train what rank 0 sends; 0 once it released
    this rank, 1 when the group broke or SIGTERM came (rank 0 records the run)."""
    from triage.telemetry.logs import event
    from triage.training import distributed
    from triage.training.train import follow

    rank = int(os.environ["RANK"])
    shard = None
    try:
        shard = distributed.join()
        jobs = follow(shard, settings.model, settings.retrain)
    except (Exception, Cancelled) as exc:
        reason = "cancelled" if isinstance(exc, Cancelled) else _failure_message(exc)
        event(log, "retrain_rank_stopped", logging.WARNING, rank=rank, reason=reason)
        return 1
    finally:
        distributed.leave(shard)
    event(log, "retrain_rank_finished", logging.DEBUG, rank=rank, trainings=jobs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
