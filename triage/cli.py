"""The ``triage`` command: ``serve`` and ``status`` (more come with later features).

Exit status: 0 success, 1 runtime failure (message on stderr), 2 bad configuration or
usage. Errors are one line each; no traceback reaches the user.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from triage import __version__
from triage.config import Settings, load_settings
from triage.errors import ConfigError, TriageError

EXIT_RUNTIME = 1
EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args.config, home=args.home)
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
    except TriageError as exc:
        print(f"triage: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except OSError as exc:
        print(f"triage: {exc.strerror or exc} ({exc.filename or ''})", file=sys.stderr)
        return EXIT_RUNTIME
    return EXIT_CONFIG


def _status(settings: Settings, as_json: bool) -> int:
    from triage.status import collect_status, format_status

    status = collect_status(settings)
    print(json.dumps(status, indent=2) if as_json else format_status(status))
    return 0


def _models(settings: Settings, args: argparse.Namespace) -> int:
    from triage import db as store
    from triage.registry import ModelRegistry

    db = store.connect(settings.path("database"))
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
        entry = registry.promote(args.version, note="promoted by an admin")
        print(f"{entry.version} {entry.status}")
        return 0
    finally:
        db.close()


def _serve(settings: Settings, host: str | None, port: int | None) -> int:
    import uvicorn

    from triage.api.app import create_app
    from triage.daemon import Daemon
    from triage.logs import setup_logging

    setup_logging(
        settings.log.level,
        settings.path("logs"),
        settings.log.file_max_bytes,
        settings.log.file_backups,
    )
    daemon = Daemon(settings)
    daemon.start()
    try:
        config = uvicorn.Config(
            create_app(daemon),
            host=host or settings.server.host,
            port=settings.server.port if port is None else port,
            log_config=None,
            access_log=False,
        )
        server = uvicorn.Server(config)
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
