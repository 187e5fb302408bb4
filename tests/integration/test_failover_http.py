"""PSP failover end to end: `paysaga up` with a second sandbox (SANDBOX_B_PORT: the supervisor starts
it, the worker and the API register it as "sandbox_b"), faults injected through the sandboxes'
admin API, everything else through our HTTP API. A short circuit cool-down keeps the run quick.

This module brings its own stack (the package's has one sandbox); the package's invariants still
run after each test (balanced ledger, at most one authorization per payment at the first sandbox),
and this module adds the same check at the second sandbox.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any
from unittest import mock

import httpx
import pytest
import sqlalchemy as sa

from tests.integration.conftest import Api
from tests.integration.helpers import customer_with_card, payment_body
from tests.ports import free_port
from tests.stack import (
    SANDBOX_KEY,
    Stack,
    create_pg_database,
    drop_pg_database,
    start_stack,
    stop_stack,
)

pytestmark = pytest.mark.integration

COOLDOWN_S = 8.0  # PSP_BREAKER_COOLDOWN_S of this stack
FAILURES = 5  # PSP_BREAKER_FAILURES
TERMINAL = {"succeeded", "failed", "canceled"}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp(f"failover-{request.param}")
    pg_name = None
    if request.param == "postgresql":
        pg_name, url = create_pg_database()
    else:
        url = f"sqlite:///{tmp / 'paysaga.db'}"
    port = free_port()
    extra = {
        "SANDBOX_B_PORT": str(port),
        "PSP_BREAKER_FAILURES": str(FAILURES),
        "PSP_BREAKER_COOLDOWN_S": str(COOLDOWN_S),
    }
    with mock.patch.dict(os.environ, extra):  # start_stack hands the environment to `paysaga up`
        s = start_stack(tmp, url)
    s.env.update(extra)
    try:
        deadline = time.monotonic() + 30
        while True:  # `up` reports ready only once both sandboxes answer; the test may be faster
            try:
                if httpx.get(f"{b_url(s)}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"second sandbox not up:\n{s.logs()[-3000:]}")
            time.sleep(0.2)
        yield s
    finally:
        stop_stack(s)
        if pg_name:
            drop_pg_database(pg_name)


def b_url(stack: Stack) -> str:
    return f"http://127.0.0.1:{stack.env['SANDBOX_B_PORT']}"


async def sandbox(url: str, method: str, path: str, **kw: Any) -> Any:
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {SANDBOX_KEY}"}) as http:
        r = await http.request(method, path, timeout=10, **kw)
        r.raise_for_status()
        return r.json()


async def payments_at(url: str, payment_id: str) -> list[dict[str, Any]]:
    return list((await sandbox(url, "GET", "/v1/payments", params={"reference": payment_id}))["data"])


async def injected(url: str, kind: str) -> int:
    return int((await sandbox(url, "GET", "/admin/faults"))["injected"].get(kind, 0))


def db_row(stack: Stack, sql: str, **params: Any) -> Any:
    engine = sa.create_engine(stack.database_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text(sql), params).one()
    finally:
        engine.dispose()


def payment_psp(stack: Stack, payment_id: str) -> str:
    return str(db_row(stack, "SELECT psp FROM payments WHERE id = :id", id=payment_id)[0])


def routing_notes(payment: dict[str, Any]) -> list[str]:
    return [e["reason"] for e in payment["timeline"] if (e["reason"] or "").startswith("routing:")]


async def settled(api: Api, payment_id: str, limit_s: float = 150) -> dict[str, Any]:
    deadline = time.monotonic() + limit_s
    while True:
        got = (await api.get(f"/v1/payments/{payment_id}")).json()
        if got["status"] in TERMINAL or time.monotonic() > deadline:
            return dict(got)
        await asyncio.sleep(0.5)


@pytest.fixture(autouse=True)
async def one_authorization_at_the_second_sandbox(stack: Stack) -> AsyncIterator[None]:
    yield
    for pid in sorted(stack.payments_seen):
        found = await payments_at(b_url(stack), pid)
        assert sum(int(p.get("authorizations", 0)) for p in found) <= 1, (
            f"{pid} authorized twice at sandbox_b"
        )


@pytest.fixture(autouse=True)
async def first_sandbox_healthy(stack: Stack) -> AsyncIterator[None]:
    """Every test starts and ends with both sandboxes fault-free."""
    for url in (stack.sandbox_url, b_url(stack)):
        await sandbox(url, "DELETE", "/admin/faults")
    yield
    for url in (stack.sandbox_url, b_url(stack)):
        await sandbox(url, "DELETE", "/admin/faults")


async def test_payments_fail_over_while_the_first_psp_is_down(api: Api, ops: Api, stack: Stack) -> None:
    # saved while both are up: tokenized at both
    cus, pm = await customer_with_card(api)
    primary, tokens = db_row(stack, "SELECT psp, psp_tokens FROM payment_methods WHERE id = :id", id=pm)
    tokens = tokens if isinstance(tokens, dict) else json.loads(tokens)  # SQLite hands back the text
    assert primary == "sandbox" and set(tokens) == {"sandbox", "sandbox_b"}

    a = stack.sandbox_url
    await sandbox(a, "POST", "/admin/faults", json={"down_until": time.time() + 300})

    # 1) three attempts at the first sandbox (each a 503), then the second authorizes and captures
    r = await api.post("/v1/payments", json=payment_body(cus, pm, amount=2100))
    assert r.status_code == 200, r.text
    first = r.json()
    assert first["status"] == "succeeded", first
    assert payment_psp(stack, first["id"]) == "sandbox_b"
    [note] = routing_notes(first)
    assert note.startswith("routing: sandbox unavailable (3 attempts:") and note.endswith("to sandbox_b")
    [at_b] = await payments_at(b_url(stack), first["id"])
    assert (at_b["status"], at_b["amount_captured"]) == ("captured", 2100)
    assert await injected(a, "down") == 3
    # the ledger owes the money from the PSP that has it
    acct = await ops.get("/v1/ledger/accounts/psp_receivable:sandbox_b:usd")
    assert acct.status_code == 200, acct.text
    assert any(e["ref"] == first["id"] and e["amount"] == 2100 for e in acct.json()["entries"])

    # 2) a manual capture: two more 503s open the circuit (5 in a row), the third attempt is refused
    # without a request; the capture later goes to where the authorization is
    r = await api.post("/v1/payments", json=payment_body(cus, pm, amount=2200, capture_method="manual"))
    assert r.status_code == 200, r.text
    second = r.json()
    assert second["status"] == "requires_capture", second
    assert await injected(a, "down") == FAILURES
    assert "circuit open" in routing_notes(second)[0]
    r = await api.post(f"/v1/payments/{second['id']}/capture")
    assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
    [at_b] = await payments_at(b_url(stack), second["id"])
    assert (at_b["status"], at_b["amount_captured"]) == ("captured", 2200)

    # 3) circuit open: routing skips the first sandbox without calling it at all
    r = await api.post("/v1/payments", json=payment_body(cus, pm, amount=2300))
    third = r.json()
    assert third["status"] == "succeeded", third
    assert await injected(a, "down") == FAILURES
    [note] = routing_notes(third)
    assert note.startswith("routing: sandbox skipped (circuit open") and note.endswith("to sandbox_b")

    # 4) a refund, still with the first sandbox down: it goes where the money is
    r = await api.post(
        "/v1/refunds", json={"payment": first["id"], "amount": 500}, headers={"Idempotency-Key": first["id"]}
    )
    assert r.status_code == 200, r.text
    refund = r.json()
    deadline = time.monotonic() + 60
    while refund["status"] == "pending" and time.monotonic() < deadline:
        await asyncio.sleep(0.3)
        refund = (await api.get(f"/v1/refunds/{refund['id']}")).json()
    assert refund["status"] == "succeeded", refund
    [at_b] = await payments_at(b_url(stack), first["id"])
    assert at_b["amount_refunded"] == 500

    # nothing of these payments ever reached the first sandbox
    await sandbox(a, "DELETE", "/admin/faults")
    for pay in (first, second, third):
        assert await payments_at(a, pay["id"]) == []


async def test_an_ambiguous_first_attempt_is_not_failed_over(api: Api, stack: Stack) -> None:
    cus, pm = await customer_with_card(api)
    await asyncio.sleep(COOLDOWN_S + 1)  # a circuit opened by an earlier test lets a trial through
    a = stack.sandbox_url
    # every request is processed, then its answer is held past the client's timeout and dropped
    await sandbox(
        a, "POST", "/admin/faults", json={"timeout_after_commit_rate": 1.0, "commit_hold_ms": 12_000}
    )
    post = asyncio.create_task(api.post("/v1/payments", json=payment_body(cus, pm, amount=2400)))
    for _ in range(200):  # the authorize went out and was committed: stop the fault for what follows
        if await injected(a, "timeout_after_commit") >= 1:
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the authorize never reached the first sandbox")
    await sandbox(a, "DELETE", "/admin/faults")
    r = await post
    assert r.status_code in (200, 402, 503), r.text
    body = r.json()
    pid = body["id"] if "id" in body else body["error"]["payment"]["id"]

    final = await settled(api, pid)
    assert final["status"] in TERMINAL, final
    # never sent to the second PSP: the money may be (and is) at the first
    assert await payments_at(b_url(stack), pid) == []
    assert routing_notes(final) == []
    assert payment_psp(stack, pid) == "sandbox"
    [at_a] = await payments_at(a, pid)
    if final["status"] == "succeeded":
        assert (at_a["status"], at_a["amount_captured"]) == ("captured", 2400)
    else:
        assert at_a["status"] == "canceled" and at_a["amount_captured"] == 0


async def test_merchant_rules_pick_the_psp(api: Api, stack: Stack) -> None:
    cus, pm = await customer_with_card(api)
    rules = '[{"currency": "eur", "psps": ["sandbox_b", "sandbox"]}]'
    out = stack.cli("merchant", "routing", "--id", stack.merchant_id, "--rules", rules)
    assert out["routing_rules"] == [{"currency": "eur", "psps": ["sandbox_b", "sandbox"]}]
    try:
        eur = (
            await api.post("/v1/payments", json={**payment_body(cus, pm, amount=900), "currency": "eur"})
        ).json()
        usd = (await api.post("/v1/payments", json=payment_body(cus, pm, amount=900))).json()
    finally:
        stack.cli("merchant", "routing", "--id", stack.merchant_id, "--rules", "[]")
    assert eur["status"] == usd["status"] == "succeeded", (eur, usd)
    # the rule's first choice, not a failover: no note
    assert payment_psp(stack, eur["id"]) == "sandbox_b" and routing_notes(eur) == []
    assert payment_psp(stack, usd["id"]) == "sandbox"
    assert [p["currency"] for p in await payments_at(b_url(stack), eur["id"])] == ["eur"]
    assert await payments_at(stack.sandbox_url, eur["id"]) == []
