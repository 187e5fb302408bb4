"""API-level idempotency (DESIGN §4, level 1): the ``Idempotency-Key`` header.

Scope is (merchant, key). The first request with a key inserts an ``in_flight`` row holding the
request hash and the id of the resource it will create (the payment id), locked for
``LOCK_SECONDS``. Then:

- same key, same request, finished   -> the stored response (status and body; a stored 402 too)
- same key, different request        -> 422 ``idempotency_key_reused``
- same key while the first is running -> 409 ``idempotency_key_in_use``
- same key, first one died (lock expired) -> taken over, re-run with the SAME resource id, so the
  retry re-attaches to the workflow the first attempt may already have started.

Two first requests racing on the insert are settled by the primary key. Only answers that will
not change on a retry are stored; a "still processing" answer or an outage releases the lock
instead, so the client's retry picks the same payment up again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import Header
from fastapi.responses import JSONResponse
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col

from api.errors import IDEMPOTENCY_ERROR, INVALID_REQUEST, ApiError, invalid
from core.db import transaction
from core.tables import IdempotencyKey

LOCK_SECONDS = 60
MAX_KEY_LENGTH = 255
_ATTEMPTS = 3


def idempotency_key_header(
    idempotency_key: str | None = Header(
        None,
        alias="Idempotency-Key",
        description="Retry-safe key (up to 255 characters); same key + same body = same answer",
    ),
) -> str | None:
    if idempotency_key is None:
        return None
    key = idempotency_key.strip()
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise invalid(
            "idempotency_key_invalid",
            f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable characters.",
            "Idempotency-Key",
        )
    return key


def request_hash(method: str, path: str, body: Mapping[str, Any]) -> str:
    """sha256 over method, path and the canonical JSON of the validated body (key order and
    whitespace do not make two requests different; a changed value does)."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(f"{method.upper()} {path}\n{canonical}".encode()).hexdigest()


@dataclass(frozen=True)
class Replay:
    status: int
    body: dict[str, Any]

    def response(self) -> JSONResponse:
        """The stored answer, marked as a replay."""
        return JSONResponse(self.body, status_code=self.status, headers={"Idempotent-Replayed": "true"})


@dataclass(frozen=True)
class Claim:
    resource_id: str
    takeover: bool  # True: a previous attempt with this key died; re-run with its resource id


def _now() -> datetime:
    return datetime.now(UTC)


def _reused() -> ApiError:
    return ApiError(
        422,
        IDEMPOTENCY_ERROR,
        "idempotency_key_reused",
        "Keys for idempotent requests can only be used with the same parameters they were first used with.",
    )


def _in_use() -> ApiError:
    return ApiError(
        409,
        INVALID_REQUEST,
        "idempotency_key_in_use",
        "A request with this idempotency key is still being processed. Retry shortly.",
        headers={"Retry-After": "1"},
    )


def _judge(row: IdempotencyKey, req_hash: str, now: datetime) -> Replay | None:
    """Replay for a finished request; raises for a mismatch or a live lock; None if stale."""
    if row.request_hash != req_hash:
        raise _reused()
    if row.status == "done":
        return Replay(row.response_status or 200, dict(row.response_body or {}))
    if row.locked_until > now:
        raise _in_use()
    return None


def precheck(sessions: sessionmaker[Session], merchant_id: str, key: str, req_hash: str) -> Replay | None:
    """Read-only look before validating references: answers a replay, a reuse (422) or an
    in-flight (409) without any write. None: go on and claim."""
    with sessions() as session:
        row = session.get(IdempotencyKey, (merchant_id, key))
        if row is None:
            return None
        return _judge(row, req_hash, _now())


def claim(
    sessions: sessionmaker[Session],
    merchant_id: str,
    key: str,
    method_path: str,
    req_hash: str,
    resource_id: str,
) -> Replay | Claim:
    """Take the key for this request (insert, or take over a dead attempt), or answer a replay."""
    for attempt in range(_ATTEMPTS):
        now = _now()
        try:
            with transaction(sessions) as session:
                row = session.get(IdempotencyKey, (merchant_id, key))
                if row is None:
                    session.add(
                        IdempotencyKey(
                            merchant_id=merchant_id,
                            key=key,
                            request_hash=req_hash,
                            method_path=method_path[:200],
                            resource_id=resource_id,
                            status="in_flight",
                            created=now,
                            locked_until=now + timedelta(seconds=LOCK_SECONDS),
                        )
                    )
                    session.flush()
                    return Claim(resource_id, takeover=False)
                replay = _judge(row, req_hash, now)
                if replay is not None:
                    return replay
                # Stale lock: compare-and-set on the old lock time, so of two retries that both
                # saw the dead attempt only one takes it over.
                result = session.execute(
                    update(IdempotencyKey)
                    .where(
                        col(IdempotencyKey.merchant_id) == merchant_id,
                        col(IdempotencyKey.key) == key,
                        col(IdempotencyKey.status) == "in_flight",
                        col(IdempotencyKey.locked_until) == row.locked_until,
                    )
                    .values(locked_until=now + timedelta(seconds=LOCK_SECONDS))
                )
                if getattr(result, "rowcount", 0) == 1:
                    return Claim(row.resource_id or resource_id, takeover=True)
        except IntegrityError:
            pass  # lost the insert race: read the winner's row on the next turn
        except OperationalError:
            # SQLite: a concurrent writer invalidated this transaction's snapshot; try again.
            if attempt == _ATTEMPTS - 1:
                raise
    raise _in_use()


def complete(
    sessions: sessionmaker[Session], merchant_id: str, key: str, status: int, body: dict[str, Any]
) -> None:
    """Store the final answer: later requests with this key get exactly it."""
    with transaction(sessions) as session:
        session.execute(
            update(IdempotencyKey)
            .where(col(IdempotencyKey.merchant_id) == merchant_id, col(IdempotencyKey.key) == key)
            .values(status="done", response_status=status, response_body=body)
        )


def release(sessions: sessionmaker[Session], merchant_id: str, key: str) -> None:
    """Give the key up without an answer: the next retry takes over at once (same resource id)."""
    with transaction(sessions) as session:
        session.execute(
            update(IdempotencyKey)
            .where(
                col(IdempotencyKey.merchant_id) == merchant_id,
                col(IdempotencyKey.key) == key,
                col(IdempotencyKey.status) == "in_flight",
            )
            .values(locked_until=_now())
        )
