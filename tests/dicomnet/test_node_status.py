"""`triage status` reports the DICOM node the running daemon serves, not the calling
shell's configuration (issue 23, item 4)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from conftest import REPO
from dicomnet_helpers import DicomDaemon


def _status(proc: DicomDaemon, **env: str) -> dict:
    """`triage status --json` on the daemon's home from a shell configured otherwise."""
    shell = {**os.environ, "TRIAGE_HOME": str(proc.home), **env}
    result = subprocess.run(
        [sys.executable, "-m", "triage", "status", "--json", "--config",
         str(REPO / "config.yaml")], env=shell, capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def test_status_reports_the_running_daemons_node(tmp_path: Path) -> None:
    proc = DicomDaemon(tmp_path / "home", {"TRIAGE__DICOM__AE_TITLE": "TRIAGE_LIVE"}).start()
    try:
        # this shell would configure another port and AE title: the answer is the daemon's
        status = _status(proc, TRIAGE__DICOM__PORT="11199")
        assert status["daemon"] == {"running": True, "pid": proc.proc.pid}
        assert status["dicom"] == {"ae_title": "TRIAGE_LIVE", "host": "127.0.0.1",
                                   "port": proc.dicom_port, "source": "daemon"}
        text = proc.cli("status").stdout
        assert f"TRIAGE_LIVE at 127.0.0.1:{proc.dicom_port} (running daemon, pid " in text
    finally:
        assert proc.stop(signal.SIGTERM) == 0
    # stopped cleanly: the file is gone and the configured node is reported as such
    assert not (proc.home / "triage.node.json").exists()
    status = _status(proc, TRIAGE__DICOM__PORT="11199")
    assert status["daemon"] == {"running": False}
    assert status["dicom"]["port"] == 11199 and status["dicom"]["source"] == "config"


def test_a_killed_daemons_node_file_is_not_believed(tmp_path: Path) -> None:
    proc = DicomDaemon(tmp_path / "home", {}).start()
    assert _status(proc)["dicom"]["source"] == "daemon"
    proc.stop(signal.SIGKILL)
    assert (proc.home / "triage.node.json").exists()  # left behind by the kill
    status = _status(proc, TRIAGE__DICOM__PORT="null")
    assert status["daemon"] == {"running": False}
    assert status["dicom"]["port"] is None and status["dicom"]["source"] == "config"


def test_status_loads_no_model_code(tmp_path: Path) -> None:
    """`triage status` reads files and the store only: no torch, no MONAI, so it answers
    in about half a second (an admin's first command, and what every wait on a daemon in
    these tests polls)."""
    probe = (
        "import sys; from triage.cli import main; "
        f"code = main(['status', '--json', '--config', {str(REPO / 'config.yaml')!r}, "
        f"'--home', {str(tmp_path / 'home')!r}]); "
        "heavy = sorted(m for m in ('torch', 'monai', 'triage.daemon') if m in sys.modules); "
        "print('LOADED', heavy); sys.exit(code)"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True)
    assert "LOADED []" in result.stdout, result.stdout
