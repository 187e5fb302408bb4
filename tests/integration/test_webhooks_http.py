"""The webhook signature matrix against our POST /v1/psp/sandbox/webhooks on the real stack: every
badly signed delivery is refused with 400 and leaves no trace (no dedup row, no signal to the
workflow); a good one is applied once, and its redelivery is acknowledged as a duplicate."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text
from temporalio.api.enums.v1 import EventType

from core.config import DEV_SECRET, Settings
from core.temporal import connect
from psp.signing import sign_header
from tests.integration.conftest import Api, Stack, sandbox_payments
from tests.integration.helpers import customer
from tests.integration.psp_truth import assert_agrees, browser, faults, pay, wait_final, wallet

pytestmark = pytest.mark.integration

HEADER = "Paysaga-Signature"


def secret(stack: Stack) -> str:
    return stack.env.get("SANDBOX_WEBHOOK_SECRET", DEV_SECRET)


def recorded(stack: Stack, event_id: str) -> int:
    engine = create_engine(stack.database_url)
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(
                    text("SELECT count(*) FROM psp_events WHERE id = :id"), {"id": event_id}
                ).scalar_one()
            )
    finally:
        engine.dispose()


async def signals(stack: Stack, workflow_id: str) -> int:
    client = await connect(Settings(temporal_address=stack.env["TEMPORAL_ADDRESS"]))
    handle = client.get_workflow_handle(workflow_id)
    types = [e.event_type async for e in handle.fetch_history_events()]
    return types.count(EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED)


def event_for(psp_payment: dict[str, Any], event_id: str) -> bytes:
    event = {
        "id": event_id,
        "object": "event",
        "type": f"payment.{psp_payment['status']}",
        "created": int(time.time()),
        "data": {"object": psp_payment},
    }
    return json.dumps(event, separators=(",", ":")).encode()


async def deliver(stack: Stack, body: bytes, header: str | None) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if header is not None:
        headers[HEADER] = header
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as http:
        return await http.post("/v1/psp/sandbox/webhooks", content=body, headers=headers)


def bad_deliveries(body: bytes, key: str) -> dict[str, tuple[bytes, str | None]]:
    now = int(time.time())
    good = sign_header(body, key, now)
    sig = good.split("v1=", 1)[1]
    return {
        "mutated_body": (body.replace(b'"amount":', b'"amount":1', 1), good),
        "wrong_secret": (body, sign_header(body, key + "-not", now)),
        "too_old": (body, sign_header(body, key, now - 310)),
        "ahead": (body, sign_header(body, key, now + 310)),
        "missing_t": (body, f"v1={sig}"),
        "only_v0": (body, f"t={now},v0={sig}"),
        "v1_not_hex": (body, f"t={now},v1=zz{sig[2:]}"),
        "no_header": (body, None),
    }


async def test_signature_matrix(api: Api, ops: Api, stack: Stack) -> None:
    cus = (await customer(api))["id"]
    method = await wallet(api, cus)
    # the sandbox's own deliveries are lost: the only webhooks the workflow gets are the test's
    async with faults(stack, webhook_loss_rate=1.0), browser(stack) as customer_browser:
        payment = await pay(api, cus, method["id"], 1400)
        assert payment["status"] == "requires_action"
        [psp] = await sandbox_payments(stack, payment["id"])
        event_id = f"evt_it_{uuid.uuid4().hex[:12]}"
        body = event_for(psp, event_id)

        for name, (sent, header) in bad_deliveries(body, secret(stack)).items():
            r = await deliver(stack, sent, header)
            assert r.status_code == 400, (name, r.text)
            assert r.json()["error"]["code"] in ("signature_invalid", "signature_missing"), (name, r.text)
        assert recorded(stack, event_id) == 0
        assert await signals(stack, payment["workflow_id"]) == 0

        first = await deliver(stack, body, sign_header(body, secret(stack), int(time.time())))
        assert (first.status_code, first.json()) == (200, {"received": True, "duplicate": False})
        again = await deliver(stack, body, sign_header(body, secret(stack), int(time.time())))
        assert (again.status_code, again.json()) == (200, {"received": True, "duplicate": True})
        assert recorded(stack, event_id) == 1
        assert await signals(stack, payment["workflow_id"]) == 1  # applied once

        # 250 s old is within the 300 s tolerance
        other = event_for(psp, f"{event_id}_b")
        late = await deliver(stack, other, sign_header(other, secret(stack), int(time.time()) - 250))
        assert late.status_code == 200 and late.json()["duplicate"] is False

        # the customer approves; every sandbox webhook is lost, a look-up finds it (a poll, or the
        # one the last event started if that runs after the approval)
        r = await customer_browser.post(f"{payment['next_action']['url']}/approve")
        assert r.status_code == 303
        final = await wait_final(api, payment["id"], timeout=120)
    assert final["status"] == "succeeded"
    await assert_agrees(api, ops, stack, final)


async def test_a_real_sandbox_webhook_completes_a_redirect_payment(api: Api, ops: Api, stack: Stack) -> None:
    """No faults: the sandbox's signed payment.authorized webhook reaches the receiver, which signals
    the workflow; the payment succeeds without the return URL."""
    cus = (await customer(api))["id"]
    method = await wallet(api, cus)
    payment = await pay(api, cus, method["id"], 1450)
    async with browser(stack) as customer_browser:
        r = await customer_browser.post(f"{payment['next_action']['url']}/approve")
    assert r.status_code == 303
    final = await wait_final(api, payment["id"], timeout=60)
    assert final["status"] == "succeeded"
    await assert_agrees(api, ops, stack, final)
    # payment.requires_action and payment.authorized at least (paysaga up points the sandbox here)
    assert await signals(stack, payment["workflow_id"]) >= 2
