"""Request dependencies: a store connection per request, the caller's token and role."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated

import sqlite_utils
from fastapi import Depends, HTTPException, Request

from triage.config import Settings
from triage.review.auth import AuthError, Principal, authenticate
from triage.store import db as store


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_db(request: Request) -> Iterator[sqlite_utils.Database]:
    db = store.connect(request.app.state.settings.database())
    try:
        yield db
    finally:
        db.close()


SettingsDep = Annotated[Settings, Depends(get_settings)]
DbDep = Annotated[sqlite_utils.Database, Depends(get_db)]


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def current_principal(request: Request, db: DbDep) -> Principal:
    """The caller's principal; 401 for a bad token, 429 while its client is throttled."""
    throttle = request.app.state.auth_throttle
    failures = request.app.state.daemon.metrics.auth_failures
    client = client_address(request)
    wait = throttle.retry_after(client)
    if wait:
        failures.labels("throttled").inc()
        raise HTTPException(
            429, f"too many failed token attempts from this address; retry in {wait} s",
            headers={"Retry-After": str(wait)},
        )
    try:
        return authenticate(db, _bearer(request))
    except AuthError as exc:
        failures.labels(exc.reason).inc()
        if exc.reason != "missing":  # no token is a forgotten header, not a guess
            throttle.failed(client)
        raise HTTPException(401, str(exc), headers={"WWW-Authenticate": "Bearer"}) from None


def require(*roles: str) -> Callable[..., Principal]:
    """Dependency: the caller's principal, if their role is one of ``roles``."""

    def check(who: Annotated[Principal, Depends(current_principal)]) -> Principal:
        if who.role not in roles:
            raise HTTPException(
                403, f"this needs the role {' or '.join(roles)}; your token has {who.role}"
            )
        return who

    return check


READERS = ("radiologist", "admin")
# People: every role but `sender`, a machine (modality, PACS) that may only store over
# DICOMweb STOW-RS and has no business reading the queue.
STAFF = ("radiologist", "ops", "admin")
SENDERS = ("sender", "admin")
Reader = Annotated[Principal, Depends(require(*READERS))]
Admin = Annotated[Principal, Depends(require("admin"))]
Anyone = Annotated[Principal, Depends(require(*STAFF))]
Sender = Annotated[Principal, Depends(require(*SENDERS))]


def client_address(request: Request) -> str | None:
    return request.client.host if request.client else None
