"""The sandbox PSP over HTTP (httpx.ASGITransport, no network) and the SandboxPSP client's error mapping
(httpx.MockTransport)."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from psp.base import AuthorizeRequest, CardDetails, PSPAmbiguous, PSPRejected, PSPUnavailable
from psp.sandbox import cards
from psp.sandbox.app import WebhookSender, create_app
from psp.sandbox.client import SandboxPSP, parse_retry_after
from psp.signing import verify_header

API_KEY = "sk_sandbox_test"
WEBHOOK_SECRET = "whsec_sandbox_test"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
NEXT_YEAR = datetime.now(UTC).year + 1


def _client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sandbox", headers=AUTH)


@pytest.fixture
async def app() -> AsyncIterator[FastAPI]:
    app = create_app(db_path=":memory:", api_key=API_KEY, webhook_secret=WEBHOOK_SECRET)
    yield app
    app.state.sandbox.close()


@pytest.fixture
async def http(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with _client(app) as client:
        yield client


async def tokenize(
    http: httpx.AsyncClient, number: str = "4242424242424242", **overrides: Any
) -> dict[str, Any]:
    body = {"number": number, "exp_month": 12, "exp_year": NEXT_YEAR, "cvc": "123", **overrides}
    r = await http.post("/v1/tokens", json=body)
    assert r.status_code == 200, r.text
    return dict(r.json())


async def authorize(
    http: httpx.AsyncClient,
    token: str,
    *,
    key: str,
    amount: int = 1000,
    reference: str = "pay_1",
    expect: int = 200,
) -> dict[str, Any]:
    r = await http.post(
        "/v1/payments",
        json={"amount": amount, "currency": "usd", "token": token, "reference": reference},
        headers={"Idempotency-Key": key},
    )
    assert r.status_code == expect, r.text
    return dict(r.json())


async def post(
    http: httpx.AsyncClient, path: str, *, key: str, body: dict[str, Any] | None = None, expect: int = 200
) -> dict[str, Any]:
    r = await http.post(path, json=body, headers={"Idempotency-Key": key})
    assert r.status_code == expect, r.text
    return dict(r.json())


async def authorized_payment(
    http: httpx.AsyncClient, amount: int = 1000, reference: str = "pay_1"
) -> dict[str, Any]:
    tok = await tokenize(http)
    return await authorize(http, tok["id"], key=f"{reference}:authorize", amount=amount, reference=reference)


# ---- cards ----


@pytest.mark.parametrize(
    ("number", "ok"),
    [("4242424242424242", True), ("4242424242424241", False), ("79927398713", False), ("12345678903", False)],
)
def test_luhn(number: str, ok: bool) -> None:
    assert cards.luhn_ok(number) is ok


def test_luhn_rejects_non_ascii_digits() -> None:
    assert not cards.luhn_ok("٤٢٤٢٤٢٤٢٤٢٤٢٤٢٤٢")


@pytest.mark.parametrize(
    ("number", "brand"),
    [
        ("4242424242424242", "visa"),
        ("5555555555554444", "mastercard"),
        ("5105105105105100", "mastercard"),
        ("2221000000000009", "mastercard"),
        ("2720990000000007", "mastercard"),
        ("2721000000000004", "unknown"),
        ("378282246310005", "amex"),
        ("341111111111111", "amex"),
        ("6011111111111117", "unknown"),
    ],
)
def test_brand_from_bin(number: str, brand: str) -> None:
    assert cards.brand_of(number) == brand


def test_validate_card_normalizes_spaces_and_two_digit_years() -> None:
    assert cards.validate_card("4242 4242-4242 4242", 1, 30, "123", today=date(2025, 6, 1)) == (
        "4242424242424242",
        2030,
    )


def test_card_expiring_this_month_is_still_valid() -> None:
    assert cards.validate_card("4242424242424242", 6, 2025, "1234", today=date(2025, 6, 30))[1] == 2025
    with pytest.raises(cards.CardError) as err:
        cards.validate_card("4242424242424242", 5, 2025, "123", today=date(2025, 6, 1))
    assert err.value.code == "invalid_expiry_month"


# ---- auth and errors ----


async def test_healthz_needs_no_key(app: FastAPI) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sandbox") as anon:
        assert (await anon.get("/healthz")).json() == {"status": "ok"}


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}])
async def test_v1_needs_the_api_key(app: FastAPI, headers: dict[str, str]) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sandbox") as anon:
        r = await anon.get("/v1/payments", headers=headers)
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"
    assert r.json()["error"]["code"] == "invalid_api_key"


async def test_unknown_payment_is_404_json(http: httpx.AsyncClient) -> None:
    r = await http.get("/v1/payments/psp_pay_nope")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "resource_missing"


# ---- tokens ----


@pytest.mark.parametrize(
    ("number", "brand", "funding"),
    [
        ("4242424242424242", "visa", "credit"),
        ("5555555555554444", "mastercard", "credit"),
        ("4000056655665556", "visa", "debit"),
        ("378282246310005", "amex", "credit"),
    ],
)
async def test_tokenize(http: httpx.AsyncClient, number: str, brand: str, funding: str) -> None:
    tok = await tokenize(http, number)
    assert tok["id"].startswith("tok_")
    assert tok["object"] == "token"
    assert (tok["brand"], tok["funding"], tok["country"], tok["last4"]) == (brand, funding, "US", number[-4:])
    assert (tok["exp_month"], tok["exp_year"]) == (12, NEXT_YEAR)
    assert "number" not in tok and "cvc" not in tok


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"number": "4242424242424241"}, "invalid_number"),
        ({"number": "42424242abcd4242"}, "invalid_number"),
        ({"exp_year": 2001}, "invalid_expiry_year"),
        ({"exp_month": 13}, "invalid_expiry_month"),
        ({"cvc": "12"}, "invalid_cvc"),
        ({"cvc": "12345"}, "invalid_cvc"),
        ({"cvc": "12a"}, "invalid_cvc"),
    ],
)
async def test_tokenize_refuses_bad_cards(
    http: httpx.AsyncClient, overrides: dict[str, Any], code: str
) -> None:
    body = {"number": "4242424242424242", "exp_month": 12, "exp_year": NEXT_YEAR, "cvc": "123", **overrides}
    r = await http.post("/v1/tokens", json=body)
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "card_error"
    assert r.json()["error"]["code"] == code


async def test_validation_errors_do_not_echo_the_card_number(http: httpx.AsyncClient) -> None:
    r = await http.post(
        "/v1/tokens",
        json={"number": "4242424242424242", "exp_month": "soon", "exp_year": NEXT_YEAR, "cvc": "123"},
    )
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "parameter_invalid"
    assert r.json()["error"]["param"] == "exp_month"
    assert "4242424242424242" not in r.text


# ---- authorize: each test card ----


@pytest.mark.parametrize(
    "number", ["4242424242424242", "5555555555554444", "4000056655665556", "4111111111111111"]
)
async def test_cards_that_succeed(http: httpx.AsyncClient, number: str) -> None:
    tok = await tokenize(http, number)
    pay = await authorize(http, tok["id"], key="k1", amount=1234)
    assert pay["id"].startswith("psp_pay_")
    assert pay["object"] == "payment"
    assert pay["status"] == "authorized"
    assert (pay["amount"], pay["currency"], pay["reference"]) == (1234, "usd", "pay_1")
    assert (pay["amount_captured"], pay["amount_refunded"], pay["authorizations"]) == (0, 0, 1)
    assert pay["decline_code"] is None and pay["next_action"] is None


@pytest.mark.parametrize(
    ("number", "decline_code"),
    [
        ("4000000000000002", "generic_decline"),
        ("4000000000009995", "insufficient_funds"),
        ("4000000000000069", "expired_card"),
    ],
)
async def test_declines_are_results_not_errors(
    http: httpx.AsyncClient, number: str, decline_code: str
) -> None:
    tok = await tokenize(http, number)
    pay = await authorize(http, tok["id"], key="k1")
    assert pay["status"] == "failed"
    assert pay["decline_code"] == decline_code
    assert pay["message"]
    assert pay["authorizations"] == 0


async def test_otp_card_authenticates_with_the_right_code(http: httpx.AsyncClient) -> None:
    tok = await tokenize(http, "4000002760003184")
    pay = await authorize(http, tok["id"], key="k1")
    assert pay["status"] == "requires_action"
    assert pay["next_action"]["type"] == "otp"
    assert pay["authorizations"] == 0
    done = await post(http, f"/v1/payments/{pay['id']}/authenticate", key="k2", body={"otp": "123456"})
    assert done["status"] == "authorized"
    assert done["next_action"] is None
    assert done["authorizations"] == 1
    # a second authentication (another key) finds it no longer waiting
    r = await http.post(
        f"/v1/payments/{pay['id']}/authenticate", json={"otp": "123456"}, headers={"Idempotency-Key": "k3"}
    )
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "payment_unexpected_state"


async def test_otp_card_fails_with_a_wrong_code(http: httpx.AsyncClient) -> None:
    tok = await tokenize(http, "4000002760003184")
    pay = await authorize(http, tok["id"], key="k1")
    done = await post(http, f"/v1/payments/{pay['id']}/authenticate", key="k2", body={"otp": "000000"})
    assert done["status"] == "failed"
    assert done["decline_code"] == "authentication_failed"
    assert done["authorizations"] == 0


async def test_authenticate_needs_requires_action(http: httpx.AsyncClient) -> None:
    pay = await authorized_payment(http)
    await post(http, f"/v1/payments/{pay['id']}/authenticate", key="k2", body={"otp": "123456"}, expect=409)


async def test_processing_error_card_fails_twice_per_key_then_succeeds(http: httpx.AsyncClient) -> None:
    tok = await tokenize(http, "4000000000000119")
    for _ in range(2):
        err = await authorize(http, tok["id"], key="flaky", expect=500)
        assert err["error"]["code"] == "processing_error"
    # nothing was created by the failed attempts
    assert (await http.get("/v1/payments", params={"reference": "pay_1"})).json()["data"] == []
    pay = await authorize(http, tok["id"], key="flaky")
    assert pay["status"] == "authorized"
    # counted per key: a new key starts again at attempt one
    await authorize(http, tok["id"], key="other", reference="pay_2", expect=500)


async def test_unknown_token_is_rejected(http: httpx.AsyncClient) -> None:
    err = await authorize(http, "tok_missing", key="k1", expect=400)
    assert err["error"]["code"] == "resource_missing"
    assert err["error"]["param"] == "token"


@pytest.mark.parametrize("amount", [0, -5, "100", 10.5, True])
async def test_amount_must_be_a_positive_integer(http: httpx.AsyncClient, amount: Any) -> None:
    tok = await tokenize(http)
    r = await http.post(
        "/v1/payments",
        json={"amount": amount, "currency": "usd", "token": tok["id"], "reference": "pay_1"},
        headers={"Idempotency-Key": "k1"},
    )
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "amount"


# ---- idempotency ----


async def test_idempotency_key_is_required(http: httpx.AsyncClient) -> None:
    tok = await tokenize(http)
    r = await http.post(
        "/v1/payments", json={"amount": 1, "currency": "usd", "token": tok["id"], "reference": "p"}
    )
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "idempotency_key_missing"


async def test_same_key_same_body_replays_the_stored_response(http: httpx.AsyncClient) -> None:
    tok = await tokenize(http)
    first = await http.post(
        "/v1/payments",
        json={"amount": 500, "currency": "usd", "token": tok["id"], "reference": "pay_1"},
        headers={"Idempotency-Key": "pay_1:authorize"},
    )
    again = await http.post(
        "/v1/payments",
        json={"amount": 500, "currency": "usd", "token": tok["id"], "reference": "pay_1"},
        headers={"Idempotency-Key": "pay_1:authorize"},
    )
    assert again.status_code == first.status_code == 200
    assert again.json() == first.json()
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert "Idempotent-Replayed" not in first.headers
    listed = (await http.get("/v1/payments", params={"reference": "pay_1"})).json()
    assert listed["object"] == "list"
    assert [p["id"] for p in listed["data"]] == [first.json()["id"]]


async def test_replay_of_a_stored_4xx_keeps_its_status(http: httpx.AsyncClient) -> None:
    pay = await authorized_payment(http)
    await post(http, f"/v1/payments/{pay['id']}/void", key="v1")
    first = await post(http, f"/v1/payments/{pay['id']}/capture", key="c1", expect=409)
    again = await post(http, f"/v1/payments/{pay['id']}/capture", key="c1", expect=409)
    assert again == first


async def test_same_key_other_body_is_refused(http: httpx.AsyncClient) -> None:
    tok = await tokenize(http)
    await authorize(http, tok["id"], key="k1", amount=500)
    err = await authorize(http, tok["id"], key="k1", amount=501, expect=400)
    assert err["error"]["code"] == "idempotency_key_reused"
    # and on another route
    pay = (await http.get("/v1/payments", params={"reference": "pay_1"})).json()["data"][0]
    err = await post(http, f"/v1/payments/{pay['id']}/capture", key="k1", expect=400)
    assert err["error"]["code"] == "idempotency_key_reused"
    assert (await http.get(f"/v1/payments/{pay['id']}")).json()["status"] == "authorized"


# ---- capture, void ----


async def test_full_capture_by_default(http: httpx.AsyncClient) -> None:
    pay = await authorized_payment(http, amount=1000)
    r = await http.post(f"/v1/payments/{pay['id']}/capture", headers={"Idempotency-Key": "c1"})
    assert r.status_code == 200
    assert (r.json()["status"], r.json()["amount_captured"]) == ("captured", 1000)


async def test_partial_capture_releases_the_rest(http: httpx.AsyncClient) -> None:
    pay = await authorized_payment(http, amount=1000)
    cap = await post(http, f"/v1/payments/{pay['id']}/capture", key="pay_1:capture", body={"amount": 600})
    assert (cap["status"], cap["amount"], cap["amount_captured"]) == ("captured", 1000, 600)
    # same key: the stored response; another key: the payment is no longer authorized
    again = await post(http, f"/v1/payments/{pay['id']}/capture", key="pay_1:capture", body={"amount": 600})
    assert again == cap
    err = await post(http, f"/v1/payments/{pay['id']}/capture", key="c2", body={"amount": 400}, expect=409)
    assert err["error"]["code"] == "payment_unexpected_state"
    assert (await http.get(f"/v1/payments/{pay['id']}")).json()["amount_captured"] == 600


async def test_capture_more_than_authorized_is_refused(http: httpx.AsyncClient) -> None:
    pay = await authorized_payment(http, amount=1000)
    err = await post(http, f"/v1/payments/{pay['id']}/capture", key="c1", body={"amount": 1001}, expect=400)
    assert err["error"]["code"] == "amount_too_large"
    assert (await http.get(f"/v1/payments/{pay['id']}")).json()["status"] == "authorized"


async def test_capture_of_a_declined_payment_is_409(http: httpx.AsyncClient) -> None:
    tok = await tokenize(http, "4000000000000002")
    pay = await authorize(http, tok["id"], key="k1")
    await post(http, f"/v1/payments/{pay['id']}/capture", key="c1", expect=409)


async def test_void_authorized_then_again(http: httpx.AsyncClient) -> None:
    pay = await authorized_payment(http)
    voided = await post(http, f"/v1/payments/{pay['id']}/void", key="v1")
    assert voided["status"] == "canceled"
    assert voided["authorizations"] == 1
    again = await post(http, f"/v1/payments/{pay['id']}/void", key="v2")
    assert again == voided
    await post(http, f"/v1/payments/{pay['id']}/capture", key="c1", expect=409)


async def test_void_requires_action(http: httpx.AsyncClient) -> None:
    tok = await tokenize(http, "4000002760003184")
    pay = await authorize(http, tok["id"], key="k1")
    voided = await post(http, f"/v1/payments/{pay['id']}/void", key="v1")
    assert voided["status"] == "canceled"
    assert voided["next_action"] is None
    await post(http, f"/v1/payments/{pay['id']}/authenticate", key="a1", body={"otp": "123456"}, expect=409)


async def test_void_of_captured_is_409(http: httpx.AsyncClient) -> None:
    pay = await authorized_payment(http)
    await post(http, f"/v1/payments/{pay['id']}/capture", key="c1")
    err = await post(http, f"/v1/payments/{pay['id']}/void", key="v1", expect=409)
    assert err["error"]["code"] == "payment_unexpected_state"


async def test_void_of_failed_answers_it_unchanged(http: httpx.AsyncClient) -> None:
    tok = await tokenize(http, "4000000000009995")
    pay = await authorize(http, tok["id"], key="k1")
    voided = await post(http, f"/v1/payments/{pay['id']}/void", key="v1")
    assert (voided["status"], voided["decline_code"]) == ("failed", "insufficient_funds")


# ---- refunds ----


async def test_partial_then_full_refund(http: httpx.AsyncClient) -> None:
    pay = await authorized_payment(http, amount=1000)
    await post(http, f"/v1/payments/{pay['id']}/capture", key="c1", body={"amount": 800})
    re1 = await post(http, f"/v1/payments/{pay['id']}/refunds", key="r1", body={"amount": 300})
    assert re1["id"].startswith("re_")
    assert (re1["object"], re1["payment"], re1["amount"], re1["status"]) == (
        "refund",
        pay["id"],
        300,
        "succeeded",
    )
    after = (await http.get(f"/v1/payments/{pay['id']}")).json()
    assert (after["status"], after["amount_refunded"]) == ("captured", 300)
    # replay does not refund twice
    assert await post(http, f"/v1/payments/{pay['id']}/refunds", key="r1", body={"amount": 300}) == re1
    assert (await http.get(f"/v1/payments/{pay['id']}")).json()["amount_refunded"] == 300
    # over the captured-minus-refunded amount
    err = await post(http, f"/v1/payments/{pay['id']}/refunds", key="r2", body={"amount": 501}, expect=409)
    assert err["error"]["code"] == "amount_too_large"
    await post(http, f"/v1/payments/{pay['id']}/refunds", key="r3", body={"amount": 500})
    after = (await http.get(f"/v1/payments/{pay['id']}")).json()
    assert (after["status"], after["amount_captured"], after["amount_refunded"]) == ("refunded", 800, 800)
    await post(http, f"/v1/payments/{pay['id']}/refunds", key="r4", body={"amount": 1}, expect=409)


async def test_refund_of_uncaptured_is_409(http: httpx.AsyncClient) -> None:
    pay = await authorized_payment(http)
    err = await post(http, f"/v1/payments/{pay['id']}/refunds", key="r1", body={"amount": 1}, expect=409)
    assert err["error"]["code"] == "payment_unexpected_state"


# ---- lists, persistence, card data ----


async def test_list_by_reference_and_all(http: httpx.AsyncClient) -> None:
    a = await authorized_payment(http, reference="pay_a")
    b = await authorized_payment(http, reference="pay_b")
    only_a = (await http.get("/v1/payments", params={"reference": "pay_a"})).json()
    assert [p["id"] for p in only_a["data"]] == [a["id"]]
    assert (await http.get("/v1/payments", params={"reference": "pay_none"})).json()["data"] == []
    page = (await http.get("/v1/payments", params={"limit": 1})).json()
    assert [p["id"] for p in page["data"]] == [b["id"]]  # newest first
    assert page["has_more"] is True


async def test_state_survives_recreating_the_app(tmp_path: Path) -> None:
    db = str(tmp_path / "sandbox.db")
    first = create_app(db_path=db, api_key=API_KEY, webhook_secret=WEBHOOK_SECRET)
    async with _client(first) as http:
        tok = await tokenize(http)
        pay = await authorize(http, tok["id"], key="pay_1:authorize")
        await post(http, f"/v1/payments/{pay['id']}/capture", key="c1", body={"amount": 700})
    first.state.sandbox.close()

    second = create_app(db_path=db, api_key=API_KEY, webhook_secret=WEBHOOK_SECRET)
    async with _client(second) as http:
        got = (await http.get(f"/v1/payments/{pay['id']}")).json()
        assert (got["status"], got["amount_captured"]) == ("captured", 700)
        # the idempotency record survived too: the replay is the stored answer, not a new payment
        replay = await authorize(http, tok["id"], key="pay_1:authorize")
        assert replay["id"] == pay["id"] and replay["status"] == "authorized"
        # and so did the token
        await authorize(http, tok["id"], key="pay_2:authorize", reference="pay_2")
    second.state.sandbox.close()


async def test_database_holds_no_card_number_or_cvc(tmp_path: Path) -> None:
    db = tmp_path / "sandbox.db"
    app = create_app(db_path=str(db), api_key=API_KEY, webhook_secret=WEBHOOK_SECRET)
    numbers = ["4242424242424242", "4000002760003184", "4000000000000002"]
    async with _client(app) as http:
        tokens = [await tokenize(http, n, cvc="987") for n in numbers]
        for i, tok in enumerate(tokens):
            await authorize(http, tok["id"], key=f"k{i}", reference=f"pay_{i}")
    app.state.sandbox.close()
    stored = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("sandbox.db"))
    assert tokens[0]["id"].encode() in stored  # we are looking at the right bytes
    for n in numbers:
        assert n.encode() not in stored
    # no field for them either (a 3-digit cvc value could appear by chance inside ids)
    assert b'"cvc"' not in stored and b'"number"' not in stored
    assert b'"last4": "4242"' in stored


# ---- webhooks ----


class Receiver:
    """A webhook endpoint for httpx.MockTransport that records what arrives."""

    def __init__(self, fail_first: int = 0) -> None:
        self.requests: list[httpx.Request] = []
        self.fail_first = fail_first
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            self.calls += 1
            if self.calls <= self.fail_first:
                return httpx.Response(500)
            self.requests.append(request)
        return httpx.Response(200)

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.requests]


async def test_webhooks_are_signed_and_cover_every_change() -> None:
    receiver = Receiver()
    app = create_app(
        db_path=":memory:",
        api_key=API_KEY,
        webhook_secret=WEBHOOK_SECRET,
        webhook_url="http://merchant.test/psp-webhooks",
        webhook_transport=httpx.MockTransport(receiver),
    )
    async with _client(app) as http:
        pay = await authorized_payment(http, amount=1000)
        await post(http, f"/v1/payments/{pay['id']}/capture", key="c1")
        await post(http, f"/v1/payments/{pay['id']}/capture", key="c1")  # replay: no new event
        refund = await post(http, f"/v1/payments/{pay['id']}/refunds", key="r1", body={"amount": 1000})
    app.state.webhooks.close()  # drains the queue
    app.state.sandbox.close()

    events = receiver.events()
    assert [e["type"] for e in events] == [
        "payment.authorized",
        "payment.captured",
        "refund.succeeded",
        "payment.refunded",
    ]
    assert all(e["id"].startswith("evt_") and isinstance(e["created"], int) for e in events)
    assert events[0]["data"]["object"]["id"] == pay["id"]
    assert events[2]["data"]["object"]["id"] == refund["id"]
    assert len({e["id"] for e in events}) == 4
    for request in receiver.requests:
        assert str(request.url) == "http://merchant.test/psp-webhooks"
        verify_header(request.content, request.headers["Paysaga-Signature"], WEBHOOK_SECRET)


async def test_failing_webhook_endpoint_never_fails_the_request() -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    app = create_app(
        db_path=":memory:",
        api_key=API_KEY,
        webhook_secret=WEBHOOK_SECRET,
        webhook_url="http://merchant.test/hooks",
        webhook_transport=httpx.MockTransport(down),
    )
    app.state.webhooks._backoff = 0.0  # keep the test fast; retries still happen
    async with _client(app) as http:
        started = time.monotonic()
        pay = await authorized_payment(http)
        assert time.monotonic() - started < 2
        assert pay["status"] == "authorized"
    app.state.webhooks.close()
    app.state.sandbox.close()
    assert app.state.webhooks.dropped == 1
    assert app.state.webhooks.delivered == 0


def test_webhook_sender_retries_then_delivers() -> None:
    receiver = Receiver(fail_first=2)
    sender = WebhookSender(
        "http://x.test/h", WEBHOOK_SECRET, transport=httpx.MockTransport(receiver), backoff=0
    )
    sender.enqueue({"id": "evt_1", "type": "payment.authorized", "data": {"object": {}}})
    sender.close()
    assert receiver.calls == 3
    assert sender.delivered == 1 and sender.dropped == 0


# ---- the client against the sandbox ----


@pytest.fixture
async def psp(app: FastAPI) -> AsyncIterator[SandboxPSP]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as client:
        yield SandboxPSP(client, "http://sandbox/", API_KEY)


async def test_client_full_flow(psp: SandboxPSP) -> None:
    tok = await psp.tokenize_card(CardDetails("5555555555554444", 12, NEXT_YEAR, "123", name="A B"))
    assert (tok.brand, tok.funding, tok.country, tok.last4) == ("mastercard", "credit", "US", "4444")
    req = AuthorizeRequest(
        reference="pay_c", token=tok.token, amount=900, currency="eur", idempotency_key="pay_c:a"
    )
    pay = await psp.authorize(req)
    assert (pay.status, pay.amount, pay.currency, pay.reference) == ("authorized", 900, "eur", "pay_c")
    assert (await psp.authorize(req)).id == pay.id
    cap = await psp.capture(pay.id, 900, idempotency_key="pay_c:capture")
    assert (cap.status, cap.amount_captured) == ("captured", 900)
    refund = await psp.refund(pay.id, 400, idempotency_key="pay_c:r1")
    assert (refund.payment_id, refund.amount, refund.status) == (pay.id, 400, "succeeded")
    got = await psp.get_payment(pay.id)
    assert (got.status, got.amount_refunded) == ("captured", 400)
    assert [p.id for p in await psp.find_payments("pay_c")] == [pay.id]
    assert await psp.find_payments("pay_other") == []


async def test_client_otp_and_void(psp: SandboxPSP) -> None:
    tok = await psp.tokenize_card(CardDetails("4000002760003184", 12, NEXT_YEAR, "123"))
    pay = await psp.authorize(AuthorizeRequest("pay_o", tok.token, 100, "usd", "pay_o:a"))
    assert pay.status == "requires_action"
    assert pay.next_action is not None and pay.next_action.type == "otp"
    authed = await psp.authenticate(pay.id, "123456", idempotency_key="pay_o:authenticate")
    assert authed.status == "authorized" and authed.next_action is None
    voided = await psp.void(pay.id, idempotency_key="pay_o:void")
    assert voided.status == "canceled"


async def test_client_maps_sandbox_errors(psp: SandboxPSP) -> None:
    with pytest.raises(PSPRejected) as rejected:
        await psp.tokenize_card(CardDetails("4242424242424241", 12, NEXT_YEAR, "123"))
    assert rejected.value.code == "invalid_number"
    assert "4242424242424241" not in str(rejected.value)
    with pytest.raises(PSPRejected) as missing:
        await psp.get_payment("psp_pay_missing")
    assert missing.value.code == "resource_missing"
    tok = await psp.tokenize_card(CardDetails("4000000000000119", 12, NEXT_YEAR, "123"))
    with pytest.raises(PSPUnavailable):
        await psp.authorize(AuthorizeRequest("pay_f", tok.token, 100, "usd", "pay_f:a"))


# ---- client error mapping (MockTransport) ----


def _mock_psp(handler: Callable[[httpx.Request], httpx.Response]) -> tuple[SandboxPSP, httpx.AsyncClient]:
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return SandboxPSP(client, "http://psp.test", "sk_x"), client


def _payment_json(**overrides: Any) -> dict[str, Any]:
    return {
        "id": "psp_pay_1",
        "object": "payment",
        "reference": "pay_1",
        "status": "authorized",
        "amount": 100,
        "currency": "usd",
        "amount_captured": 0,
        "amount_refunded": 0,
        "decline_code": None,
        "message": None,
        "next_action": None,
        "authorizations": 1,
        **overrides,
    }


REQ = AuthorizeRequest(
    reference="pay_1", token="tok_1", amount=100, currency="usd", idempotency_key="pay_1:authorize"
)


async def test_client_sends_key_and_idempotency_key() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=_payment_json())

    psp, client = _mock_psp(handler)
    async with client:
        pay = await psp.authorize(REQ)
    assert pay.id == "psp_pay_1" and pay.status == "authorized"
    assert seen[0].url == "http://psp.test/v1/payments"
    assert seen[0].headers["Authorization"] == "Bearer sk_x"
    assert seen[0].headers["Idempotency-Key"] == "pay_1:authorize"
    assert json.loads(seen[0].content) == {
        "amount": 100,
        "currency": "usd",
        "token": "tok_1",
        "reference": "pay_1",
    }


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_5xx_is_unavailable(status: int) -> None:
    psp, client = _mock_psp(lambda r: httpx.Response(status, json={"error": {"code": "processing_error"}}))
    async with client:
        with pytest.raises(PSPUnavailable) as err:
            await psp.authorize(REQ)
    assert err.value.retry_after is None


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_is_passed_on(status: int) -> None:
    psp, client = _mock_psp(lambda r: httpx.Response(status, headers={"Retry-After": "7"}))
    async with client:
        with pytest.raises(PSPUnavailable) as err:
            await psp.authorize(REQ)
    assert err.value.retry_after == 7.0


def test_retry_after_http_date() -> None:
    later = datetime.fromtimestamp(time.time() + 120, UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")
    value = parse_retry_after(later)
    assert value is not None and 100 < value <= 120
    assert parse_retry_after("garbage") is None
    assert parse_retry_after(None) is None


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (httpx.ConnectError, PSPUnavailable),
        (httpx.ConnectTimeout, PSPUnavailable),
        (httpx.PoolTimeout, PSPUnavailable),
        (httpx.ReadTimeout, PSPAmbiguous),
        (httpx.WriteTimeout, PSPAmbiguous),
        (httpx.RemoteProtocolError, PSPAmbiguous),
        (httpx.ReadError, PSPAmbiguous),
    ],
)
async def test_transport_errors(exc: type[httpx.TransportError], expected: type[Exception]) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc("boom", request=request)

    psp, client = _mock_psp(handler)
    async with client:
        with pytest.raises(expected):
            await psp.capture("psp_pay_1", 100, idempotency_key="pay_1:capture")


@pytest.mark.parametrize(
    ("status", "code"), [(400, "resource_missing"), (404, "resource_missing"), (409, "x")]
)
async def test_4xx_is_rejected_with_the_code(status: int, code: str) -> None:
    psp, client = _mock_psp(lambda r: httpx.Response(status, json={"error": {"code": code, "message": "no"}}))
    async with client:
        with pytest.raises(PSPRejected) as err:
            await psp.void("psp_pay_1", idempotency_key="pay_1:void")
    assert err.value.code == code


async def test_4xx_without_json_is_rejected_without_code() -> None:
    psp, client = _mock_psp(lambda r: httpx.Response(403, text="forbidden"))
    async with client:
        with pytest.raises(PSPRejected) as err:
            await psp.get_payment("psp_pay_1")
    assert err.value.code is None


async def test_unreadable_2xx_is_ambiguous() -> None:
    psp, client = _mock_psp(lambda r: httpx.Response(200, text="<html>"))
    async with client:
        with pytest.raises(PSPAmbiguous):
            await psp.authorize(REQ)


async def test_tokenize_never_logs_the_card(caplog: pytest.LogCaptureFixture) -> None:
    psp, client = _mock_psp(lambda r: httpx.Response(500))
    caplog.set_level(logging.DEBUG)
    async with client:
        with pytest.raises(PSPUnavailable) as err:
            await psp.tokenize_card(CardDetails("4242424242424242", 12, NEXT_YEAR, "987"))
    assert "4242424242424242" not in caplog.text
    assert "4242424242424242" not in str(err.value)


async def test_payment_ids_are_escaped_in_paths() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.raw_path.decode())
        return httpx.Response(200, json=_payment_json())

    psp, client = _mock_psp(handler)
    async with client:
        await psp.get_payment("../tokens")
    assert seen == ["/v1/payments/..%2Ftokens"]
