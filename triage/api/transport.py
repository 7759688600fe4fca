"""Whether `triage serve` may bind its address, and with which TLS files.

Bearer tokens, labels and (with ``review.show_phi``) patient names cross this server.
On loopback only local processes can listen in, and a TLS reverse proxy on the same
host is the usual way out. Any other address without TLS would send them in clear text
over the hospital network, so that start is refused, with one line naming the keys,
unless ``server.allow_plain_http`` says something else (a proxy on another host, an
isolated segment) protects it; then it is logged as a warning on every start.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

from triage.config import Settings
from triage.errors import ConfigError
from triage.telemetry.logs import event

log = logging.getLogger("triage.server")


def is_loopback(host: str) -> bool:
    """True for loopback addresses and ``localhost``; anything else (a name, ``0.0.0.0``,
    ``::``, the empty string) may be reachable from elsewhere."""
    if host.strip().lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False


def server_transport(settings: Settings, host: str) -> dict[str, str]:
    """uvicorn's TLS arguments for serving on ``host``: empty for plain HTTP.

    Raises:
        ConfigError: a non-loopback ``host`` without TLS files or
            ``server.allow_plain_http``, or a TLS file that cannot be read.
    """
    server = settings.server
    if server.ssl_certfile is not None and server.ssl_keyfile is not None:
        files = {"ssl_certfile": server.ssl_certfile, "ssl_keyfile": server.ssl_keyfile}
        resolved = {}
        for key, path in files.items():
            full = settings.home / path  # an absolute path stays as it is
            if not _readable(full):
                raise ConfigError(f"server.{key}: cannot read {full}")
            resolved[key] = str(full)
        return resolved
    if is_loopback(host):
        return {}
    if server.allow_plain_http:
        event(log, "plain_http_beyond_loopback", logging.WARNING, host=host,
              hint="tokens and labels cross the network in clear text unless a TLS "
                   "proxy protects this address")
        return {}
    raise ConfigError(
        f"refusing to serve plain HTTP on {host or 'all addresses'}: set "
        "server.ssl_certfile and server.ssl_keyfile, bind 127.0.0.1 behind a TLS proxy, "
        "or set server.allow_plain_http: true"
    )


def _readable(path: Path) -> bool:
    try:
        with path.open("rb"):
            return True
    except OSError:
        return False
