"""The sandbox PSP's redirect methods (wallet, netbanking) over HTTP (httpx.ASGITransport), and the
SandboxPSP client's side of them (tokenize_method, the return_url it sends)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from psp.base import AuthorizeRequest, MethodDetails
from psp.sandbox.app import create_app
from psp.sandbox.client import SandboxPSP
from tests.activities.test_sandbox_psp import API_KEY, AUTH, WEBHOOK_SECRET, Receiver, tokenize

RETURN_URL = "http://shop.test/v1/payments/pay_1/return"


@pytest.fixture
def receiver() -> Receiver:
    return Receiver()


@pytest.fixture
async def app(receiver: Receiver) -> AsyncIterator[FastAPI]:
    app = create_app(
        db_path=":memory:",
        api_key=API_KEY,
        webhook_secret=WEBHOOK_SECRET,
        webhook_url="http://merchant.test/psp-webhooks",
        webhook_transport=httpx.MockTransport(receiver),
    )
    yield app
    app.state.webhooks.close()
    app.state.sandbox.close()


@pytest.fixture
async def http(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://sandbox", headers=AUTH
    ) as client:
        yield client


@pytest.fixture
async def browser(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The customer's browser: no API key, does not follow redirects (we check where they go)."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sandbox") as client:
        yield client


async def method_token(http: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    r = await http.post("/v1/tokens", json=body)
    assert r.status_code == 200, r.text
    return dict(r.json())


async def redirect_payment(
    http: httpx.AsyncClient, token: str, reference: str = "pay_1", return_url: str | None = RETURN_URL
) -> dict[str, Any]:
    body: dict[str, Any] = {"amount": 2500, "currency": "inr", "token": token, "reference": reference}
    if return_url is not None:
        body["return_url"] = return_url
    r = await http.post("/v1/payments", json=body, headers={"Idempotency-Key": f"{reference}:authorize"})
    assert r.status_code == 200, r.text
    return dict(r.json())


async def test_tokens_for_wallet_and_netbanking(http: httpx.AsyncClient) -> None:
    wallet = await method_token(http, {"type": "wallet"})
    assert wallet["id"].startswith("tok_") and wallet["type"] == "wallet" and wallet["wallet"]
    bank = await method_token(http, {"type": "netbanking", "bank": "hdfc"})
    assert (bank["type"], bank["bank"]) == ("netbanking", "hdfc")
    # cards still tokenize as before
    assert (await tokenize(http))["last4"] == "4242"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"type": "netbanking"}, "bank"),
        ({"type": "netbanking", "bank": "HDFC Bank!"}, "bank"),
        ({"type": "wallet", "bank": "hdfc"}, "bank"),
        ({"type": "wallet", "extra": 1}, "extra"),
        ({"type": "card", "number": "4242424242424242"}, "exp_month"),  # a card body: card rules
    ],
)
async def test_bad_method_tokens(http: httpx.AsyncClient, body: dict[str, Any], param: str) -> None:
    r = await http.post("/v1/tokens", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


async def test_wallet_approved_on_the_page(
    http: httpx.AsyncClient, browser: httpx.AsyncClient, app: FastAPI, receiver: Receiver
) -> None:
    tok = await method_token(http, {"type": "wallet"})
    pay = await redirect_payment(http, tok["id"])
    assert pay["status"] == "requires_action" and pay["authorizations"] == 0
    url = pay["next_action"]["url"]
    assert pay["next_action"]["type"] == "redirect_to_url"
    assert url == f"http://sandbox/redirect/{pay['id']}"

    page = await browser.get(url)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert f"/redirect/{pay['id']}/approve" in page.text and f"/redirect/{pay['id']}/decline" in page.text

    r = await browser.post(f"{url}/approve")
    assert (r.status_code, r.headers["location"]) == (303, RETURN_URL)
    again = await browser.post(f"{url}/approve")  # a double click: same answer, nothing new
    assert again.status_code == 303
    declined_after = await browser.post(f"{url}/decline")
    assert declined_after.status_code == 409

    got = (await http.get(f"/v1/payments/{pay['id']}")).json()
    assert (got["status"], got["authorizations"], got["next_action"]) == ("authorized", 1, None)
    captured = await http.post(
        f"/v1/payments/{pay['id']}/capture", json={"amount": 2500}, headers={"Idempotency-Key": "c1"}
    )
    assert captured.json()["status"] == "captured"

    app.state.webhooks.close()
    assert [e["type"] for e in receiver.events()] == [
        "payment.requires_action",
        "payment.authorized",
        "payment.captured",
    ]


async def test_netbanking_declined_on_the_page(
    http: httpx.AsyncClient, browser: httpx.AsyncClient, app: FastAPI, receiver: Receiver
) -> None:
    tok = await method_token(http, {"type": "netbanking", "bank": "sbi"})
    pay = await redirect_payment(http, tok["id"], return_url=None)
    assert "Sandbox Bank (sbi)" in (await browser.get(pay["next_action"]["url"])).text

    r = await browser.post(f"{pay['next_action']['url']}/decline")
    assert r.status_code == 200 and "failed" in r.text  # no return_url: a page says what happened

    got = (await http.get(f"/v1/payments/{pay['id']}")).json()
    assert (got["status"], got["decline_code"], got["authorizations"]) == ("failed", "bank_declined", 0)
    assert (await browser.post(f"{pay['next_action']['url']}/approve")).status_code == 409
    app.state.webhooks.close()
    assert [e["type"] for e in receiver.events()] == ["payment.requires_action", "payment.failed"]


async def test_voided_redirect_cannot_be_approved(
    http: httpx.AsyncClient, browser: httpx.AsyncClient
) -> None:
    tok = await method_token(http, {"type": "wallet"})
    pay = await redirect_payment(http, tok["id"])
    voided = await http.post(f"/v1/payments/{pay['id']}/void", headers={"Idempotency-Key": "v1"})
    assert voided.json()["status"] == "canceled"
    page = await browser.get(f"/redirect/{pay['id']}")
    assert "canceled" in page.text and "/approve" not in page.text
    assert (await browser.post(f"/redirect/{pay['id']}/approve")).status_code == 409
    assert (await http.get(f"/v1/payments/{pay['id']}")).json()["status"] == "canceled"


async def test_redirect_pages_are_only_for_redirect_payments(
    http: httpx.AsyncClient, browser: httpx.AsyncClient
) -> None:
    card = await tokenize(http, "4000002760003184")  # an OTP card: requires_action, but no page
    r = await http.post(
        "/v1/payments",
        json={"amount": 100, "currency": "usd", "token": card["id"], "reference": "pay_otp"},
        headers={"Idempotency-Key": "k-otp"},
    )
    pid = r.json()["id"]
    assert (await browser.get(f"/redirect/{pid}")).status_code == 404
    assert (await browser.post(f"/redirect/{pid}/approve")).status_code == 404
    assert (await browser.get("/redirect/psp_pay_nope")).status_code == 404
    assert (await http.get(f"/v1/payments/{pid}")).json()["status"] == "requires_action"


async def test_return_url_must_be_http(http: httpx.AsyncClient) -> None:
    tok = await method_token(http, {"type": "wallet"})
    r = await http.post(
        "/v1/payments",
        json={
            "amount": 1,
            "currency": "usd",
            "token": tok["id"],
            "reference": "p",
            "return_url": "javascript:x",
        },
        headers={"Idempotency-Key": "k-js"},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "return_url"


async def test_client_tokenizes_methods_and_sends_the_return_url(app: FastAPI) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as transport:
        psp = SandboxPSP(
            transport, "http://sandbox", API_KEY, return_url="http://api.test/v1/payments/{reference}/return"
        )
        wallet = await psp.tokenize_method(MethodDetails(type="wallet"))
        assert (wallet.type, wallet.provider, wallet.bank) == ("wallet", "sandbox_wallet", None)
        bank = await psp.tokenize_method(MethodDetails(type="netbanking", bank="icici"))
        assert (bank.type, bank.bank) == ("netbanking", "icici")
        pay = await psp.authorize(
            AuthorizeRequest(
                reference="pay_42", token=bank.token, amount=900, currency="inr", idempotency_key="k"
            )
        )
    assert pay.status == "requires_action"
    assert pay.next_action is not None and pay.next_action.type == "redirect_to_url"
    assert pay.next_action.url == f"http://sandbox/redirect/{pay.id}"
    stored = app.state.sandbox.get_payment(pay.id)
    assert stored["return_url"] == "http://api.test/v1/payments/pay_42/return"
