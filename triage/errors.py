"""Typed errors. Each carries a message fit to show a user: no PHI, no traceback."""


class TriageError(Exception):
    """Base class: ``str(error)`` is safe to print, log and return over HTTP."""


class ConfigError(TriageError):
    """A configuration key is unknown or its value is invalid; the CLI exits with status 2."""


class DicomRejected(TriageError):
    """A file cannot be accepted as a usable DICOM instance.

    Attributes:
        code: Stable reason code, also the ``reason`` label of the quarantine metric.
        reason: The reason in words, for the quarantine sidecar and the logs.
        detail: Library message with PHI values redacted, for the sidecar only.
    """

    def __init__(self, code: str, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.detail = detail
