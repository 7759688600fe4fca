"""The ``triage`` command: ``serve`` and ``status`` (more come with later features).

Exit status: 0 success, 1 runtime failure (message on stderr), 2 bad configuration or
usage. Errors are one line each; no traceback reaches the user.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path

from triage import __version__
from triage.config import Settings, load_settings
from triage.errors import ConfigError, TriageError
from triage.store import db as store

EXIT_RUNTIME = 1
EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    from triage.review.auth import ROLES

    parser = argparse.ArgumentParser(
        prog="triage", description="Decide which incoming DICOM studies a radiologist labels."
    )
    parser.add_argument("--version", action="version", version=f"triage {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", type=Path, default=None,
        help="YAML configuration file (default: embedded defaults)",
    )
    common.add_argument(
        "--home", type=Path, default=None,
        help="state directory for inbox, archive, quarantine, database, models, logs "
        "(overrides TRIAGE_HOME and home: in the config)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", parents=[common], help="run the daemon and its HTTP server")
    serve.add_argument("--host", default=None, help="bind address (default: server.host)")
    serve.add_argument("--port", type=int, default=None, help="port (default: server.port)")
    serve.add_argument(
        "--roles", default=None,
        help="comma-separated loops to run: receiver, ingest, score, review, retrain "
        "(default: replica.roles, all of them)",
    )
    status = sub.add_parser("status", parents=[common], help="counts of files and studies")
    status.add_argument("--json", action="store_true", help="print JSON")
    models = sub.add_parser("models", help="the model registry (admins)")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    listing = models_sub.add_parser("list", parents=[common], help="all versions")
    listing.add_argument("--json", action="store_true", help="print JSON")
    add = models_sub.add_parser(
        "import", parents=[common], help="add a checkpoint file as a new candidate version"
    )
    add.add_argument("checkpoint", type=Path, help="file written by triage's save_checkpoint")
    add.add_argument("--promote", action="store_true", help="make it the serving model")
    promote = models_sub.add_parser("promote", parents=[common], help="serve a version")
    promote.add_argument("version")
    show = models_sub.add_parser("show", parents=[common], help="one version in full")
    show.add_argument("version")
    show.add_argument("--json", action="store_true", help="print JSON")
    models_sub.add_parser(
        "rollback", parents=[common], help="serve the previously promoted version again"
    )
    retrain = sub.add_parser(
        "retrain", parents=[common], help="train a candidate model now (one run at a time)"
    )
    retrain.add_argument(
        "--background", action="store_true", help="start the run and return at once"
    )
    token = sub.add_parser("token", help="API tokens (admins)")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    create = token_sub.add_parser("create", parents=[common], help="create a token")
    create.add_argument("--role", required=True, choices=ROLES)
    create.add_argument("--name", required=True, help="who will use it, e.g. 'Dr Smith'")
    revoke = token_sub.add_parser("revoke", parents=[common], help="revoke a token by id")
    revoke.add_argument("token_id", type=int)
    token_sub.add_parser("list", parents=[common], help="tokens (never their secrets)")
    trail = sub.add_parser("audit", parents=[common], help="print the audit trail")
    trail.add_argument("--since", default="24h",
                       help="ISO date/time (UTC) or a duration like 90m, 24h, 7d (default 24h)")
    trail.add_argument("--json", action="store_true", help="print JSON lines")
    replay = sub.add_parser(
        "replay", parents=[common],
        help="stream a labelled image set into a daemon; an oracle labels what it routes",
    )
    from triage.replay.commands import add_arguments as replay_arguments

    replay_arguments(replay)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    environ = None
    if getattr(args, "roles", None) is not None:  # `serve --roles`, as replica.roles
        roles = [role.strip() for role in args.roles.split(",") if role.strip()]
        environ = {**os.environ, "TRIAGE__REPLICA__ROLES": json.dumps(roles)}
    try:
        settings = load_settings(args.config, home=args.home, environ=environ)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    try:
        if args.command == "serve":
            return _serve(settings, args.host, args.port)
        if args.command == "status":
            return _status(settings, args.json)
        if args.command == "models":
            return _models(settings, args)
        if args.command == "retrain":
            from triage.training.commands import run_retrain_command

            return run_retrain_command(settings, background=args.background)
        if args.command == "token":
            return _token(settings, args)
        if args.command == "audit":
            return _audit(settings, args)
        if args.command == "replay":
            from triage.replay.commands import run_replay_command

            return run_replay_command(settings, args)
    except ConfigError as exc:
        print(f"triage: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except TriageError as exc:
        print(f"triage: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except OSError as exc:
        print(f"triage: {exc.strerror or exc} ({exc.filename or ''})", file=sys.stderr)
        return EXIT_RUNTIME
    except store.DATABASE_ERRORS as exc:
        print(f"triage: {store.explain(exc, settings.database())}", file=sys.stderr)
        return EXIT_RUNTIME
    return EXIT_CONFIG


def _status(settings: Settings, as_json: bool) -> int:
    from triage.ops.node import running_node
    from triage.ops.status import collect_status, format_status

    status = collect_status(settings)
    node = running_node(settings.home)
    if node is not None:  # what the running daemon serves, whatever this shell configures
        dicom = node.get("dicom")
        status["daemon"] = {"running": True, "pid": node.get("pid")}
        status["dicom"] = ({**dicom, "source": "daemon"} if isinstance(dicom, dict)
                           else {"port": None, "source": "daemon"})
    else:
        configured = settings.dicom
        status["daemon"] = {"running": False}
        status["dicom"] = {"port": configured.port, "host": configured.host,
                           "ae_title": configured.ae_title, "source": "config"}
    if as_json:
        print(json.dumps(status, indent=2))
        return 0
    print(format_status(status))
    dicom = status["dicom"]
    where = (f"running daemon, pid {status['daemon']['pid']}" if node is not None
             else "configured; no daemon running on this state directory")
    print(f"dicom node: {dicom['ae_title']} at {dicom['host']}:{dicom['port']} ({where})"
          if dicom["port"] is not None else f"dicom node: off ({where})")
    return 0


def _models(settings: Settings, args: argparse.Namespace) -> int:
    from triage.model.registry import ModelRegistry

    db = store.connect(settings.database())
    try:
        registry = ModelRegistry(db, settings.path("models"), settings.model)
        if args.models_command == "list":
            versions = [entry.to_json() for entry in registry.list()]
            if args.json:
                print(json.dumps(versions, indent=2))
            elif not versions:
                print("no model versions yet: the gate routes studies as cold_start")
            for entry in [] if args.json else versions:
                print(f"{entry['version']:<8} {entry['status']:<10} {entry['created_at']}  "
                      f"{entry['source']}")
            return 0
        if args.models_command == "import":
            entry = registry.add(args.checkpoint, source=f"import:{args.checkpoint.name}")
            if args.promote:
                entry = registry.promote(entry.version, note="promoted at import")
            print(f"{entry.version} {entry.status}")
            return 0
        if args.models_command in ("show", "rollback"):
            from triage.training.commands import models_rollback, models_show

            if args.models_command == "show":
                code = models_show(registry, args.version, args.json)
                if not args.json:  # the JSON has `operating_point` (registry.show)
                    _print_operating_point(registry.show(args.version)["operating_point"],
                                           settings.model.labels)
                return code
            return models_rollback(registry)
        entry = registry.promote(args.version, note="promoted by an admin")
        print(f"{entry.version} {entry.status}")
        return 0
    finally:
        db.close()


def _print_operating_point(point: dict | None, labels: list[str]) -> None:
    """One line for `models show`: the stored temperature and threshold, if any."""
    if not point:
        return
    temperature = f"temperature {point['temperature']:.3f}"
    if point.get("threshold") is None or len(labels) != 2:
        print(f"operating point: argmax, {temperature}")
    else:
        print(f"operating point: {labels[1]} when P({labels[1]}) >= {point['threshold']:.3f}, "
              f"{temperature}")


def _token(settings: Settings, args: argparse.Namespace) -> int:
    from triage.review import audit
    from triage.review.auth import create_token, list_tokens, revoke_token
    from triage.store.db import transaction

    db = store.connect(settings.database())
    try:
        if args.token_command == "create":
            token_id, secret = create_token(db, name=args.name, role=args.role)
            with transaction(db):
                audit.record(db, actor="cli", role="admin", action="token_create",
                             detail={"token_id": token_id, "name": args.name, "role": args.role})
            print(f"token {token_id} for {args.name} ({args.role}); shown once, keep it safe:")
            print(secret)
        elif args.token_command == "revoke":
            who = revoke_token(db, args.token_id)
            with transaction(db):
                audit.record(db, actor="cli", role="admin", action="token_revoke",
                             detail={"token_id": who.token_id, "name": who.name})
            print(f"token {who.token_id} ({who.name}, {who.role}) revoked")
        else:
            for row in list_tokens(db):
                state = "revoked" if row["revoked_at"] else "active"
                print(f"{row['id']:>4}  {row['role']:<12} {state:<8} {row['name']}")
        return 0
    finally:
        db.close()


def _audit(settings: Settings, args: argparse.Namespace) -> int:
    from triage.review import audit

    start = _parse_since(args.since)
    db = store.connect(settings.database())
    try:
        for row in audit.since(db, start):
            if args.json:
                print(json.dumps(row))
            else:
                where = f" study {row['study_id']}" if row["study_id"] is not None else ""
                print(f"{row['at']}  {row['actor']} ({row['role'] or '-'}) {row['action']}"
                      f"{where} from {row['address'] or '-'} model {row['model_version'] or '-'}"
                      f"{'  ' + json.dumps(row['detail']) if row['detail'] else ''}")
        return 0
    finally:
        db.close()


def _parse_since(text: str) -> float:
    import re
    import time
    from datetime import UTC, datetime

    match = re.fullmatch(r"(\d+)([mhd])", text.strip())
    if match:
        return time.time() - int(match[1]) * {"m": 60, "h": 3600, "d": 86400}[match[2]]
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"--since: expected an ISO date/time or 90m/24h/7d, got {text!r}"
        ) from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _note_stop_signal(signum: int, _frame: object) -> None:
    from triage.telemetry.logs import event

    event(logging.getLogger("triage.cli"), "stop_signal", signal=signal.Signals(signum).name)


def _serve(settings: Settings, host: str | None, port: int | None) -> int:
    import uvicorn

    from triage.api.app import create_app
    from triage.api.transport import server_transport
    from triage.daemon import Daemon
    from triage.telemetry.logs import setup_logging

    host = host or settings.server.host
    setup_logging(
        settings.log.level,
        settings.path("logs"),
        settings.log.file_max_bytes,
        settings.log.file_backups,
    )
    tls = server_transport(settings, host)  # refused before the daemon takes the lock
    daemon = Daemon(settings)
    daemon.start()
    try:
        config = uvicorn.Config(
            create_app(daemon),
            host=host,
            port=settings.server.port if port is None else port,
            log_config=None,
            access_log=False,
            **tls,
        )
        server = uvicorn.Server(config)
        # uvicorn shuts down on SIGTERM/SIGINT, restores the handlers it found and raises
        # the signal again. With the default handlers that kills the process before the
        # `finally` below, so the daemon's orderly stop (receiver first, then the loops
        # after the file or study in hand) would never run: record the signal instead.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, _note_stop_signal)
        try:
            server.run()
        except SystemExit:
            logging.getLogger("triage.cli").error("http_server_failed")
            return EXIT_RUNTIME
        if not server.started:
            print("triage: the HTTP server could not start (is the port in use?)", file=sys.stderr)
            return EXIT_RUNTIME
    finally:
        daemon.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
