"""The oracle reader: labels routed studies with their truth through the review API.

It behaves like a radiologist with a token: ``POST /api/queue/next`` claims the next
study in the queue's own order, ``GET /api/studies/{id}`` opens it (audited as a view),
an optional delay stands for reading time, and ``POST /api/studies/{id}/label`` answers.
The truth is found through the StudyInstanceUID the replay wrote (``studies.study_uid``,
read from the daemon's SQLite file read-only). Studies that are not the replay's are
never labelled: they are released, and the oracle claims its own by id instead.

Label noise: with probability ``noise`` the answer is another class, drawn uniformly
(seeded), and the oracle records which answers were flipped.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np

from triage.errors import TriageError


class OracleError(TriageError):
    """The oracle cannot go on (bad token, daemon gone)."""


@dataclass
class OracleLabel:
    study_id: int
    study_uid: str
    truth: str
    label: str
    noisy: bool
    at: float
    status: int


def noisy_label(truth: int, n_classes: int, noise: float, rng: np.random.Generator) -> int:
    """``truth``, or with probability ``noise`` another class drawn uniformly."""
    if n_classes < 2 or noise <= 0 or rng.random() >= noise:
        return truth
    other = int(rng.integers(n_classes - 1))
    return other + 1 if other >= truth else other


class Oracle:
    """A reader thread; ``truth`` maps StudyInstanceUID to class index."""

    def __init__(self, url: str, token: str, db_path: Path, truth: dict[str, int],
                 class_names: list[str], *, delay: float = 0.0, noise: float = 0.0,
                 seed: int = 0, poll: float = 0.25, view: bool = True) -> None:
        if not 0 <= noise <= 1:
            raise ValueError("label noise must be within [0, 1]")
        self.client = httpx.Client(base_url=url, timeout=30,
                                   headers={"Authorization": f"Bearer {token}"})
        self.db_path = db_path
        self.truth = truth
        self.names = class_names
        self.delay = delay
        self.noise = noise
        self.rng = np.random.default_rng(seed)
        self.poll = poll
        self.view = view
        self.labels: list[OracleLabel] = []
        self.conflicts = 0
        self.foreign: set[int] = set()
        self.error: BaseException | None = None
        self.idle = True  # nothing claimable at the last look
        self._uids: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- thread -------------------------------------------------------------------------
    def start(self) -> Oracle:
        self.check_token()
        self._thread = threading.Thread(target=self._run, name="replay-oracle", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.client.close()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self.step():
                    self.idle = True
                    self._stop.wait(self.poll)
        except BaseException as exc:  # reported by the caller
            self.error = exc

    # -- one action ---------------------------------------------------------------------
    def check_token(self) -> None:
        answer = self._request("GET", "/api/me")
        if answer.json().get("role") not in ("radiologist", "admin"):
            raise OracleError("the oracle's token must have the radiologist (or admin) role")

    def step(self) -> bool:
        """Claim and label one study of ours; False when there is none to take."""
        answer = self._request("POST", "/api/queue/next")
        if answer.status_code == 204:
            return False
        study_id = int(answer.json()["study_id"])
        if self._uid(study_id) not in self.truth:
            self.foreign.add(study_id)
            self._request("POST", f"/api/studies/{study_id}/release", ok=(200, 409))
            study_id = self._claim_own()
            if study_id is None:
                return False
        self.idle = False
        self.label(study_id)
        return True

    def label(self, study_id: int) -> OracleLabel:
        """Label a study this oracle holds the lease of."""
        uid = self._uid(study_id)
        if self.view:
            self._request("GET", f"/api/studies/{study_id}")
        if self.delay > 0:
            self._stop.wait(self.delay)
        truth = self.truth[uid]
        given = noisy_label(truth, len(self.names), self.noise, self.rng)
        answer = self._request("POST", f"/api/studies/{study_id}/label",
                               json={"label": self.names[given], "comment": "replay oracle"},
                               ok=(201, 409))
        if answer.status_code == 409:
            self.conflicts += 1
        record = OracleLabel(study_id, uid, self.names[truth], self.names[given],
                             given != truth, time.time(), answer.status_code)
        self.labels.append(record)
        return record

    def summary(self) -> dict:
        stored = [r for r in self.labels if r.status == 201]
        return {
            "labels": len(stored),
            "noisy": sum(r.noisy for r in stored),
            "realised_noise_rate": (sum(r.noisy for r in stored) / len(stored)) if stored else None,
            "noise_rate": self.noise,
            "delay_seconds": self.delay,
            "conflicts": self.conflicts,
            "foreign_studies_skipped": len(self.foreign),
            "by_truth": {n: sum(r.truth == n for r in stored) for n in self.names},
        }

    def records(self) -> list[dict]:
        return [asdict(r) for r in self.labels]

    # -- helpers ------------------------------------------------------------------------
    def _claim_own(self) -> int | None:
        """Claim the first pending study of ours by id (when others' studies are queued)."""
        items = self._request("GET", "/api/queue", params={"state": "pending", "limit": 1000})
        for item in items.json()["items"]:
            study_id = int(item["study_id"])
            if study_id in self.foreign or self._uid(study_id) not in self.truth:
                self.foreign.add(study_id)
                continue
            if self._request("POST", f"/api/studies/{study_id}/claim",
                             ok=(200, 409)).status_code == 200:
                return study_id
        return None

    def _uid(self, study_id: int) -> str:
        uid = self._uids.get(study_id)
        if uid is None:
            conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=30)
            try:
                row = conn.execute("SELECT study_uid FROM studies WHERE id = ?",
                                   [study_id]).fetchone()
            finally:
                conn.close()
            uid = self._uids[study_id] = row[0] if row else ""
        return uid

    def _request(self, method: str, path: str, ok: tuple[int, ...] = (200, 204),
                 **kwargs) -> httpx.Response:
        for attempt in range(5):
            try:
                answer = self.client.request(method, path, **kwargs)
                break
            except httpx.TransportError as exc:
                if attempt == 4:
                    raise OracleError(f"the daemon at {self.client.base_url} does not answer "
                                      f"({type(exc).__name__})") from None
                self._stop.wait(1.0)
        if answer.status_code in (401, 403):
            raise OracleError(f"{method} {path}: {answer.status_code} "
                              f"{answer.json().get('detail', '')} (check --token)")
        if answer.status_code not in ok:
            raise OracleError(f"{method} {path}: HTTP {answer.status_code} {answer.text[:200]}")
        return answer
