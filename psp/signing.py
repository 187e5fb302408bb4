"""Stripe-style webhook signatures: header `t=<unix>,v1=<hex HMAC-SHA256 of "t.body">`.

Shared by the sandbox PSP (signing its events) and our webhook receiver (verifying them). Several
v1 entries are allowed so a sender can sign with an old and a new secret during rotation.
"""

from __future__ import annotations

import hashlib
import hmac
import time


class SignatureError(ValueError):
    """The header is malformed, the signature does not match, or the timestamp is out of tolerance."""


def _digest(payload: bytes, secret: str, timestamp: int) -> bytes:
    signed = str(timestamp).encode() + b"." + payload
    return hmac.new(secret.encode(), signed, hashlib.sha256).digest()


def sign_header(payload: bytes, secret: str, timestamp: int) -> str:
    return f"t={timestamp},v1={_digest(payload, secret, timestamp).hex()}"


def verify_header(
    payload: bytes, header: str, secret: str, *, tolerance: int = 300, now: int | None = None
) -> int:
    """Check a signature header against the raw body; returns its timestamp or raises SignatureError."""
    timestamp: int | None = None
    signatures: list[str] = []
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            continue
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError:
                raise SignatureError("invalid timestamp in signature header") from None
        elif key == "v1":
            signatures.append(value)
        # other schemes (v0, ...) are ignored on purpose: only v1 is trusted
    if timestamp is None:
        raise SignatureError("no timestamp (t=) in signature header")
    if not signatures:
        raise SignatureError("no v1 signature in signature header")
    candidates = []
    for sig in signatures:
        try:
            candidates.append(bytes.fromhex(sig))
        except ValueError:
            raise SignatureError("v1 signature is not hex") from None
    expected = _digest(payload, secret, timestamp)
    # Compare against every candidate (no early exit) so timing reveals nothing about which matched.
    matched = False
    for candidate in candidates:
        matched |= hmac.compare_digest(expected, candidate)
    if not matched:
        raise SignatureError("signature does not match the payload")
    current = int(time.time()) if now is None else now
    if current - timestamp > tolerance:
        raise SignatureError("timestamp is too old")
    if timestamp - current > tolerance:
        raise SignatureError("timestamp is too far in the future")
    return timestamp
