"""The parts of bench/faults.py (the runner): ``rig``, ``invariants``, ``kills``,
``damage`` and ``common``. Importing the package puts the repository (for ``triage``)
and tests/ (for ``faults_support``, the invariants shared with the tests) on sys.path."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
for _path in (REPO, REPO / "tests"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
