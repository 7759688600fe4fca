"""Structured logs: one JSON object per line, to stderr and a rotating file.

Call sites log an event name and fields through :func:`event`; fields carry internal ids
(file id, study id), reason codes and timings, never PHI, UIDs or file names.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
import time
import warnings
from pathlib import Path
from typing import Any

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message"}


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON line: ts, level, logger, event, then the fields."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                payload[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            # The type only: messages and tracebacks can quote DICOM values.
            payload["error_type"] = record.exc_info[0].__name__
        return json.dumps(payload, default=str)


def setup_logging(level: str, log_dir: Path | None, max_bytes: int, backups: int) -> None:
    """Send the ``triage`` loggers (and uvicorn's) to stderr and ``log_dir/triage.log``."""
    # A record that cannot be written (disk full under the log file or the redirected
    # stderr) is dropped: by default logging prints a traceback for each one instead,
    # quoting the record, to the very stream that failed.
    logging.raiseExceptions = False
    formatter = JsonFormatter()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(
            logging.handlers.RotatingFileHandler(
                log_dir / "triage.log", maxBytes=max_bytes, backupCount=backups
            )
        )
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("triage").setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    # pydicom's warnings and log lines quote element values (names, dates): never emit them.
    logging.getLogger("pydicom").disabled = True
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log event ``name`` with ``fields`` as JSON keys."""
    logger.log(level, name, extra=fields)
