"""Web hardening: security headers on every answer, and failed token attempts throttled.

The browser half (header text rendered as text, no script runs) is in
test_review_web.py; the TLS bind guard of `triage serve` is in test_serve_tls.py.
"""

from __future__ import annotations

import signal
import time
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from conftest import FAST_ENV, DaemonProcess
from test_review_api import auth, make_token

from triage.api.throttle import AuthThrottle

STATIC = Path(__file__).resolve().parents[1] / "triage" / "api" / "static"


def _assert_hardened(response: httpx.Response) -> None:
    csp = response.headers.get("content-security-policy", "")
    directives = {part.split()[0]: part.split()[1:] for part in csp.split(";") if part.strip()}
    assert directives.get("frame-ancestors") == ["'none'"], csp
    assert directives.get("script-src") == ["'self'"], csp  # no inline, no eval
    assert "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp, csp
    assert directives.get("default-src") == ["'self'"], csp
    assert response.headers.get("x-content-type-options") == "nosniff"
    assert response.headers.get("referrer-policy") in ("no-referrer", "same-origin")


def test_ui_api_and_errors_send_the_security_headers(daemon: DaemonProcess) -> None:
    token = make_token(daemon, "radiologist", "Dr Headers")
    with httpx.Client(base_url=daemon.url, timeout=10) as client:
        answers = {
            "ui": client.get("/"),
            "status page": client.get("/status"),
            "script": client.get("/static/review.js"),
            "health": client.get("/healthz"),
            "metrics": client.get("/metrics"),
            "api": client.get("/api/me", headers=auth(token)),
            "401": client.get("/api/me"),
            "404": client.get("/api/studies/999999", headers=auth(token)),
            "no route": client.get("/nowhere"),
        }
    assert answers["api"].status_code == 200 and answers["401"].status_code == 401
    for name, response in answers.items():
        try:
            _assert_hardened(response)
        except AssertionError as exc:
            raise AssertionError(f"{name} ({response.request.url.path}): {exc}") from None


class _InlineFinder(HTMLParser):
    """Collects what a CSP without 'unsafe-inline' would block in a page."""

    def __init__(self) -> None:
        super().__init__()
        self.blocked: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = {name for name, _ in attrs}
        if tag == "script" and "src" not in names:
            self.blocked.append("inline <script>")
        if tag == "style":
            self.blocked.append("<style>")
        self.blocked += [f"{tag} {name}=" for name in names
                         if name.startswith("on") or name == "style"]
        if tag == "a" and any((v or "").startswith("javascript:") for _, v in attrs):
            self.blocked.append("javascript: link")


@pytest.mark.parametrize("page", sorted(p.name for p in STATIC.glob("*.html")))
def test_static_pages_hold_nothing_inline(page: str) -> None:
    finder = _InlineFinder()
    finder.feed((STATIC / page).read_text(encoding="utf-8"))
    assert finder.blocked == []


def test_throttle_counts_failures_per_client_in_a_sliding_window() -> None:
    now = [1000.0]
    throttle = AuthThrottle(max_failures=3, window_seconds=60, clock=lambda: now[0])
    for _ in range(3):
        assert throttle.retry_after("10.0.0.1") == 0
        throttle.failed("10.0.0.1")
    assert throttle.retry_after("10.0.0.1") == 60
    assert throttle.retry_after("10.0.0.2") == 0, "another client is not held back"
    now[0] += 59.5
    assert throttle.retry_after("10.0.0.1") == 1, "Retry-After rounds up"
    now[0] += 0.5
    assert throttle.retry_after("10.0.0.1") == 0, "the window slid past the failures"


def test_throttle_forgets_clients_beyond_its_bound() -> None:
    now = [0.0]
    throttle = AuthThrottle(max_failures=1, window_seconds=60, clock=lambda: now[0],
                            max_clients=100)
    for i in range(1000):
        throttle.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(throttle) <= 100
    assert throttle.retry_after("10.0.3.231") == 60, "the latest clients are kept"


