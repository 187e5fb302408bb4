"""Refunds and returns end to end through HTTP (dev server + sandbox PSP + worker + API + database).

After each scenario, besides the package invariants (balanced ledger, one authorization), the books
must agree: what the sandbox PSP refunded equals what the ledger reversed equals the sum of our
succeeded refunds, for every payment the test refunded.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.integration.conftest import Api, Stack, sandbox_payments
from tests.integration.helpers import SHIPPING, customer_with_card, payment_body, product

pytestmark = pytest.mark.integration

SETTLE_SECONDS = 60.0


@pytest.fixture
async def refunded_payments(stack: Stack, api: Api, ops: Api) -> AsyncIterator[list[str]]:
    """Payments a test refunded; the books of each are compared after the test."""
    seen: list[str] = []
    yield seen
    for pid in seen:
        await assert_books_agree(api, ops, stack, pid)


async def captured(api: Api, amount: int) -> dict[str, Any]:
    cus, pm = await customer_with_card(api)
    r = await api.post("/v1/payments", json=payment_body(cus, pm, amount))
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "succeeded"
    return dict(r.json())


async def refund(api: Api, payment_id: str, amount: int | None = None, key: str | None = None) -> Any:
    body: dict[str, Any] = {"payment": payment_id, "reason": "requested_by_customer"}
    if amount is not None:
        body["amount"] = amount
    return await api.post("/v1/refunds", json=body, headers={"Idempotency-Key": key or f"re-{uuid.uuid4()}"})


async def settled(api: Api, refund_id: str) -> dict[str, Any]:
    """The refund once it left pending (the POST answers pending when the PSP takes a while)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_SECONDS
    while True:
        r = await api.get(f"/v1/refunds/{refund_id}")
        assert r.status_code == 200, r.text
        if r.json()["status"] != "pending" or loop.time() > deadline:
            return dict(r.json())
        await asyncio.sleep(0.2)


async def refunds_of(api: Api, payment_id: str) -> list[dict[str, Any]]:
    r = await api.get("/v1/refunds", params={"payment": payment_id, "limit": 100})
    assert r.status_code == 200, r.text
    assert r.json()["has_more"] is False
    return list(r.json()["data"])


async def ledger_refunds(ops: Api, payment_id: str) -> int:
    r = await ops.get("/v1/ledger/accounts/psp_receivable:sandbox:usd", params={"limit": 1000})
    assert r.status_code == 200, r.text
    return -sum(e["amount"] for e in r.json()["entries"] if e["kind"] == "refund" and e["ref"] == payment_id)


async def sandbox_refunded(stack: Stack, payment_id: str) -> int:
    return sum(int(p.get("amount_refunded", 0)) for p in await sandbox_payments(stack, payment_id))


async def assert_books_agree(api: Api, ops: Api, stack: Stack, payment_id: str) -> None:
    rows = [await settled(api, r["id"]) for r in await refunds_of(api, payment_id)]
    assert all(r["status"] in ("succeeded", "failed") for r in rows), rows
    succeeded = sum(r["amount"] for r in rows if r["status"] == "succeeded")
    assert await sandbox_refunded(stack, payment_id) == await ledger_refunds(ops, payment_id) == succeeded


async def test_20_concurrent_partial_refunds_never_exceed_the_capture(
    api: Api, refunded_payments: list[str]
) -> None:
    pay = await captured(api, 2_000)
    refunded_payments.append(pay["id"])
    each = 150  # 20 x 1.50 asked of 20.00: exactly 13 fit (19.50)

    answers = await asyncio.gather(*(refund(api, pay["id"], each) for _ in range(20)))

    accepted = [r.json() for r in answers if r.status_code == 200]
    refused = [r.json()["error"] for r in answers if r.status_code != 200]
    assert len(accepted) == 13, [r.text for r in answers]
    assert all(r.status_code == 400 for r in answers if r.status_code != 200)
    assert {e["code"] for e in refused} == {"amount_too_large"}
    final = [await settled(api, r["id"]) for r in accepted]
    assert [r["status"] for r in final] == ["succeeded"] * 13
    assert sum(r["amount"] for r in final) == 13 * each <= pay["amount_received"]
    assert (await api.get(f"/v1/payments/{pay['id']}")).json()["status"] == "partially_refunded"

    # the rest (no amount: everything still refundable) makes it refunded; then nothing is left
    rest = await refund(api, pay["id"])
    assert rest.status_code == 200, rest.text
    assert (await settled(api, rest.json()["id"]))["amount"] == 2_000 - 13 * each
    assert (await api.get(f"/v1/payments/{pay['id']}")).json()["status"] == "refunded"
    over = await refund(api, pay["id"], 1)
    assert over.status_code == 400 and over.json()["error"]["code"] == "charge_already_refunded"


