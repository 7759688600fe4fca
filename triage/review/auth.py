"""API tokens: created and revoked by admins from the CLI, stored only as hashes.

A token is 32 random bytes (URL-safe text) shown once at creation. The store keeps its
SHA-256: tokens are random, not passwords, so a fast hash is as safe as a slow one and
lookups stay O(1).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

import sqlite_utils

from triage.errors import TriageError
from triage.store.db import transaction

# sender: a modality or PACS storing instances over DICOMweb STOW-RS, and nothing else.
ROLES = ("radiologist", "ops", "admin", "sender")
TOKEN_PREFIX = "trg_"
_LAST_USED_RESOLUTION_SECONDS = 60.0


class AuthError(TriageError):
    """Token missing, unknown or revoked (HTTP 401), or a bad token command.

    ``reason`` is a closed code (``missing``, ``unknown``, ``revoked``, ``invalid``) for
    the failure counter and the throttle, which must never see the token itself.
    """

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's id, name and role."""

    token_id: int
    name: str
    role: str


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(db: sqlite_utils.Database, *, name: str, role: str) -> tuple[int, str]:
    """Create a token; return its id and the secret (shown once, never stored)."""
    if role not in ROLES:
        raise AuthError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    if not name.strip():
        raise AuthError("name must not be empty")
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with transaction(db):
        cursor = db.execute(
            "INSERT INTO tokens (name, role, token_hash, created_at) VALUES (?, ?, ?, ?)",
            [name.strip(), role, hash_token(secret), time.time()],
        )
    return int(cursor.lastrowid), secret


def revoke_token(db: sqlite_utils.Database, token_id: int) -> Principal:
    """Revoke a token by id; it stops working at once."""
    row = db.execute(
        "SELECT id, name, role, revoked_at FROM tokens WHERE id = ?", [token_id]
    ).fetchone()
    if row is None:
        raise AuthError(f"no token with id {token_id}; `triage token list` shows them")
    if row[3] is not None:
        raise AuthError(f"token {token_id} ({row[1]}) is already revoked")
    with transaction(db):
        db.execute("UPDATE tokens SET revoked_at = ? WHERE id = ?", [time.time(), token_id])
    return Principal(int(row[0]), row[1], row[2])


def list_tokens(db: sqlite_utils.Database) -> list[dict]:
    return list(db.query(
        "SELECT id, name, role, created_at, revoked_at, last_used_at FROM tokens ORDER BY id"
    ))


def authenticate(db: sqlite_utils.Database, token: str | None) -> Principal:
    """The principal of a bearer token, or AuthError with a message fit for a 401."""
    if not token:
        raise AuthError("missing bearer token: send 'Authorization: Bearer <token>'",
                        reason="missing")
    row = db.execute(
        "SELECT id, name, role, revoked_at, last_used_at FROM tokens WHERE token_hash = ?",
        [hash_token(token)],
    ).fetchone()
    if row is None:
        raise AuthError("unknown token", reason="unknown")
    if row[3] is not None:
        raise AuthError("this token has been revoked", reason="revoked")
    now = time.time()
    if row[4] is None or now - row[4] > _LAST_USED_RESOLUTION_SECONDS:
        # every image fetch authenticates: a write per request would contend with ingest
        db.execute("UPDATE tokens SET last_used_at = ? WHERE id = ?", [now, row[0]])
    return Principal(int(row[0]), row[1], row[2])
