"""StripePSP (psp/stripe.py) against localstripe, a third-party fake Stripe server started by the tests
on a free 127.0.0.1 port (tests/localstripe_launcher.py); its error mapping, Stripe's search path and
disputes through httpx.MockTransport; Stripe-signed webhooks (psp/stripe_webhooks.py) delivered by
localstripe itself."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
import stripe
from aiohttp import web

from core.config import Settings
from psp.base import AuthorizeRequest, CardDetails, PSPAmbiguous, PSPRejected, PSPUnavailable
from psp.registry import build_psps
from psp.signing import SignatureError, sign_header
from psp.stripe import REFERENCE_KEY, StripePSP, payment_from_intent
from psp.stripe_webhooks import SIGNATURE_HEADER, WebhookPayloadError, parse_event
from tests.localstripe_launcher import TEST_API_KEY, running_localstripe

CARD_OK = "4242424242424242"
CARD_3DS = "4000002760003184"  # 3-D Secure required, then succeeds
CARD_3DS_DECLINE = "4000008260003178"  # 3-D Secure required, then the charge is declined
EXP_YEAR = 2034  # localstripe accepts expiry years 2019..2099 only


@pytest.fixture(scope="module")
def localstripe() -> Iterator[str]:
    with running_localstripe() as base:
        yield base


@pytest.fixture(scope="module")
async def psp(localstripe: str) -> AsyncIterator[StripePSP]:
    adapter = StripePSP(TEST_API_KEY, api_base=localstripe, localstripe_compat=True)
    yield adapter
    await adapter.aclose()


@pytest.fixture(scope="module")
async def raw(localstripe: str) -> AsyncIterator[httpx.AsyncClient]:
    """Straight to localstripe, to check what the adapter did there."""
    async with httpx.AsyncClient(base_url=localstripe, auth=(TEST_API_KEY, ""), timeout=10) as client:
        yield client


_refs = iter(range(1_000_000))


def new_ref() -> str:
    return f"pay_t{next(_refs)}_{int(time.time() * 1000) % 100_000}"


async def authorize(psp: StripePSP, number: str, *, amount: int = 1000, reference: str | None = None) -> Any:
    tok = await psp.tokenize_card(CardDetails(number, 12, EXP_YEAR, "123"))
    ref = reference or new_ref()
    req = AuthorizeRequest(
        reference=ref, token=tok.token, amount=amount, currency="usd", idempotency_key=f"{ref}:a"
    )
    return await psp.authorize(req), req


async def intents_at_localstripe(raw: httpx.AsyncClient, reference: str) -> list[dict[str, Any]]:
    r = await raw.get("/v1/payment_intents", params={"limit": 100})
    assert r.status_code == 200, r.text
    assert not r.json()["has_more"]
    return [i for i in r.json()["data"] if i["metadata"].get(REFERENCE_KEY) == reference]


# ---- against localstripe ----


async def test_tokenize_card(psp: StripePSP) -> None:
    tok = await psp.tokenize_card(CardDetails("4242 4242 4242 4242", 7, EXP_YEAR, "321", name="Ada L"))
    assert tok.token.startswith("pm_")
    assert (tok.brand, tok.last4, tok.exp_month, tok.exp_year) == ("visa", "4242", 7, EXP_YEAR)
    assert tok.funding == "credit" and len(tok.country) == 2 and tok.country.isupper()


async def test_tokenize_bad_card_is_rejected_without_the_number(psp: StripePSP) -> None:
    with pytest.raises(PSPRejected) as err:
        await psp.tokenize_card(CardDetails("42424242424242", 12, EXP_YEAR, "123"))
    assert "42424242424242" not in str(err.value)


async def test_tokenize_never_logs_the_card(psp: StripePSP, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    await psp.tokenize_card(CardDetails("5555555555554444", 12, EXP_YEAR, "987"))
    assert "Request to Stripe api" in caplog.text  # the SDK did log this request...
    assert "5555555555554444" not in caplog.text and "cvc" not in caplog.text  # ...but not its body


async def test_success_authorize_then_capture(psp: StripePSP, raw: httpx.AsyncClient) -> None:
    pay, req = await authorize(psp, CARD_OK, amount=2500)
    assert (pay.status, pay.amount, pay.currency, pay.reference) == ("authorized", 2500, "usd", req.reference)
    assert (pay.amount_captured, pay.decline_code, pay.next_action) == (0, None, None)
    (intent,) = await intents_at_localstripe(raw, req.reference)
    assert intent["id"] == pay.id and intent["capture_method"] == "manual"
    assert intent["status"] == "requires_capture"

    captured = await psp.capture(pay.id, 2500, idempotency_key=f"{req.reference}:capture")
    assert (captured.status, captured.amount_captured, captured.amount_refunded) == ("captured", 2500, 0)
    assert (await raw.get(f"/v1/payment_intents/{pay.id}")).json()["status"] == "succeeded"
    # a repeated capture answers with the first one's result instead of failing
    again = await psp.capture(pay.id, 2500, idempotency_key=f"{req.reference}:capture")
    assert (again.status, again.amount_captured) == ("captured", 2500)
    assert [p.id for p in await psp.find_payments(req.reference)] == [pay.id]


async def test_manual_capture_holds_until_captured(psp: StripePSP, raw: httpx.AsyncClient) -> None:
    pay, req = await authorize(psp, CARD_OK, amount=1800)
    held = await psp.get_payment(pay.id)
    assert (held.status, held.amount_captured) == ("authorized", 0)
    charge = (await raw.get(f"/v1/payment_intents/{pay.id}")).json()["latest_charge"]
    assert charge["captured"] is False  # authorized only: no money moved yet
    captured = await psp.capture(pay.id, 1800, idempotency_key=f"{req.reference}:capture")
    assert (captured.status, captured.amount_captured) == ("captured", 1800)
    assert (await psp.get_payment(pay.id)).status == "captured"


async def test_cancel(psp: StripePSP, raw: httpx.AsyncClient) -> None:
    pay, req = await authorize(psp, CARD_OK)
    voided = await psp.void(pay.id, idempotency_key=f"{req.reference}:void")
    assert voided.status == "canceled"
    assert (await raw.get(f"/v1/payment_intents/{pay.id}")).json()["status"] == "canceled"
    assert (await psp.void(pay.id, idempotency_key=f"{req.reference}:void")).status == "canceled"
    with pytest.raises(PSPRejected) as err:
        await psp.capture(pay.id, 1000, idempotency_key=f"{req.reference}:capture")
    assert err.value.code == "payment_unexpected_state"


async def test_3ds_success(psp: StripePSP) -> None:
    pay, req = await authorize(psp, CARD_3DS, amount=3000)
    assert pay.status == "requires_action"
    assert pay.next_action is not None and pay.next_action.type == "otp"
    authed = await psp.authenticate(pay.id, "123456", idempotency_key=f"{req.reference}:authenticate")
    assert (authed.status, authed.next_action) == ("authorized", None)
    # repeated (a retried activity): the answer, not an error
    again = await psp.authenticate(pay.id, "123456", idempotency_key=f"{req.reference}:authenticate")
    assert again.status == "authorized"
    captured = await psp.capture(pay.id, 3000, idempotency_key=f"{req.reference}:capture")
    assert (captured.status, captured.amount_captured) == ("captured", 3000)


async def test_3ds_failure(psp: StripePSP) -> None:
    pay, req = await authorize(psp, CARD_3DS)
    assert pay.status == "requires_action"
    failed = await psp.authenticate(pay.id, "000000", idempotency_key=f"{req.reference}:authenticate")
    assert (failed.status, failed.decline_code) == ("failed", "authentication_failed")
    assert failed.message
    # nothing is held: voiding the failed payment is a no-op, not an error
    assert (await psp.void(pay.id, idempotency_key=f"{req.reference}:void")).status == "failed"


async def test_3ds_passed_then_declined(psp: StripePSP) -> None:
    pay, req = await authorize(psp, CARD_3DS_DECLINE)
    assert pay.status == "requires_action"
    failed = await psp.authenticate(pay.id, "123456", idempotency_key=f"{req.reference}:authenticate")
    assert (failed.status, failed.decline_code) == ("failed", "generic_decline")


@pytest.mark.parametrize(
    "number",
    [
        "4000000000000002",  # Stripe's generic decline (declined on charge, via the launcher's patch)
        "4000000000000341",  # attaches fine, declined when charged (native localstripe behaviour)
    ],
)
async def test_decline_is_a_result(psp: StripePSP, raw: httpx.AsyncClient, number: str) -> None:
    pay, req = await authorize(psp, number)
    assert (pay.status, pay.decline_code, pay.message) == (
        "failed",
        "generic_decline",
        "Your card was declined.",
    )
    (intent,) = await intents_at_localstripe(raw, req.reference)
    assert intent["status"] == "requires_payment_method"
    assert intent["last_payment_error"]["code"] == "card_declined"
    # the same authorize again answers the decline; it does not try the card a second time
    again = await psp.authorize(req)
    assert (again.id, again.status) == (pay.id, "failed")
    assert len(await intents_at_localstripe(raw, req.reference)) == 1


async def test_partial_and_full_refund(psp: StripePSP) -> None:
    pay, req = await authorize(psp, CARD_OK, amount=1000)
    await psp.capture(pay.id, 1000, idempotency_key=f"{req.reference}:capture")
    first = await psp.refund(pay.id, 300, idempotency_key=f"{req.reference}:r1")
    assert (first.payment_id, first.amount, first.status) == (pay.id, 300, "succeeded")
    partly = await psp.get_payment(pay.id)
    assert (partly.status, partly.amount_captured, partly.amount_refunded) == ("captured", 1000, 300)
    # the same refund again (localstripe ignores idempotency keys): found by its key, not made twice
    assert await psp.refund(pay.id, 300, idempotency_key=f"{req.reference}:r1") == first
    assert (await psp.get_payment(pay.id)).amount_refunded == 300
    rest = await psp.refund(pay.id, 700, idempotency_key=f"{req.reference}:r2")
    assert rest.id != first.id and rest.amount == 700
    full = await psp.get_payment(pay.id)
    assert (full.status, full.amount_refunded) == ("refunded", 1000)
    with pytest.raises(PSPRejected) as err:
        await psp.refund(pay.id, 1, idempotency_key=f"{req.reference}:r3")
    assert err.value.code == "amount_too_large"


async def test_refund_before_capture_is_rejected(psp: StripePSP) -> None:
    pay, req = await authorize(psp, CARD_OK)
    with pytest.raises(PSPRejected) as err:
        await psp.refund(pay.id, 100, idempotency_key=f"{req.reference}:r1")
    assert err.value.code == "payment_unexpected_state"


async def test_duplicate_authorize_makes_one_payment_intent(psp: StripePSP, raw: httpx.AsyncClient) -> None:
    pay, req = await authorize(psp, CARD_OK)
    again = await psp.authorize(req)
    assert (again.id, again.status) == (pay.id, "authorized")
    assert len(await intents_at_localstripe(raw, req.reference)) == 1
    # the same reference for another amount is a bug upstream, not a new payment
    with pytest.raises(PSPRejected) as err:
        await psp.authorize(AuthorizeRequest(req.reference, req.token, 999, "usd", req.idempotency_key))
    assert err.value.code == "reference_reused"


async def test_authorize_resumes_an_intent_whose_confirm_was_lost(
    psp: StripePSP, raw: httpx.AsyncClient
) -> None:
    """The create went through and the confirm never did: the retry confirms that intent."""
    tok = await psp.tokenize_card(CardDetails(CARD_OK, 12, EXP_YEAR, "123"))
    ref = new_ref()
    r = await raw.post(
        "/v1/payment_intents",
        data={
            "amount": "1200",
            "currency": "usd",
            "payment_method": tok.token,
            "capture_method": "manual",
            f"metadata[{REFERENCE_KEY}]": ref,
        },
    )
    assert r.status_code == 200 and r.json()["status"] == "requires_confirmation"
    assert await psp.find_payments(ref) == []  # not an authorization yet: nothing is held
    pay = await psp.authorize(AuthorizeRequest(ref, tok.token, 1200, "usd", f"{ref}:a"))
    assert (pay.id, pay.status) == (r.json()["id"], "authorized")
    assert len(await intents_at_localstripe(raw, ref)) == 1


async def test_get_unknown_payment_is_rejected(psp: StripePSP) -> None:
    with pytest.raises(PSPRejected):
        await psp.get_payment("pi_doesnotexist")


# ---- webhooks signed by localstripe ----


@contextlib.asynccontextmanager
async def webhook_receiver() -> AsyncIterator[tuple[str, asyncio.Queue[tuple[bytes, str]]]]:
    received: asyncio.Queue[tuple[bytes, str]] = asyncio.Queue()

    async def handle(request: web.Request) -> web.Response:
        received.put_nowait((await request.read(), request.headers.get(SIGNATURE_HEADER, "")))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/stripe", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}/stripe", received
    finally:
        await runner.cleanup()


async def test_stripe_signed_webhook_accepted_and_mutations_rejected(
    psp: StripePSP, raw: httpx.AsyncClient
) -> None:
    secret = "whsec_paysaga_test"
    async with webhook_receiver() as (url, received):
        r = await raw.post(
            "/_config/webhooks/paysaga",
            json={"url": url, "secret": secret, "events": ["payment_intent.succeeded"]},
        )
        assert r.status_code == 200, r.text
        pay, req = await authorize(psp, CARD_OK, amount=4100)
        await psp.capture(pay.id, 4100, idempotency_key=f"{req.reference}:capture")
        deadline = time.monotonic() + 15
        while True:  # localstripe sends each event about a second after it happened
            body, header = await asyncio.wait_for(received.get(), max(0.1, deadline - time.monotonic()))
            if json.loads(body)["data"]["object"]["id"] == pay.id:
                break

    assert header.startswith("t=") and ",v1=" in header
    event = parse_event(body, header, secret, otp_challenges=True)
    assert event.type == "payment_intent.succeeded" and event.id.startswith("evt_")
    assert (event.object_type, event.psp_payment_id, event.reference) == (
        "payment_intent",
        pay.id,
        req.reference,
    )
    assert event.payment is not None
    assert (event.payment.status, event.payment.amount_captured) == ("captured", 4100)

    with pytest.raises(SignatureError):
        parse_event(body.replace(b"4100", b"4101"), header, secret)
    with pytest.raises(SignatureError):
        parse_event(body, header, "whsec_other")
    timestamp = int(header.split(",")[0].removeprefix("t="))
    with pytest.raises(SignatureError):
        parse_event(body, header, secret, now=timestamp + 301)
    tampered_time = header.replace(f"t={timestamp}", f"t={timestamp + 1}")
    with pytest.raises(SignatureError):
        parse_event(body, tampered_time, secret)
    with pytest.raises(SignatureError):
        parse_event(body, None, secret)


def test_webhook_payload_errors() -> None:
    secret, now = "whsec_x", int(time.time())

    def signed(payload: bytes) -> tuple[bytes, str]:
        return payload, sign_header(payload, secret, now)

    for payload in (b"not json", b"[]", b'{"id": "evt_1", "type": "x", "created": 1, "data": {}}'):
        body, header = signed(payload)
        with pytest.raises(WebhookPayloadError):
            parse_event(body, header, secret)
    refund = {
        "id": "evt_2",
        "object": "event",
        "type": "charge.refunded",
        "created": now,
        "data": {"object": {"id": "ch_1", "object": "charge", "payment_intent": "pi_9", "metadata": {}}},
    }
    event = parse_event(*signed(json.dumps(refund).encode()), secret)
    assert (event.object_type, event.psp_payment_id, event.reference, event.payment) == (
        "charge",
        "pi_9",
        None,
        None,
    )
    dispute = {
        "id": "evt_3",
        "object": "event",
        "type": "charge.dispute.created",
        "created": now,
        "data": {
            "object": {
                "id": "dp_1",
                "object": "dispute",
                "amount": 500,
                "currency": "usd",
                "status": "needs_response",
                "reason": "fraudulent",
                "payment_intent": "pi_7",
                "evidence_details": {"due_by": now + 86400},
                "created": now,
            }
        },
    }
    event = parse_event(*signed(json.dumps(dispute).encode()), secret)
    assert event.dispute is not None and event.psp_payment_id == "pi_7"
    assert (event.dispute.status, event.dispute.evidence_due_by) == ("needs_response", now + 86400)


# ---- mapping, error handling, search and disputes (httpx.MockTransport) ----


Handler = Callable[[httpx.Request], httpx.Response]


def mock_psp(handler: Handler, *, compat: bool = False) -> StripePSP:
    http = stripe.HTTPXClient()
    http._client_async = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return StripePSP(
        "sk_test_mock", api_base="http://stripe.test", http_client=http, localstripe_compat=compat
    )


def intent_json(**overrides: Any) -> dict[str, Any]:
    return {
        "id": "pi_1",
        "object": "payment_intent",
        "amount": 1000,
        "currency": "usd",
        "status": "requires_capture",
        "metadata": {REFERENCE_KEY: "pay_1"},
        "latest_charge": None,
        "amount_received": 0,
        "next_action": None,
        "last_payment_error": None,
        "created": 1_700_000_000,
        **overrides,
    }


def form(request: httpx.Request) -> dict[str, list[str]]:
    return parse_qs(request.content.decode())


REQ = AuthorizeRequest(
    reference="pay_1", token="pm_1", amount=1000, currency="usd", idempotency_key="pay_1:a"
)


def test_real_stripe_redirect_next_action_and_amounts() -> None:
    action = {
        "type": "redirect_to_url",
        "redirect_to_url": {"url": "https://hooks.stripe.com/3ds/x", "return_url": "r"},
    }
    pay = payment_from_intent(intent_json(status="requires_action", next_action=action))
    assert pay is not None and pay.next_action is not None
    assert (pay.status, pay.next_action.type, pay.next_action.url) == (
        "requires_action",
        "redirect_to_url",
        "https://hooks.stripe.com/3ds/x",
    )
    charge = {"id": "ch_1", "amount": 1000, "amount_captured": 600, "amount_refunded": 600, "captured": True}
    done = payment_from_intent(intent_json(status="succeeded", latest_charge=charge))
    assert done is not None and (done.status, done.amount_captured, done.amount_refunded) == (
        "refunded",
        600,
        600,
    )
    err = {"code": "card_declined", "decline_code": "insufficient_funds", "message": "Insufficient funds."}
    failed = payment_from_intent(intent_json(status="requires_payment_method", last_payment_error=err))
    assert failed is not None and (failed.status, failed.decline_code) == ("failed", "insufficient_funds")
    assert payment_from_intent(intent_json(status="requires_confirmation")) is None
    assert payment_from_intent(intent_json(status="processing")) is None


async def test_authorize_searches_then_creates_then_confirms_with_derived_keys() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/v1/payment_intents/search":
            return httpx.Response(200, json={"object": "search_result", "data": [], "has_more": False})
        if request.url.path == "/v1/payment_intents":
            return httpx.Response(200, json=intent_json(status="requires_confirmation"))
        return httpx.Response(200, json=intent_json())

    psp = mock_psp(handler)
    pay = await psp.authorize(REQ)
    assert (pay.status, pay.reference) == ("authorized", "pay_1")
    search, create, confirm = seen
    assert search.url.params["query"] == f"metadata['{REFERENCE_KEY}']:'pay_1'"
    assert create.headers["Idempotency-Key"] == "pay_1:a:create"
    assert confirm.url.path == "/v1/payment_intents/pi_1/confirm"
    assert confirm.headers["Idempotency-Key"] == "pay_1:a:confirm"
    body = form(create)
    assert body["capture_method"] == ["manual"] and body[f"metadata[{REFERENCE_KEY}]"] == ["pay_1"]
    assert body["payment_method"] == ["pm_1"] and "confirm" not in body  # created, not charged


async def test_search_missing_falls_back_to_listing() -> None:
    paths: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        if request.url.path == "/v1/payment_intents/search":
            return httpx.Response(
                404, json={"error": {"type": "invalid_request_error", "message": "Not Found"}}
            )
        other = intent_json(id="pi_0", metadata={REFERENCE_KEY: "pay_other"})
        return httpx.Response(200, json={"object": "list", "data": [other, intent_json()], "has_more": False})

    psp = mock_psp(handler)
    assert [p.id for p in await psp.find_payments("pay_1")] == ["pi_1"]
    assert [p.id for p in await psp.find_payments("pay_1")] == ["pi_1"]
    assert paths == ["/v1/payment_intents/search", "/v1/payment_intents", "/v1/payment_intents"]


async def test_card_error_on_confirm_is_a_declined_result() -> None:
    declined = intent_json(
        status="requires_payment_method",
        last_payment_error={
            "code": "card_declined",
            "decline_code": "insufficient_funds",
            "message": "No funds.",
        },
    )

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/payment_intents/search":
            return httpx.Response(200, json={"object": "search_result", "data": [], "has_more": False})
        if request.url.path == "/v1/payment_intents":
            return httpx.Response(200, json=intent_json(status="requires_confirmation"))
        if request.url.path.endswith("/confirm"):
            error = {"type": "card_error", "code": "card_declined", "decline_code": "insufficient_funds"}
            return httpx.Response(402, json={"error": {**error, "message": "No funds."}})
        return httpx.Response(200, json=declined)

    pay = await mock_psp(handler).authorize(REQ)
    assert (pay.status, pay.decline_code, pay.message) == ("failed", "insufficient_funds", "No funds.")


def _raising(exc: type[httpx.TransportError]) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc("boom", request=request)

    return handler


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (httpx.ConnectError, PSPUnavailable),
        (httpx.ConnectTimeout, PSPUnavailable),
        (httpx.ReadTimeout, PSPAmbiguous),
        (httpx.RemoteProtocolError, PSPAmbiguous),
    ],
)
async def test_transport_errors_on_a_post(exc: type[httpx.TransportError], expected: type[Exception]) -> None:
    retrieved = {"done": False}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":  # the capture's first read succeeds, the capture itself fails
            retrieved["done"] = True
            return httpx.Response(200, json=intent_json())
        raise exc("boom", request=request)

    with pytest.raises(expected):
        await mock_psp(handler).capture("pi_1", 1000, idempotency_key="pay_1:capture")
    assert retrieved["done"]


async def test_a_read_that_times_out_is_unavailable_not_ambiguous() -> None:
    with pytest.raises(PSPUnavailable):
        await mock_psp(_raising(httpx.ReadTimeout)).get_payment("pi_1")


@pytest.mark.parametrize(("status", "retry_after"), [(429, 9.0), (500, None), (503, 4.0), (409, None)])
async def test_rate_limit_and_5xx_are_unavailable(status: int, retry_after: float | None) -> None:
    headers = {"Retry-After": str(int(retry_after))} if retry_after else {}
    body = {"error": {"type": "api_error", "message": "try later"}}
    psp = mock_psp(lambda r: httpx.Response(status, json=body, headers=headers))
    with pytest.raises(PSPUnavailable) as err:
        await psp.get_payment("pi_1")
    assert err.value.retry_after == retry_after


@pytest.mark.parametrize(
    ("status", "error", "code"),
    [
        (
            400,
            {"type": "invalid_request_error", "code": "parameter_invalid_integer"},
            "parameter_invalid_integer",
        ),
        (404, {"type": "invalid_request_error", "code": "resource_missing"}, "resource_missing"),
        (400, {"type": "idempotency_error"}, "idempotency_key_reused"),
        (401, {"type": "invalid_request_error"}, None),
        (402, {"type": "card_error", "code": "incorrect_number"}, "incorrect_number"),
    ],
)
async def test_refusals_are_rejected(status: int, error: dict[str, str], code: str | None) -> None:
    psp = mock_psp(lambda r: httpx.Response(status, json={"error": {**error, "message": "no"}}))
    with pytest.raises(PSPRejected) as err:
        await psp.tokenize_card(CardDetails(CARD_OK, 12, EXP_YEAR, "123"))
    assert err.value.code == code


def dispute_json(**overrides: Any) -> dict[str, Any]:
    return {
        "id": "dp_1",
        "object": "dispute",
        "amount": 1000,
        "currency": "usd",
        "status": "needs_response",
        "reason": "fraudulent",
        "payment_intent": "pi_1",
        "charge": "ch_1",
        "evidence_details": {"due_by": 1_800_000_000},
        "created": 1_700_000_000,
        **overrides,
    }


async def test_disputes() -> None:
    state = {"status": "needs_response"}
    posts: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            posts.append(request)
            state["status"] = "under_review"
        return httpx.Response(200, json=dispute_json(status=state["status"]))

    psp = mock_psp(handler)
    got = await psp.get_dispute("dp_1")
    assert (got.status, got.payment_id, got.reason, got.evidence_due_by) == (
        "needs_response",
        "pi_1",
        "fraudulent",
        1_800_000_000,
    )
    evidence = {"uncategorized_text": "Delivered, signed for.", "product_description": "A lamp"}
    submitted = await psp.submit_dispute_evidence("dp_1", evidence, idempotency_key="dp_1:evidence")
    assert submitted.status == "under_review"
    again = await psp.submit_dispute_evidence("dp_1", evidence, idempotency_key="dp_1:evidence")
    assert again.status == "under_review"
    (post,) = posts  # submitted once
    assert post.headers["Idempotency-Key"] == "dp_1:evidence"
    body = form(post)
    assert body["evidence[uncategorized_text]"] == ["Delivered, signed for."] and body["submit"] == ["true"]


# ---- construction ----


async def test_registry_adds_stripe_only_when_configured() -> None:
    base = Settings()
    async with httpx.AsyncClient() as http:
        assert set(build_psps(base, http)) == {"sandbox"}
        configured = base.model_copy(
            update={"stripe_api_key": "sk_test_x", "stripe_api_base": "http://127.0.0.1:1"}
        )
        psps = build_psps(configured, http)
        stripe_psp = psps["stripe"]
        assert isinstance(stripe_psp, StripePSP) and stripe_psp.name == "stripe"
        assert psps["sandbox"].name == "sandbox"
        await stripe_psp.aclose()


def test_debug_logging_of_request_bodies_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stripe, "log", "debug")
    with pytest.raises(ValueError, match="card data"):
        StripePSP("sk_test_x")
