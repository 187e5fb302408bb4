"""Helpers for the PSP-truth integration tests (faults, webhooks, redirect methods): the sandbox's
admin and payment APIs, waiting for a payment's final status, and the agreement check between our
API, the sandbox and the ledger."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from tests.integration.conftest import Api, sandbox_payments
from tests.integration.helpers import customer, payment_body
from tests.stack import SANDBOX_KEY, Stack

FINAL = ("succeeded", "failed", "canceled")
# What the sandbox holds for a payment that is not ours (anymore): nothing captured, nothing held.
RELEASED = ("failed", "canceled")


def sandbox_http(stack: Stack) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=stack.sandbox_url, headers={"Authorization": f"Bearer {SANDBOX_KEY}"}, timeout=10
    )


def browser(stack: Stack) -> httpx.AsyncClient:
    """The customer's browser: no API key."""
    return httpx.AsyncClient(timeout=30)


@asynccontextmanager
async def faults(stack: Stack, **settings: Any) -> AsyncIterator[dict[str, Any]]:
    """Sandbox faults on (POST /admin/faults) for the block, off again after it whatever happens.
    They hit every non-admin request, the test's own reads of the sandbox too: check agreement
    after the block."""
    async with sandbox_http(stack) as http:
        # seed 1: each request fault class hits several of the first dozen requests at rate 0.3
        r = await http.post("/admin/faults", json={"seed": 1, **settings})
        assert r.status_code == 200, r.text
        try:
            yield r.json()
        finally:
            cleared = await http.delete("/admin/faults")
            assert cleared.status_code == 200, cleared.text


async def injected(stack: Stack) -> dict[str, int]:
    async with sandbox_http(stack) as http:
        return dict((await http.get("/admin/faults")).json()["injected"])


async def wallet(api: Api, customer_id: str) -> dict[str, Any]:
    r = await api.post("/v1/payment_methods", json={"type": "wallet", "customer": customer_id})
    assert r.status_code == 200, r.text
    return dict(r.json())


async def netbanking(api: Api, customer_id: str, bank: str = "hdfc") -> dict[str, Any]:
    r = await api.post(
        "/v1/payment_methods",
        json={"type": "netbanking", "customer": customer_id, "netbanking": {"bank": bank}},
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


async def fresh_customers(api: Api, n: int) -> list[str]:
    """One customer per payment: the fraud rules' velocity limit is per customer."""
    return [c["id"] for c in await asyncio.gather(*[customer(api) for _ in range(n)])]


async def pay(api: Api, customer_id: str, pm_id: str, amount: int) -> dict[str, Any]:
    """POST /v1/payments; the payment whatever the answer (a failed one rides in the 402/503 error)."""
    r = await api.post(
        "/v1/payments",
        json=payment_body(customer_id, pm_id, amount),
        headers={"Idempotency-Key": f"it-{uuid.uuid4()}"},
    )
    body = r.json()
    payment = body if "id" in body else (body.get("error") or {}).get("payment")
    assert payment is not None, (r.status_code, r.text)
    return dict(payment)


async def wait_final(api: Api, payment_id: str, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        r = await api.get(f"/v1/payments/{payment_id}")
        assert r.status_code == 200, r.text
        payment = dict(r.json())
        if payment["status"] in FINAL:
            return payment
        if time.monotonic() > deadline:
            raise AssertionError(f"{payment_id} still {payment['status']} after {timeout} s: {payment}")
        await asyncio.sleep(0.5)


async def ledger_refs(ops: Api, stack: Stack, currency: str = "usd") -> list[str]:
    """The payment ids of the merchant's payable entries (newest 1000)."""
    r = await ops.get(
        f"/v1/ledger/accounts/merchant_payable:{stack.merchant_id}:{currency}", params={"limit": 1000}
    )
    assert r.status_code == 200, r.text
    return [e["ref"] for e in r.json()["entries"]]


async def assert_agrees(
    api: Api, ops: Api, stack: Stack, payment: dict[str, Any], currency: str = "usd"
) -> None:
    """Our final status, the sandbox's payments for the reference and the ledger tell one story:
    succeeded = exactly one sandbox payment, captured once for the amount we received, posted
    once; failed/canceled = nothing captured or held at the sandbox, nothing posted."""
    pid = payment["id"]
    held = await sandbox_payments(stack, pid)
    posted = (await ledger_refs(ops, stack, currency)).count(pid)
    if payment["status"] == "succeeded":
        assert len(held) == 1, (pid, held)
        [psp] = held
        assert (psp["status"], psp["amount_captured"], psp["authorizations"]) == (
            "captured",
            payment["amount_received"],
            1,
        ), (pid, psp)
        assert payment["amount_received"] == payment["amount"]
        assert posted == 1, (pid, posted)
    else:
        assert payment["status"] in ("failed", "canceled"), payment
        for psp in held:
            net = psp["amount_captured"] - psp["amount_refunded"]
            assert psp["status"] in (*RELEASED, "refunded") and net == 0, (pid, payment["status"], psp)
        assert posted == 0, (pid, posted)
    r = await ops.get("/v1/ledger/check")
    assert r.json()["balanced"] is True, r.text
