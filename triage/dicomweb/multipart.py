"""``multipart/related`` bodies (RFC 2387) and the media types DICOMweb negotiates.

STOW-RS requests are read with :class:`MultipartParser` as the body arrives, one part in
memory at a time (a part larger than the limit is counted, not kept); WADO-RS answers are
written part by part with :func:`part_head` and :func:`closing`, so a study of hundreds
of instances streams instead of being built in memory.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

_CRLF = b"\r\n"


@dataclass(frozen=True)
class MediaType:
    """One media type with its parameters (names lower case, values unquoted)."""

    type: str
    params: dict[str, str] = field(default_factory=dict)

    def matches(self, wanted: str) -> bool:
        """Whether this type (which may be a range like ``*/*``, ``image/*``) covers ``wanted``."""
        if self.type in ("*/*", "*"):
            return True
        if self.type.endswith("/*") or self.type.endswith("/"):
            return wanted.startswith(self.type.rstrip("*"))
        return self.type == wanted


def _split_outside_quotes(text: str, separator: str) -> list[str]:
    parts, buffer, quoted = [], [], False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == separator and not quoted:
            parts.append("".join(buffer))
            buffer = []
        else:
            buffer.append(char)
    parts.append("".join(buffer))
    return parts


def parse_media_type(value: str) -> MediaType:
    """``multipart/related; type="application/dicom"; boundary=x`` as a :class:`MediaType`."""
    head, *params = _split_outside_quotes(value, ";")
    parsed = {}
    for param in params:
        name, _, raw = param.partition("=")
        if name.strip():
            parsed[name.strip().lower()] = raw.strip().strip('"')
    return MediaType(head.strip().lower(), parsed)


def parse_accept(value: str | None) -> list[MediaType]:
    """The media types of an ``Accept`` header in the client's order of preference (by
    ``q``, then as written); an empty or missing header accepts anything."""
    if not value or not value.strip():
        return [MediaType("*/*")]
    types = [parse_media_type(item) for item in _split_outside_quotes(value, ",") if item.strip()]

    def weight(item: MediaType) -> float:
        try:
            return float(item.params.get("q", "1"))
        except ValueError:
            return 1.0

    ranked = sorted(enumerate(types), key=lambda pair: (-weight(pair[1]), pair[0]))
    return [item for _, item in ranked if weight(item) > 0]


def new_boundary() -> str:
    return uuid.uuid4().hex


def part_head(boundary: str, content_type: str, *, first: bool = False,
              location: str | None = None) -> bytes:
    """The delimiter and headers that open one part (the body follows)."""
    lines = [f"--{boundary}", f"Content-Type: {content_type}"]
    if location:
        lines.append(f"Content-Location: {location}")
    head = "\r\n".join(lines).encode() + b"\r\n\r\n"
    return head if first else _CRLF + head


def closing(boundary: str) -> bytes:
    return f"\r\n--{boundary}--\r\n".encode()


def encode(boundary: str, parts: list[tuple[str, bytes]]) -> bytes:
    """A whole small multipart body: ``(content type, body)`` per part."""
    chunks = []
    for index, (content_type, body) in enumerate(parts):
        chunks += [part_head(boundary, content_type, first=index == 0), body]
    chunks.append(closing(boundary))
    return b"".join(chunks)


class MultipartError(ValueError):
    """The body is not a well-formed multipart message."""


@dataclass
class Part:
    """One body part. ``data`` is None when the part was larger than the limit."""

    headers: dict[str, str]
    data: bytes | None
    size: int

    @property
    def content_type(self) -> MediaType | None:
        value = self.headers.get("content-type")
        return parse_media_type(value) if value else None


class MultipartParser:
    """Incremental parser: :meth:`feed` chunks as they arrive, get the complete parts.

    Args:
        boundary: The ``boundary`` parameter of the message's content type.
        max_part_bytes: Bodies larger than this are dropped (``Part.data`` None) while
            still being read to the next delimiter, so memory stays bounded.
    """

    _MAX_HEADER_BYTES = 16 * 1024

    def __init__(self, boundary: str, max_part_bytes: int) -> None:
        if not boundary or len(boundary) > 200:
            raise MultipartError("the multipart boundary is missing or too long")
        self._dash_boundary = b"--" + boundary.encode("latin-1")
        self._delimiter = _CRLF + self._dash_boundary
        self._max = max_part_bytes
        self._buffer = bytearray()
        self._state = "preamble"  # preamble | after_delimiter | headers | body | done
        self._headers: dict[str, str] = {}
        self._body = bytearray()
        self._size = 0
        self._oversized = False

    @property
    def done(self) -> bool:
        return self._state == "done"

    def feed(self, chunk: bytes) -> list[Part]:
        if self._state == "done":
            return []  # the epilogue is ignored
        self._buffer += chunk
        parts: list[Part] = []
        while self._step(parts):
            pass
        return parts

    def close(self) -> None:
        """The body ended: raise unless the closing delimiter was seen."""
        if self._state != "done":
            raise MultipartError("the multipart body ended before its closing delimiter")

    def _step(self, parts: list[Part]) -> bool:  # noqa: PLR0911 - a small state machine
        buffer = self._buffer
        if self._state == "preamble":
            if buffer.startswith(self._dash_boundary):
                del buffer[: len(self._dash_boundary)]
                self._state = "after_delimiter"
                return True
            index = buffer.find(self._delimiter)
            if index < 0:
                # keep what could be the start of the delimiter
                del buffer[: max(0, len(buffer) - len(self._delimiter))]
                return False
            del buffer[: index + len(self._delimiter)]
            self._state = "after_delimiter"
            return True
        if self._state == "after_delimiter":
            if len(buffer) < 2:
                return False
            if buffer[:2] == b"--":
                self._state = "done"
                buffer.clear()
                return False
            end = buffer.find(_CRLF)
            if end < 0:
                if len(buffer) > 256:
                    raise MultipartError("a multipart delimiter line is malformed")
                return False
            if buffer[:end].strip(b" \t"):
                raise MultipartError("a multipart delimiter line is malformed")
            del buffer[: end + 2]
            self._state = "headers"
            return True
        if self._state == "headers":
            if buffer.startswith(_CRLF):  # a part without headers
                del buffer[:2]
                self._start_body({})
                return True
            end = buffer.find(_CRLF + _CRLF)
            if end < 0:
                if len(buffer) > self._MAX_HEADER_BYTES:
                    raise MultipartError("the headers of a multipart part are too long")
                return False
            self._start_body(_parse_headers(bytes(buffer[:end])))
            del buffer[: end + 4]
            return True
        if self._state == "body":
            index = buffer.find(self._delimiter)
            if index < 0:
                keep = len(self._delimiter) - 1
                if len(buffer) > keep:
                    self._take(buffer[: len(buffer) - keep])
                    del buffer[: len(buffer) - keep]
                return False
            self._take(buffer[:index])
            del buffer[: index + len(self._delimiter)]
            parts.append(Part(self._headers, None if self._oversized else bytes(self._body),
                              self._size))
            self._body = bytearray()
            self._state = "after_delimiter"
            return True
        return False

    def _start_body(self, headers: dict[str, str]) -> None:
        self._headers = headers
        self._body = bytearray()
        self._size = 0
        self._oversized = False
        self._state = "body"

    def _take(self, data: bytes | bytearray) -> None:
        self._size += len(data)
        if self._size > self._max:
            self._oversized = True
            self._body = bytearray()
        elif not self._oversized:
            self._body += data


def _parse_headers(raw: bytes) -> dict[str, str]:
    headers = {}
    for line in raw.decode("latin-1").split("\r\n"):
        name, sep, value = line.partition(":")
        if not sep:
            raise MultipartError("a multipart part header has no ':'")
        headers[name.strip().lower()] = value.strip()
    return headers
