"""psp.signing: Stripe-style `t=...,v1=...` signatures shared by the sandbox and our webhook receiver."""

from __future__ import annotations

import hashlib
import hmac
import time

import pytest

from psp.signing import SignatureError, sign_header, verify_header

SECRET = "whsec_test"
BODY = b'{"id":"evt_1","type":"payment.authorized"}'
T = 1_700_000_000


def test_header_format_is_hmac_sha256_of_t_dot_body() -> None:
    expected = hmac.new(SECRET.encode(), f"{T}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert sign_header(BODY, SECRET, T) == f"t={T},v1={expected}"


def test_valid_signature_returns_timestamp() -> None:
    assert verify_header(BODY, sign_header(BODY, SECRET, T), SECRET, now=T + 10) == T


def test_any_of_several_v1_signatures_may_match() -> None:
    good = sign_header(BODY, SECRET, T).split(",")[1]
    header = f"t={T},v1={'ab' * 32},{good},v0=zz"
    assert verify_header(BODY, header, SECRET, now=T) == T


def test_mutated_body_is_refused() -> None:
    header = sign_header(BODY, SECRET, T)
    with pytest.raises(SignatureError, match="does not match"):
        verify_header(BODY.replace(b"authorized", b"captured"), header, SECRET, now=T)


def test_wrong_secret_is_refused() -> None:
    with pytest.raises(SignatureError, match="does not match"):
        verify_header(BODY, sign_header(BODY, "other", T), SECRET, now=T)


def test_timestamp_is_part_of_the_signature() -> None:
    sig = sign_header(BODY, SECRET, T).split(",")[1]
    with pytest.raises(SignatureError, match="does not match"):
        verify_header(BODY, f"t={T + 1},{sig}", SECRET, now=T)


def test_old_timestamp_is_refused() -> None:
    header = sign_header(BODY, SECRET, T)
    assert verify_header(BODY, header, SECRET, now=T + 300) == T  # exactly at the tolerance
    with pytest.raises(SignatureError, match="too old"):
        verify_header(BODY, header, SECRET, now=T + 301)


def test_future_timestamp_is_refused() -> None:
    header = sign_header(BODY, SECRET, T)
    assert verify_header(BODY, header, SECRET, now=T - 300) == T
    with pytest.raises(SignatureError, match="future"):
        verify_header(BODY, header, SECRET, now=T - 301)


def test_custom_tolerance() -> None:
    header = sign_header(BODY, SECRET, T)
    with pytest.raises(SignatureError, match="too old"):
        verify_header(BODY, header, SECRET, tolerance=5, now=T + 6)


def test_missing_timestamp_is_refused() -> None:
    sig = sign_header(BODY, SECRET, T).split(",")[1]
    with pytest.raises(SignatureError, match="timestamp"):
        verify_header(BODY, sig, SECRET, now=T)


def test_non_integer_timestamp_is_refused() -> None:
    sig = sign_header(BODY, SECRET, T).split(",")[1]
    with pytest.raises(SignatureError, match="timestamp"):
        verify_header(BODY, f"t=soon,{sig}", SECRET, now=T)


def test_only_v0_is_refused_even_if_it_would_match() -> None:
    digest = sign_header(BODY, SECRET, T).split("v1=")[1]
    with pytest.raises(SignatureError, match="no v1"):
        verify_header(BODY, f"t={T},v0={digest}", SECRET, now=T)


def test_bad_hex_is_refused() -> None:
    with pytest.raises(SignatureError, match="not hex"):
        verify_header(BODY, f"t={T},v1=xyz", SECRET, now=T)


def test_empty_header_is_refused() -> None:
    with pytest.raises(SignatureError):
        verify_header(BODY, "", SECRET, now=T)


def test_now_defaults_to_the_clock() -> None:

    now = int(time.time())
    assert verify_header(BODY, sign_header(BODY, SECRET, now), SECRET) == now
    with pytest.raises(SignatureError, match="too old"):
        verify_header(BODY, sign_header(BODY, SECRET, now - 3600), SECRET)
