"""The checkout saga end to end through HTTP: dev server + sandbox PSP + worker + API + database."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from tests.integration.conftest import Api, Stack, authorizations, sandbox_payments
from tests.integration.helpers import (
    DEBIT,
    DECLINE,
    EXPIRED,
    FLAKY,
    INSUFFICIENT,
    OTP_CARD,
    SHIPPING,
    customer_with_card,
    payment_body,
    product,
)

pytestmark = pytest.mark.integration


async def test_demo_flow_cart_checkout_with_otp(api: Api, ops: Api, stack: Stack) -> None:
    cus, pm = await customer_with_card(api, OTP_CARD)
    p1 = await product(api, price=1500, stock=5)
    p2 = await product(api, price=250, stock=3)
    cart = (await api.post("/v1/carts", json={"customer": cus})).json()
    assert (
        await api.post(f"/v1/carts/{cart['id']}/items", json={"product": p1["id"], "quantity": 2})
    ).status_code == 200
    assert (
        await api.post(f"/v1/carts/{cart['id']}/items", json={"product": p2["id"], "quantity": 1})
    ).status_code == 200

    r = await api.post(
        f"/v1/carts/{cart['id']}/checkout", json={"payment_method": pm, "shipping_address": SHIPPING}
    )
    assert r.status_code == 200, r.text
    order = r.json()
    payment = order["payment"]
    assert order["amount"] == 3250 and payment["amount"] == 3250
    assert payment["status"] == "requires_action"
    assert payment["next_action"]["type"] == "otp"
    # stock is reserved while the customer authenticates
    assert (await api.get(f"/v1/products/{p1['id']}")).json()["stock"] == 3

    r = await api.post(f"/v1/payments/{payment['id']}/authenticate", json={"otp": "123456"})
    assert r.status_code == 200, r.text
    done = r.json()
    assert done["status"] == "succeeded"
    assert done["amount_received"] == 3250

    order = (await api.get(f"/v1/orders/{order['id']}")).json()
    assert order["status"] == "confirmed"
    assert (await api.get(f"/v1/products/{p1['id']}")).json()["stock"] == 3
    assert (await api.get(f"/v1/products/{p2['id']}")).json()["stock"] == 2

    # the receipt goes out after the payment succeeded (the answer does not wait for the email)
    for _ in range(50):
        got = (await api.get(f"/v1/payments/{payment['id']}")).json()
        if any("receipt" in (e["reason"] or "") for e in got["timeline"]):
            break
        await asyncio.sleep(0.1)
    statuses = [e["status"] for e in got["timeline"]]
    assert statuses[0] == "processing" and "requires_action" in statuses and "succeeded" in statuses
    assert any("receipt" in (e["reason"] or "") for e in got["timeline"])
    assert got["workflow_id"] == f"checkout:{payment['id']}"

    [psp] = await sandbox_payments(stack, payment["id"])
    assert psp["status"] == "captured" and psp["amount_captured"] == 3250

    # merchant is credited the net of the default fee (2.9% + 30): fee = round(94.25) + 30 = 124
    acct = await ops.get(f"/v1/ledger/accounts/merchant_payable:{stack.merchant_id}:usd")
    assert acct.status_code == 200, acct.text
    assert any(e["ref"] == payment["id"] and e["amount"] == -(3250 - 124) for e in acct.json()["entries"])


async def test_same_cart_twice_is_one_order_and_one_payment(api: Api, stack: Stack) -> None:
    cus, pm = await customer_with_card(api)
    p = await product(api, price=700, stock=10)
    cart = (await api.post("/v1/carts", json={"customer": cus})).json()
    await api.post(f"/v1/carts/{cart['id']}/items", json={"product": p["id"], "quantity": 1})
    body = {"payment_method": pm, "shipping_address": SHIPPING}
    first, second = await asyncio.gather(
        api.post(f"/v1/carts/{cart['id']}/checkout", json=body),
        api.post(f"/v1/carts/{cart['id']}/checkout", json=body),
    )
    assert first.status_code == 200, first.text
    assert second.status_code == 200, second.text
    assert first.json()["id"] == second.json()["id"]
    assert first.json()["payment"]["id"] == second.json()["payment"]["id"]
    third = await api.post(f"/v1/carts/{cart['id']}/checkout", json=body)
    assert third.json()["payment"]["id"] == first.json()["payment"]["id"]
    assert third.json()["payment"]["status"] == "succeeded"
    assert (await api.get(f"/v1/products/{p['id']}")).json()["stock"] == 9
    assert await authorizations(stack, first.json()["payment"]["id"]) == 1


async def test_automatic_and_manual_capture(api: Api, stack: Stack) -> None:
    cus, pm = await customer_with_card(api, DEBIT)
    r = await api.post("/v1/payments", json=payment_body(cus, pm, 1000))
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "succeeded" and r.json()["amount_received"] == 1000

    r = await api.post("/v1/payments", json=payment_body(cus, pm, 5000, capture_method="manual"))
    assert r.status_code == 200, r.text
    pay = r.json()
    assert pay["status"] == "requires_capture" and pay["amount_capturable"] == 5000
    too_much = await api.post(f"/v1/payments/{pay['id']}/capture", json={"amount": 6000})
    assert too_much.status_code == 400 and too_much.json()["error"]["code"] == "amount_too_large"
    r = await api.post(f"/v1/payments/{pay['id']}/capture", json={"amount": 4000})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "succeeded" and r.json()["amount_received"] == 4000
    [psp] = await sandbox_payments(stack, pay["id"])
    assert psp["amount_captured"] == 4000
    again = await api.post(f"/v1/payments/{pay['id']}/capture", json={})
    assert again.status_code == 409


async def test_manual_capture_cancel_voids(api: Api, stack: Stack) -> None:
    cus, pm = await customer_with_card(api)
    pay = (await api.post("/v1/payments", json=payment_body(cus, pm, 900, capture_method="manual"))).json()
    r = await api.post(f"/v1/payments/{pay['id']}/cancel", json={})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "canceled"
    [psp] = await sandbox_payments(stack, pay["id"])
    assert psp["status"] == "canceled" and psp["amount_captured"] == 0


@pytest.mark.parametrize(
    ("number", "decline_code"),
    [(DECLINE, "generic_decline"), (INSUFFICIENT, "insufficient_funds"), (EXPIRED, "expired_card")],
)
async def test_declines_are_402_and_release_stock(
    api: Api, stack: Stack, number: str, decline_code: str
) -> None:
    cus, pm = await customer_with_card(api, number)
    p = await product(api, price=400, stock=2)
    cart = (await api.post("/v1/carts", json={"customer": cus})).json()
    await api.post(f"/v1/carts/{cart['id']}/items", json={"product": p["id"], "quantity": 2})
    r = await api.post(
        f"/v1/carts/{cart['id']}/checkout", json={"payment_method": pm, "shipping_address": SHIPPING}
    )
    assert r.status_code == 402, r.text
    err = r.json()["error"]
    assert (
        err["type"] == "card_error" and err["code"] == "card_declined" and err["decline_code"] == decline_code
    )
    pid = err["payment"]["id"]
    assert (await api.get(f"/v1/payments/{pid}")).json()["status"] == "failed"
    assert (await api.get(f"/v1/products/{p['id']}")).json()["stock"] == 2
    assert all(p["amount_captured"] == 0 for p in await sandbox_payments(stack, pid))


async def test_wrong_otp_fails_the_payment(api: Api, stack: Stack) -> None:
    cus, pm = await customer_with_card(api, OTP_CARD)
    pay = (await api.post("/v1/payments", json=payment_body(cus, pm, 1200))).json()
    assert pay["status"] == "requires_action"
    r = await api.post(f"/v1/payments/{pay['id']}/authenticate", json={"otp": "000000"})
    assert r.status_code == 402, r.text
    assert r.json()["error"]["decline_code"] == "authentication_failed"
    assert (await api.get(f"/v1/payments/{pay['id']}")).json()["status"] == "failed"
    late = await api.post(f"/v1/payments/{pay['id']}/authenticate", json={"otp": "123456"})
    assert late.status_code == 409


async def test_psp_processing_errors_are_retried_with_one_authorization(api: Api, stack: Stack) -> None:
    cus, pm = await customer_with_card(api, FLAKY)
    r = await api.post("/v1/payments", json=payment_body(cus, pm, 3100))
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "succeeded"
    assert await authorizations(stack, r.json()["id"]) == 1


async def test_idempotency_key_replays_and_rejects_other_body(api: Api, stack: Stack) -> None:
    cus, pm = await customer_with_card(api)
    key = f"order-{uuid.uuid4()}"
    body = payment_body(cus, pm, 4200, metadata={"order": "42"})
    first = await api.post("/v1/payments", json=body, headers={"Idempotency-Key": key})
    second = await api.post("/v1/payments", json=body, headers={"Idempotency-Key": key})
    assert first.status_code == second.status_code == 200
    assert first.json()["id"] == second.json()["id"]
    assert await authorizations(stack, first.json()["id"]) == 1
    other = await api.post("/v1/payments", json={**body, "amount": 4300}, headers={"Idempotency-Key": key})
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"

    # a stored decline replays as the same 402
    cus2, declining = await customer_with_card(api, DECLINE)
    key2 = f"order-{uuid.uuid4()}"
    d1 = await api.post("/v1/payments", json=payment_body(cus2, declining), headers={"Idempotency-Key": key2})
    d2 = await api.post("/v1/payments", json=payment_body(cus2, declining), headers={"Idempotency-Key": key2})
    assert d1.status_code == d2.status_code == 402
    assert d1.json() == d2.json()


async def test_concurrent_double_submit_is_one_payment(api: Api, stack: Stack) -> None:
    cus, pm = await customer_with_card(api)
    key = f"dbl-{uuid.uuid4()}"
    rs = await asyncio.gather(
        *[
            api.post("/v1/payments", json=payment_body(cus, pm, 777), headers={"Idempotency-Key": key})
            for _ in range(8)
        ]
    )
    ok = [r for r in rs if r.status_code == 200]
    assert ok and all(r.status_code in (200, 409) for r in rs), [r.text for r in rs]
    assert len({r.json()["id"] for r in ok}) == 1
    assert await authorizations(stack, ok[0].json()["id"]) == 1


async def test_history_lists_payments_by_customer_and_status(api: Api) -> None:
    cus, pm = await customer_with_card(api)
    ids = [
        (await api.post("/v1/payments", json=payment_body(cus, pm, 100 + i))).json()["id"] for i in range(3)
    ]
    page = (await api.get("/v1/payments", params={"customer": cus, "limit": 2})).json()
    assert page["object"] == "list" and page["has_more"] is True
    assert [p["id"] for p in page["data"]] == ids[::-1][:2]
    rest = (
        await api.get("/v1/payments", params={"customer": cus, "starting_after": page["data"][-1]["id"]})
    ).json()
    assert [p["id"] for p in rest["data"]] == [ids[0]] and rest["has_more"] is False
    ok = (await api.get("/v1/payments", params={"customer": cus, "status": "succeeded"})).json()
    assert len(ok["data"]) == 3
    bad = await api.get("/v1/payments", params={"status": "bogus"})
    assert bad.status_code == 400


async def test_operator_review_approves_a_large_payment(api: Api, ops: Api) -> None:
    cus, pm = await customer_with_card(api)
    # above the merchant's default review limit (100_000 minor units)
    r = await api.post("/v1/payments", json=payment_body(cus, pm, 150_000))
    assert r.status_code == 200, r.text
    pay = r.json()
    assert pay["status"] == "processing"
    assert (await api.post(f"/v1/payments/{pay['id']}/review", json={"decision": "approve"})).status_code in (
        401,
        403,
        404,
    )
    r = await ops.post(f"/v1/payments/{pay['id']}/review", json={"decision": "approve"})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "succeeded"
