"""Disputes end to end: the sandbox opens a dispute (admin API) -> signed dispute.created webhook to
the API -> DisputeWorkflow reserves the amount -> evidence through the API -> the sandbox decides
-> dispute.closed webhook -> released, or charged back with the fee. Needs the sandbox's webhooks
pointed at the API (SANDBOX_WEBHOOK_URL = <api>/v1/psp/sandbox/webhooks, as `paysaga up` sets it).

The ledger check after every test is the conftest's `invariants` fixture."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from tests.integration.conftest import Api, Stack, sandbox_payments
from tests.integration.helpers import customer_with_card, payment_body
from tests.stack import SANDBOX_KEY

pytestmark = pytest.mark.integration

AMOUNT = 2_000
CHARGEBACK_FEE = 1_500  # the merchants' default


async def sandbox_admin(stack: Stack, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    async with httpx.AsyncClient(
        base_url=stack.sandbox_url, headers={"Authorization": f"Bearer {SANDBOX_KEY}"}, timeout=10
    ) as http:
        r = await http.post(path, json=body)
    assert r.status_code == 200, r.text
    return dict(r.json())


async def eventually(probe: Callable[[], Awaitable[Any]], what: str, timeout: float = 30) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        found = await probe()
        if found:
            return found
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


async def balance(ops: Api, account: str) -> int:
    r = await ops.get(f"/v1/ledger/accounts/{account}")
    assert r.status_code == 200, r.text
    return int(r.json()["balance"])


async def paid(api: Api) -> dict[str, Any]:
    cus, pm = await customer_with_card(api)
    r = await api.post("/v1/payments", json=payment_body(cus, pm, amount=AMOUNT))
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "succeeded"
    return dict(r.json())


async def disputed(api: Api, stack: Stack, payment_id: str, **body: Any) -> tuple[dict[str, Any], str]:
    """Open a dispute at the sandbox; answers with our dispute once the workflow reserved it, and
    the sandbox's id of it."""
    [psp_payment] = await sandbox_payments(stack, payment_id)
    psp_dispute = await sandbox_admin(stack, f"/admin/payments/{psp_payment['id']}/dispute", body or None)

    async def ours() -> dict[str, Any] | None:
        listed = (await api.get("/v1/disputes", params={"payment": payment_id})).json()["data"]
        return listed[0] if listed else None

    dispute = await eventually(
        ours, "the dispute.created webhook (is SANDBOX_WEBHOOK_URL pointed at /v1/psp/sandbox/webhooks?)"
    )

    async def reserved() -> bool:
        return (await api.get(f"/v1/payments/{payment_id}")).json()["status"] == "disputed"

    await eventually(reserved, "the payment to be disputed")
    return dict(dispute), str(psp_dispute["id"])


async def dispute_status(api: Api, dispute_id: str, status: str) -> dict[str, Any]:
    async def reached() -> dict[str, Any] | None:
        body = (await api.get(f"/v1/disputes/{dispute_id}")).json()
        return body if body["status"] == status else None

    return dict(await eventually(reached, f"dispute {dispute_id} to be {status}"))


async def test_dispute_won_with_evidence(api: Api, ops: Api, other_api: Api, stack: Stack) -> None:
    payment = await paid(api)
    merchant = stack.merchant_id
    payable_before = await balance(ops, f"merchant_payable:{merchant}:usd")
    reserve_before = await balance(ops, f"dispute_reserve:{merchant}:usd")

    dispute, _ = await disputed(api, stack, payment["id"], reason="product_not_received")
    assert (dispute["object"], dispute["amount"], dispute["currency"], dispute["reason"]) == (
        "dispute",
        AMOUNT,
        "usd",
        "product_not_received",
    )
    assert dispute["id"].startswith("dp_") and dispute["status"] == "needs_response"
    assert await balance(ops, f"dispute_reserve:{merchant}:usd") == reserve_before - AMOUNT
    assert await balance(ops, f"merchant_payable:{merchant}:usd") == payable_before + AMOUNT
    assert (await other_api.get(f"/v1/disputes/{dispute['id']}")).status_code == 404

    r = await api.post(
        f"/v1/disputes/{dispute['id']}/evidence",
        json={"evidence": {"receipt": "order 1234 delivered", "shipping_tracking_number": "1Z999"}},
        headers={"Idempotency-Key": f"ev-{dispute['id']}"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["status"] in ("under_review", "won")
    assert r.json()["evidence"]["receipt"] == "order 1234 delivered"

    await dispute_status(api, dispute["id"], "won")
    after = (await api.get(f"/v1/payments/{payment['id']}")).json()
    assert after["status"] == "succeeded"
    assert any("dispute" in (e["reason"] or "") and "won" in (e["reason"] or "") for e in after["timeline"])
    assert await balance(ops, f"dispute_reserve:{merchant}:usd") == reserve_before
    assert await balance(ops, f"merchant_payable:{merchant}:usd") == payable_before

    closed = await api.post(f"/v1/disputes/{dispute['id']}/evidence", json={"evidence": {"receipt": "again"}})
    assert closed.status_code == 409
    assert closed.json()["error"]["code"] == "dispute_unexpected_state"


async def test_dispute_lost_charges_back_with_the_fee(api: Api, ops: Api, stack: Stack) -> None:
    payment = await paid(api)
    merchant = stack.merchant_id
    payable_before = await balance(ops, f"merchant_payable:{merchant}:usd")
    reserve_before = await balance(ops, f"dispute_reserve:{merchant}:usd")
    fees_before = await balance(ops, "platform_fees:usd")
    receivable_before = await balance(ops, "psp_receivable:sandbox:usd")

    dispute, psp_dispute = await disputed(api, stack, payment["id"])
    # the issuer decides before the merchant answers: the PSP closes it as lost
    await sandbox_admin(stack, f"/admin/disputes/{psp_dispute}/close", {"outcome": "lost"})

    await dispute_status(api, dispute["id"], "lost")
    assert (await api.get(f"/v1/payments/{payment['id']}")).json()["status"] == "disputed"
    assert await balance(ops, f"dispute_reserve:{merchant}:usd") == reserve_before
    assert await balance(ops, f"merchant_payable:{merchant}:usd") == payable_before + AMOUNT + CHARGEBACK_FEE
    assert await balance(ops, "platform_fees:usd") == fees_before - CHARGEBACK_FEE
    assert await balance(ops, "psp_receivable:sandbox:usd") == receivable_before - AMOUNT
    listed = (await api.get("/v1/disputes", params={"status": "lost", "limit": 100})).json()
    assert dispute["id"] in [d["id"] for d in listed["data"]]
