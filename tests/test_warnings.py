"""The suite runs free of deprecation warnings from the project's own code: Starlette's
TestClient is on its supported transport (httpx2; over plain httpx it warns that this is
deprecated), and pyproject's filterwarnings turns such warnings into errors."""

from __future__ import annotations

import subprocess
import sys

import starlette.testclient


def test_the_test_client_runs_on_httpx2_without_a_deprecation_warning() -> None:
    assert starlette.testclient.httpx.__name__ == "httpx2"
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", "import fastapi.testclient"],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_starlette_deprecations_fail_the_suite(pytestconfig) -> None:
    filters = pytestconfig.getini("filterwarnings")
    assert "error::starlette.exceptions.StarletteDeprecationWarning" in filters
    assert "error::DeprecationWarning:triage" in filters
    # later entries win: the project's own deprecations are errors, not ignored
    assert filters.index("error::DeprecationWarning:triage") > filters.index(
        "ignore::DeprecationWarning")
