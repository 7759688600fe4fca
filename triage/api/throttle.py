"""Failed token attempts, throttled per client address.

Tokens are 32 random bytes, so guessing one is hopeless; the throttle is there so that a
misbehaving script or a scan cannot hammer the token lookup (each one a SQLite read) and
so that a stream of failures shows up as 429s and in ``triage_auth_failures_total``
instead of passing silently. After ``max_failures`` wrong tokens within
``window_seconds`` a client is refused (429, ``Retry-After``) *before* its token is
checked, whatever it sends: otherwise a right guess would still be told apart from a
wrong one. The window slides, so a client gets one more try as each failure ages out.

State is in memory and per process: a restart forgets it, which is fine for a brake.
Addresses are keys here only; they never reach a log line or a metric label.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable


class AuthThrottle:
    """Sliding-window count of failed token attempts per client address."""

    def __init__(self, max_failures: int, window_seconds: float,
                 clock: Callable[[], float] = time.monotonic, max_clients: int = 10_000) -> None:
        self.max_failures = max_failures
        self.window_seconds = window_seconds
        self._clock = clock
        self._max_clients = max_clients
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()  # sync routes run in a thread pool

    def __len__(self) -> int:
        return len(self._failures)

    def retry_after(self, client: str | None) -> int:
        """Whole seconds until ``client`` may try a token again; 0 when it may now."""
        with self._lock:
            now = self._clock()
            times = self._recent(client or "?", now)
            if times is None or len(times) < self.max_failures:
                return 0
            return max(1, math.ceil(times[0] + self.window_seconds - now))

    def failed(self, client: str | None) -> None:
        """Record one wrong token from ``client``."""
        with self._lock:
            now = self._clock()
            key = client or "?"
            times = self._recent(key, now)
            if times is None:
                if len(self._failures) >= self._max_clients:
                    self._forget(now)
                times = self._failures[key] = deque(maxlen=self.max_failures)
            times.append(now)

    def _recent(self, key: str, now: float) -> deque[float] | None:
        times = self._failures.get(key)
        if times is None:
            return None
        while times and times[0] <= now - self.window_seconds:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times

    def _forget(self, now: float) -> None:
        """Drop expired clients; if that is not enough, the longest-known ones."""
        for key in list(self._failures):
            self._recent(key, now)
        while len(self._failures) >= self._max_clients:
            del self._failures[next(iter(self._failures))]
