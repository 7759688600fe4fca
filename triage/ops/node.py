"""The files a running daemon keeps in its state directory, and how `triage status`
reads them without loading the daemon (no torch: the command answers in a second).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

LOCK_FILE = "triage.lock"
"""Held (flock) by the daemon running on a state directory; records its pid."""
NODE_FILE = "triage.node.json"
"""Written in the state directory while a daemon runs: its pid and the DICOM node it
actually serves (the environment of the shell that started it may differ from the one
that asks). Read by ``triage status``."""


def running_node(home: Path) -> dict[str, object] | None:
    """What the daemon running on `home` serves (its :data:`NODE_FILE`), or None when no
    daemon runs there. A file left by a killed daemon is ignored: its pid must be alive
    and hold the state directory's lock file (which records the holder's pid); the lock
    itself is not probed, so asking never races a daemon that is starting."""
    try:
        node = json.loads((home / NODE_FILE).read_text())
        holder = int((home / LOCK_FILE).read_text().strip() or 0)
    except (OSError, ValueError):
        return None
    if not isinstance(node, dict) or node.get("pid") != holder or holder <= 0:
        return None
    try:
        os.kill(holder, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's
    return node
