"""Security headers on every HTTP answer: the review UI shows text from DICOM headers.

Study and series descriptions and patient names come from whoever wrote the file (a
modality, a PACS, anyone who can reach the inbox). The UI sets them only as text, and
this policy is the second line: no inline script or style, no script from anywhere but
this server, no framing (clickjacking a label button), no MIME sniffing (a JSON answer
holding ``<script>`` must never be read as HTML), and no referrer carrying a study id to
another site. It is one pure ASGI middleware, so it covers the API, the static files and
the error answers alike, and it never buffers a body.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' blob: data:",  # frames arrive as blob: URLs; status charts as data:
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
])

SECURITY_HEADERS = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),  # frame-ancestors for browsers that predate it
)


class SecurityHeadersMiddleware:
    """Adds :data:`SECURITY_HEADERS` to each HTTP response that does not set its own."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers += [(k, v) for k, v in SECURITY_HEADERS if k not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
