"""API keys: issuing them (the CLI) and resolving ``Authorization: Bearer <key>`` (every request).

Keys are ``sk_test_<random>`` (a merchant) or ``op_test_<random>`` (an operator). Only the
SHA-256 of a key is stored: a leaked database does not leak working keys. The hot path keeps a
small in-process TTL cache so that each request does not cost a database round trip; a revoked
key therefore stops working within ``KEY_CACHE_TTL`` seconds.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass

import anyio.to_thread
from fastapi import Depends, Request
from sqlalchemy.orm import SessionTransactionOrigin, sessionmaker
from sqlmodel import Session, select

from api.errors import AUTHENTICATION_ERROR, PERMISSION_ERROR, ApiError
from core.config import Settings
from core.ids import new_id
from core.tables import ApiKey, Merchant, Operator

MERCHANT_PREFIX = "sk_test_"
OPERATOR_PREFIX = "op_test_"
KEY_CACHE_TTL = 30.0
KEY_CACHE_NEGATIVE_TTL = 5.0
KEY_CACHE_MAX = 10_000


@dataclass(frozen=True, slots=True)
class Principal:
    merchant_id: str | None = None
    operator_id: str | None = None

    @property
    def is_operator(self) -> bool:
        return self.operator_id is not None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _new_key(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(24)


def _finish(session: Session) -> None:
    # Commit when the caller let the session autobegin; inside the caller's own
    # `session.begin()` / core.db.transaction() block, leave the commit to the caller.
    session.flush()
    tx = session.get_transaction()
    if tx is not None and tx.origin is SessionTransactionOrigin.AUTOBEGIN:
        session.commit()


def issue_merchant(session: Session, name: str, settings: Settings) -> tuple[Merchant, str]:
    """Create a merchant (fees from settings) and its secret key. The key is returned once."""
    merchant = Merchant(
        id=new_id("acct"),
        name=name,
        fee_bps=settings.default_fee_bps,
        fee_fixed=settings.default_fee_fixed,
    )
    key = _new_key(MERCHANT_PREFIX)
    session.add(merchant)
    session.flush()  # the key row references the merchant
    session.add(ApiKey(key_hash=hash_key(key), prefix=key[:12], merchant_id=merchant.id))
    _finish(session)
    return merchant, key


def issue_operator(session: Session, name: str) -> tuple[Operator, str]:
    """Create an operator and its key. The key is returned once."""
    operator = Operator(id=new_id("opr"), name=name)
    key = _new_key(OPERATOR_PREFIX)
    session.add(operator)
    session.flush()
    session.add(ApiKey(key_hash=hash_key(key), prefix=key[:12], operator_id=operator.id))
    _finish(session)
    return operator, key


class KeyCache:
    """key hash -> Principal (or None for an unknown key), with expiry. Thread-safe, bounded."""

    def __init__(self, ttl: float = KEY_CACHE_TTL, negative_ttl: float = KEY_CACHE_NEGATIVE_TTL) -> None:
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self._items: dict[str, tuple[Principal | None, float]] = {}
        self._lock = threading.Lock()

    def get(self, key_hash: str) -> tuple[bool, Principal | None]:
        now = time.monotonic()
        with self._lock:
            item = self._items.get(key_hash)
            if item is None:
                return False, None
            if item[1] <= now:
                del self._items[key_hash]
                return False, None
            return True, item[0]

    def put(self, key_hash: str, principal: Principal | None) -> None:
        now = time.monotonic()
        with self._lock:
            if len(self._items) >= KEY_CACHE_MAX:
                # Drop expired entries first; if still full, start over (rare, bounded memory).
                self._items = {k: v for k, v in self._items.items() if v[1] > now}
                if len(self._items) >= KEY_CACHE_MAX:
                    self._items.clear()
            ttl = self.ttl if principal is not None else self.negative_ttl
            self._items[key_hash] = (principal, now + ttl)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


def lookup_key(factory: sessionmaker[Session], key_hash: str) -> Principal | None:
    with factory() as session:
        row = session.exec(select(ApiKey).where(ApiKey.key_hash == key_hash)).first()
        if row is None or row.revoked:
            return None
        return Principal(merchant_id=row.merchant_id, operator_id=row.operator_id)


def _unauthorized(message: str) -> ApiError:
    return ApiError(
        401,
        AUTHENTICATION_ERROR,
        "invalid_api_key",
        message,
        headers={"WWW-Authenticate": 'Bearer realm="paysaga"'},
    )


async def authenticate(request: Request) -> Principal:
    header = request.headers.get("authorization")
    if not header:
        raise _unauthorized("You did not provide an API key. Send it as 'Authorization: Bearer <key>'.")
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise _unauthorized("Send the API key as 'Authorization: Bearer <key>'.")
    if not key.startswith((MERCHANT_PREFIX, OPERATOR_PREFIX)) or len(key) > 128:
        raise _unauthorized("Invalid API key provided.")
    key_hash = hash_key(key)
    cache: KeyCache = request.app.state.key_cache
    hit, principal = cache.get(key_hash)
    if not hit:
        principal = await anyio.to_thread.run_sync(lookup_key, request.app.state.sessions, key_hash)
        cache.put(key_hash, principal)
    if principal is None:
        raise _unauthorized("Invalid API key provided.")
    request.state.principal = principal
    return principal


def _forbidden(message: str) -> ApiError:
    return ApiError(403, PERMISSION_ERROR, "insufficient_permissions", message)


async def merchant_principal(principal: Principal = Depends(authenticate)) -> Principal:
    if principal.merchant_id is None:
        raise _forbidden("This request needs a merchant secret key (sk_...).")
    return principal


async def operator_principal(principal: Principal = Depends(authenticate)) -> Principal:
    if principal.operator_id is None:
        raise _forbidden("This request needs an operator key (op_...).")
    return principal


async def any_principal(principal: Principal = Depends(authenticate)) -> Principal:
    return principal


def merchant_id_of(principal: Principal) -> str:
    assert principal.merchant_id is not None
    return principal.merchant_id