async def test_refund_replays_by_key_and_over_refund_moves_nothing(
    api: Api, other_api: Api, ops: Api, stack: Stack, refunded_payments: list[str]
) -> None:
    pay = await captured(api, 5_000)
    refunded_payments.append(pay["id"])
    key = f"re-{uuid.uuid4()}"
    first = await refund(api, pay["id"], 3_000, key=key)
    assert first.status_code == 200, first.text
    re = await settled(api, first.json()["id"])
    assert (re["object"], re["amount"], re["currency"], re["payment"]) == ("refund", 3_000, "usd", pay["id"])
    assert re["status"] == "succeeded" and re["workflow_id"] == f"refund:{re['id']}"

    again = await refund(api, pay["id"], 3_000, key=key)
    assert again.status_code == 200 and again.json()["id"] == re["id"]
    other_body = await refund(api, pay["id"], 2_000, key=key)
    assert other_body.status_code == 422 and other_body.json()["error"]["code"] == "idempotency_key_reused"

    before = (await ledger_refunds(ops, pay["id"]), await sandbox_refunded(stack, pay["id"]))
    over = await refund(api, pay["id"], 2_001)
    assert over.status_code == 400, over.text
    assert (over.json()["error"]["code"], over.json()["error"]["param"]) == ("amount_too_large", "amount")
    assert (await ledger_refunds(ops, pay["id"]), await sandbox_refunded(stack, pay["id"])) == before
    assert [r["id"] for r in await refunds_of(api, pay["id"])] == [re["id"]]

    payment = (await api.get(f"/v1/payments/{pay['id']}")).json()
    assert payment["status"] == "partially_refunded"
    assert any(re["id"] in (e["reason"] or "") for e in payment["timeline"])
    # another merchant sees neither the refund nor the payment
    assert (await other_api.get(f"/v1/refunds/{re['id']}")).status_code == 404
    assert (await refund(other_api, pay["id"], 1)).status_code == 404


async def test_refund_of_an_uncaptured_payment_cancels_it(api: Api, ops: Api, stack: Stack) -> None:
    cus, pm = await customer_with_card(api)
    pay = (await api.post("/v1/payments", json=payment_body(cus, pm, 900, capture_method="manual"))).json()
    assert pay["status"] == "requires_capture"
    partial = await refund(api, pay["id"], 100)
    assert partial.status_code == 400 and partial.json()["error"]["code"] == "amount_invalid"

    r = await refund(api, pay["id"])
    assert r.status_code == 200, r.text
    assert (r.json()["object"], r.json()["id"], r.json()["status"]) == ("payment", pay["id"], "canceled")
    [psp] = await sandbox_payments(stack, pay["id"])
    assert (psp["status"], psp["amount_captured"], psp.get("amount_refunded", 0)) == ("canceled", 0, 0)
    assert await refunds_of(api, pay["id"]) == []
    assert await ledger_refunds(ops, pay["id"]) == 0


async def test_return_received_restocks_and_refunds_the_items(
    api: Api, ops: Api, refunded_payments: list[str]
) -> None:
    cus, pm = await customer_with_card(api)
    widget = await product(api, price=1_500, stock=5)
    cart = (await api.post("/v1/carts", json={"customer": cus})).json()
    r = await api.post(f"/v1/carts/{cart['id']}/items", json={"product": widget["id"], "quantity": 2})
    assert r.status_code == 200, r.text
    r = await api.post(
        f"/v1/carts/{cart['id']}/checkout", json={"payment_method": pm, "shipping_address": SHIPPING}
    )
    assert r.status_code == 200, r.text
    order = r.json()
    assert order["status"] == "confirmed" and order["payment"]["status"] == "succeeded"
    refunded_payments.append(order["payment"]["id"])
    assert (await api.get(f"/v1/products/{widget['id']}")).json()["stock"] == 3

    too_many = await api.post(
        f"/v1/orders/{order['id']}/returns", json={"items": [{"product": widget["id"], "quantity": 3}]}
    )
    assert too_many.status_code == 400 and too_many.json()["error"]["code"] == "return_quantity_exceeded"
    r = await api.post(
        f"/v1/orders/{order['id']}/returns", json={"items": [{"product": widget["id"], "quantity": 1}]}
    )
    assert r.status_code == 200, r.text
    ret = r.json()
    assert (ret["object"], ret["status"], ret["amount"], ret["refund"]) == (
        "return",
        "authorized",
        1_500,
        None,
    )
    assert ret["expires_at"] - ret["created"] == 30 * 24 * 3600
    # one unit is still returnable, not two
    second = await api.post(
        f"/v1/orders/{order['id']}/returns", json={"items": [{"product": widget["id"], "quantity": 2}]}
    )
    assert second.status_code == 400

    assert (await api.post(f"/v1/returns/{ret['id']}/receive")).status_code == 403  # operators only
    r = await ops.post(f"/v1/returns/{ret['id']}/receive")
    assert r.status_code == 200, r.text
    got = r.json()
    for _ in range(100):  # the receive answers within UPDATE_WAIT_SECONDS; the refund may trail
        if got["status"] != "received":
            break
        await asyncio.sleep(0.2)
        got = (await api.get(f"/v1/returns/{ret['id']}")).json()
    assert got["status"] == "refunded", got
    assert (got["refund"]["amount"], got["refund"]["status"], got["refund"]["return"]) == (
        1_500,
        "succeeded",
        ret["id"],
    )
    assert (await api.get(f"/v1/products/{widget['id']}")).json()["stock"] == 4
    assert (await api.get(f"/v1/payments/{order['payment']['id']}")).json()["status"] == "partially_refunded"
    again = await ops.post(f"/v1/returns/{ret['id']}/receive")
    assert again.status_code == 409 and again.json()["error"]["code"] == "return_unexpected_state"