def test_failed_tokens_are_throttled_with_429_and_counted(tmp_path: Path) -> None:
    env = {**FAST_ENV, "TRIAGE__SERVER__AUTH_MAX_FAILURES": "3",
           "TRIAGE__SERVER__AUTH_FAILURE_WINDOW_SECONDS": "3"}
    proc = DaemonProcess(tmp_path / "home", env, []).start()
    try:
        good = make_token(proc, "radiologist", "Dr Good")
        guess = "trg_guessed-secret-value"
        with httpx.Client(base_url=proc.url, timeout=10) as client:
            assert client.get("/api/me").status_code == 401  # no token: not a guess
            for _ in range(3):
                assert client.get("/api/me", headers=auth(guess)).status_code == 401
            refused = client.get("/api/me", headers=auth(guess))
            assert refused.status_code == 429, refused.text
            assert 1 <= int(refused.headers["retry-after"]) <= 3
            assert "detail" in refused.json()
            # held back whatever it sends: a right guess must not be told apart
            assert client.get("/api/me", headers=auth(good)).status_code == 429
            assert client.get("/healthz").status_code == 200  # the open route stays open
            metrics = client.get("/metrics").text
            time.sleep(int(refused.headers["retry-after"]) + 0.2)
            assert client.get("/api/me", headers=auth(good)).status_code == 200
        samples = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
                   if line.startswith("triage_auth_failures_total")}
        assert samples['triage_auth_failures_total{reason="unknown"}'] == 3
        assert samples['triage_auth_failures_total{reason="missing"}'] == 1
        assert samples['triage_auth_failures_total{reason="throttled"}'] == 2
        assert guess not in metrics and "127.0.0.1" not in metrics
    finally:
        proc.stop(signal.SIGKILL)


class _References(HTMLParser):
    """The URLs a page loads script and style from, and its inline script bodies."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "script":
            self._in_script = "src" not in values
            if values.get("src"):
                self.urls.append(values["src"])
        if tag == "link" and values.get("href"):
            self.urls.append(values["href"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline.append(data)


def test_api_docs_are_served_from_packaged_assets_under_the_csp(daemon: DaemonProcess) -> None:
    """/docs (Swagger UI): the page, its scripts and styles all come from this server (no
    CDN), nothing inline, and every answer has the app's CSP; in Chromium it renders the
    schema with no CSP violation and no off-host request. /redoc stays off (ReDoc needs
    inline styles, see triage/api/docs.py), and /docs-assets serves nothing else."""
    from triage.api.security import CONTENT_SECURITY_POLICY

    with httpx.Client(base_url=daemon.url, timeout=10) as client:
        for path in ("/docs",):
            page = client.get(path)
            assert page.status_code == 200 and "text/html" in page.headers["content-type"]
            assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
            _assert_hardened(page)
            refs = _References()
            refs.feed(page.text)
            assert refs.inline == [], (path, refs.inline)
            finder = _InlineFinder()
            finder.feed(page.text)
            assert finder.blocked == [], (path, finder.blocked)
            assert refs.urls and "://" not in page.text and "//cdn" not in page.text
            for url in refs.urls:
                assert url.startswith("/") and not url.startswith("//"), (path, url)
                asset = client.get(url)
                assert asset.status_code == 200, (path, url)
                assert asset.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
                kind = "css" if url.endswith(".css") else "javascript"
                assert kind in asset.headers["content-type"], (url, asset.headers)
                assert len(asset.content) > 100, url
        assert client.get("/redoc").status_code == 404
        for hidden in ("redoc.standalone.js", "favicon.png", "..%2Fcore.py", "%2E%2E/core.py"):
            assert client.get(f"/docs-assets/{hidden}").status_code == 404, hidden
        schema = client.get("/openapi.json")
        assert schema.status_code == 200 and schema.json()["info"]["title"] == "triage"

    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip("/usr/bin/chromium not found (make test installs the Debian package)")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(chromium), args=["--no-sandbox", "--disable-gpu"])
        try:
            for path, ready in (("/docs", ".swagger-ui .info .title"),):
                page = browser.new_page()
                requests: list[str] = []
                problems: list[str] = []
                page.on("request", lambda request, seen=requests: seen.append(request.url))
                page.on("pageerror", lambda exc, seen=problems: seen.append(str(exc)))
                page.on("console", lambda msg, seen=problems: seen.append(msg.text)
                        if msg.type == "error" else None)
                page.goto(f"{daemon.url}{path}")
                page.wait_for_selector(ready, timeout=20000)
                assert "triage" in page.text_content(ready)
                page.wait_for_timeout(500)
                assert not [p for p in problems if "Content Security Policy" in p
                            or "Refused" in p], (path, problems)
                assert all(url.startswith(daemon.url) or url.startswith(("data:", "blob:"))
                           for url in requests), (path, requests)
                page.close()
        finally:
            browser.close()
