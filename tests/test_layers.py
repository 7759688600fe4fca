"""The import-linter contract in pyproject.toml: it holds, it names every package, and it
breaks when an import runs against the flow (shown on a planted import in a copy of the
package; the working tree is never touched)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).parent / "lint-imports"


def _contracts() -> dict[str, dict]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {contract["id"]: contract for contract in config["contracts"]}


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    """lint-imports on the `triage` package and pyproject.toml found under `root`."""
    assert LINT.exists(), f"{LINT} missing: install the test extras (pip install -e '.[test]')"
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300,
    )


def test_every_package_is_in_one_layer() -> None:
    """No module escapes the contract: each one under triage/ is named in exactly one
    layer, so removing a layer (or adding a package without one) fails here."""
    named = [
        name.strip().removeprefix("triage.")
        for layer in _contracts()["layers"]["layers"]
        for name in layer.split("|")
    ]
    present = sorted(
        path.stem if path.is_file() else path.name
        for path in (REPO / "triage").iterdir()
        if (path.suffix == ".py" and path.name != "__init__.py")
        or (path.is_dir() and (path / "__init__.py").exists())
    )
    assert sorted(named) == present


def test_top_level_holds_only_the_entry_points() -> None:
    modules = sorted(path.name for path in (REPO / "triage").glob("*.py"))
    assert modules == ["__init__.py", "__main__.py", "cli.py", "config.py", "daemon.py",
                       "errors.py"]


def test_contract_holds() -> None:
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(
    ("path", "line", "reason"),
    [
        (None, None, "the copy, untouched, passes"),
        ("model/registry.py", "import triage.gate.scorer", "model imports a stage"),
        ("store/db.py", "import triage.ingest.ingestor", "store imports a stage"),
        ("telemetry/logs.py", "import triage.store.db", "telemetry imports the store"),
        ("ingest/scope.py", "import triage.review.queue", "two sibling stages"),
        ("gate/budget_gate.py", "import triage.training.runs", "against the named direction"),
        ("training/scheduler.py", "import triage.ingest.assembly", "a stage not named"),
        ("ingest/watcher.py", "import triage.config", "a stage loads the configuration"),
        ("api/review.py", "import triage.cli", "the API imports the CLI"),
    ],
)
def test_an_upward_import_breaks_the_contract(
    tmp_path: Path, path: str | None, line: str | None, reason: str
) -> None:
    shutil.copytree(REPO / "triage", tmp_path / "triage",
                    ignore=shutil.ignore_patterns("__pycache__", "static"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    if path is not None:
        target = tmp_path / "triage" / path
        target.write_text(target.read_text() + f"\n{line}  # planted: {reason}\n")
    result = _lint(tmp_path)
    if path is None:
        assert result.returncode == 0, result.stdout + result.stderr
        return
    assert result.returncode != 0, f"{reason}: {line} in {path} was not caught\n{result.stdout}"
    assert "BROKEN" in result.stdout
    planted_module = "triage." + path.removesuffix(".py").replace("/", ".")
    assert planted_module in result.stdout, result.stdout
