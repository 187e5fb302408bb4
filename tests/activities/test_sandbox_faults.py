"""Sandbox PSP faults (psp/sandbox/faults.py): each fault class seen through the SandboxPSP client on a
real uvicorn server (a dropped connection only exists on a real socket), the admin API, per-call and
per-payment faults, reproducibility by seed, and webhook loss / duplication / delay / reordering seen
at a receiver."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from psp.base import AuthorizeRequest, CardDetails, PSPAmbiguous, PSPRejected, PSPUnavailable
from psp.sandbox.app import create_app
from psp.sandbox.client import SandboxPSP
from psp.sandbox.faults import FaultPlan, FaultSettings
from psp.signing import verify_header

API_KEY = "sk_sandbox_faults"
WEBHOOK_SECRET = "whsec_sandbox_faults"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
NEXT_YEAR = datetime.now(UTC).year + 1
CARD = CardDetails("4242424242424242", 12, NEXT_YEAR, "123")


@contextlib.contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """uvicorn on a socket bound to a free 127.0.0.1 port, in a thread; yields the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=3)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture
def sandbox() -> Iterator[tuple[FastAPI, str]]:
    app = create_app(db_path=":memory:", api_key=API_KEY, webhook_secret=WEBHOOK_SECRET)
    with serving(app) as url:
        yield app, url


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    # a short read timeout, so a held answer (timeout after commit) is seen as a timeout quickly
    async with httpx.AsyncClient(timeout=httpx.Timeout(2.0, read=0.5)) as client:
        yield client


@pytest.fixture
def psp(sandbox: tuple[FastAPI, str], http: httpx.AsyncClient) -> SandboxPSP:
    return SandboxPSP(http, sandbox[1], API_KEY)


async def set_faults(http: httpx.AsyncClient, url: str, **settings: Any) -> dict[str, Any]:
    r = await http.post(f"{url}/admin/faults", json=settings, headers=AUTH)
    assert r.status_code == 200, r.text
    return dict(r.json())


async def injected(http: httpx.AsyncClient, url: str) -> dict[str, int]:
    r = await http.get(f"{url}/admin/faults", headers=AUTH)
    assert r.status_code == 200, r.text
    return dict(r.json()["injected"])


async def clear_faults(http: httpx.AsyncClient, url: str) -> None:
    r = await http.delete(f"{url}/admin/faults", headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["settings"] == FaultSettings().model_dump()


def auth_req(reference: str, token: str, amount: int = 1000) -> AuthorizeRequest:
    return AuthorizeRequest(
        reference=reference,
        token=token,
        amount=amount,
        currency="usd",
        idempotency_key=f"{reference}:authorize",
    )


# ---- the plan itself ----


def test_same_seed_same_faults_other_seed_other_faults() -> None:
    settings = FaultSettings(seed=11, error_rate=0.3, rate_limit_rate=0.3, reset_rate=0.2)

    def run(plan: FaultPlan) -> list[tuple[str | None, int]]:
        return [(d.kind, d.status) for d in (plan.decide() for _ in range(40))]

    first = run(FaultPlan(settings))
    assert first == run(FaultPlan(settings))
    assert {kind for kind, _ in first} >= {None, "error", "rate_limit", "reset"}
    assert {status for kind, status in first if kind == "error"} <= {500, 502, 503}
    assert run(FaultPlan(settings.model_copy(update={"seed": 12}))) != first
    # reconfiguring with the same seed restarts the sequence
    plan = FaultPlan(settings)
    run(plan)
    plan.configure(settings)
    assert run(plan) == first


def test_a_fault_setting_does_not_shift_the_faults_after_it() -> None:
    """Every request draws the same number of values, so forcing one fault changes nothing later."""
    settings = FaultSettings(seed=5, error_rate=0.5)
    plain, forced = FaultPlan(settings), FaultPlan(settings)
    plain.decide()
    assert forced.decide("reset").kind == "reset"
    assert [plain.decide().kind for _ in range(20)] == [forced.decide().kind for _ in range(20)]


def test_payment_fault_fires_count_times() -> None:
    plan = FaultPlan()
    assert [plan.arm_payment("pay_1", "error", 2) for _ in range(4)] == [True, True, False, False]
    assert plan.arm_payment("pay_2", "error", 2) is True  # per payment


# ---- request faults through the client, on a real server ----


async def test_admin_routes_need_the_key_and_valid_settings(
    sandbox: tuple[FastAPI, str], http: httpx.AsyncClient
) -> None:
    _, url = sandbox
    assert (await http.post(f"{url}/admin/faults", json={"error_rate": 1})).status_code == 401
    assert (
        await http.get(f"{url}/admin/faults", headers={"Authorization": "Bearer nope"})
    ).status_code == 401
    r = await http.post(f"{url}/admin/faults", json={"error_rate": 2}, headers=AUTH)
    assert r.status_code == 400 and r.json()["error"]["param"] == "error_rate"
    r = await http.post(f"{url}/admin/faults", json={"bogus": 1}, headers=AUTH)
    assert r.status_code == 400
    body = await set_faults(http, url, seed=3, error_rate=0.25)
    assert body["settings"]["seed"] == 3 and body["settings"]["error_rate"] == 0.25


async def test_5xx_is_unavailable_and_nothing_happened(
    sandbox: tuple[FastAPI, str], http: httpx.AsyncClient, psp: SandboxPSP
) -> None:
    _, url = sandbox
    tok = await psp.tokenize_card(CARD)
    await set_faults(http, url, error_rate=1.0)
    with pytest.raises(PSPUnavailable) as err:
        await psp.authorize(auth_req("pay_5xx", tok.token))
    assert "HTTP 50" in str(err.value)
    assert (await injected(http, url))["error"] == 1
    await clear_faults(http, url)
    assert await psp.find_payments("pay_5xx") == []  # refused before processing
    assert (await psp.authorize(auth_req("pay_5xx", tok.token))).status == "authorized"


async def test_429_is_unavailable_with_retry_after(
    sandbox: tuple[FastAPI, str], http: httpx.AsyncClient, psp: SandboxPSP
) -> None:
    _, url = sandbox
    await set_faults(http, url, rate_limit_rate=1.0, retry_after_s=7)
    with pytest.raises(PSPUnavailable) as err:
        await psp.tokenize_card(CARD)
    assert err.value.retry_after == 7.0
    assert "HTTP 429" in str(err.value)


async def test_connection_reset_is_ambiguous_but_nothing_was_charged(
    sandbox: tuple[FastAPI, str], http: httpx.AsyncClient, psp: SandboxPSP
) -> None:
    _, url = sandbox
    tok = await psp.tokenize_card(CARD)
    await set_faults(http, url, reset_rate=1.0)
    with pytest.raises(PSPAmbiguous) as err:
        await psp.authorize(auth_req("pay_reset", tok.token))
    assert isinstance(err.value.__cause__, httpx.RemoteProtocolError)
    await clear_faults(http, url)
    # the client could not know, but the sandbox dropped it before processing
    assert await psp.find_payments("pay_reset") == []


async def test_timeout_after_commit_charges_and_find_payments_reveals_it(
    sandbox: tuple[FastAPI, str], http: httpx.AsyncClient, psp: SandboxPSP
) -> None:
    _, url = sandbox
    tok = await psp.tokenize_card(CARD)
    await set_faults(http, url, timeout_after_commit_rate=1.0, commit_hold_ms=1500)
    started = time.monotonic()
    with pytest.raises(PSPAmbiguous) as err:
        await psp.authorize(auth_req("pay_tac", tok.token, amount=4200))
    assert isinstance(err.value.__cause__, httpx.ReadTimeout)
    assert time.monotonic() - started < 1.4  # the client gave up; the server still holds the answer
    await clear_faults(http, url)
    found = await psp.find_payments("pay_tac")
    assert [(p.status, p.amount) for p in found] == [("authorized", 4200)]
    # a retry with the same key replays the committed answer: one payment, not two
    again = await psp.authorize(auth_req("pay_tac", tok.token, amount=4200))
    assert again.id == found[0].id
    assert len(await psp.find_payments("pay_tac")) == 1


async def test_timeout_after_commit_without_client_timeout_drops_the_connection(
    sandbox: tuple[FastAPI, str],
) -> None:
    _, url = sandbox
    async with httpx.AsyncClient(timeout=10) as patient:
        psp = SandboxPSP(patient, url, API_KEY)
        tok = await psp.tokenize_card(CARD)
        await set_faults(patient, url, timeout_after_commit_rate=1.0, commit_hold_ms=100)
        with pytest.raises(PSPAmbiguous) as err:
            await psp.authorize(auth_req("pay_tac2", tok.token))
        assert isinstance(err.value.__cause__, httpx.RemoteProtocolError)
        await clear_faults(patient, url)
        assert [p.status for p in await psp.find_payments("pay_tac2")] == ["authorized"]


async def test_latency(sandbox: tuple[FastAPI, str], http: httpx.AsyncClient, psp: SandboxPSP) -> None:
    _, url = sandbox
    await set_faults(http, url, latency_ms=300)
    started = time.monotonic()
    tok = await psp.tokenize_card(CARD)
    assert time.monotonic() - started >= 0.3
    assert tok.last4 == "4242"


async def test_down_period(sandbox: tuple[FastAPI, str], http: httpx.AsyncClient, psp: SandboxPSP) -> None:
    _, url = sandbox
    until = time.time() + 1.2
    await set_faults(http, url, down_until=until)
    with pytest.raises(PSPUnavailable) as err:
        await psp.tokenize_card(CARD)
    assert err.value.retry_after is not None and 1 <= err.value.retry_after <= 2
    assert (await http.get(f"{url}/healthz")).status_code == 503
    assert (await injected(http, url))["down"] == 2
    # the admin API stays up, so an operator can end the outage
    assert (await http.get(f"{url}/admin/faults", headers=AUTH)).status_code == 200
    await _sleep_until(until + 0.05)
    assert (await psp.tokenize_card(CARD)).last4 == "4242"


async def _sleep_until(when: float) -> None:
    import asyncio

    await asyncio.sleep(max(0.0, when - time.time()))


async def test_sandbox_fault_header_applies_to_that_call_only(sandbox: tuple[FastAPI, str]) -> None:
    _, url = sandbox
    fault: dict[str, str] = {}

    async def add_header(request: httpx.Request) -> None:
        if "kind" in fault:
            request.headers["Sandbox-Fault"] = fault.pop("kind")

    async with httpx.AsyncClient(
        timeout=httpx.Timeout(2.0, read=0.5), event_hooks={"request": [add_header]}
    ) as c:
        psp = SandboxPSP(c, url, API_KEY)
        tok = await psp.tokenize_card(CARD)
        expected: list[tuple[str, type[Exception]]] = [
            ("error", PSPUnavailable),
            ("rate_limit", PSPUnavailable),
            ("reset", PSPAmbiguous),
        ]
        for kind, error in expected:
            fault["kind"] = kind
            with pytest.raises(error):
                await psp.authorize(auth_req("pay_hdr", tok.token))
        assert await psp.find_payments("pay_hdr") == []
        assert (await psp.authorize(auth_req("pay_hdr", tok.token))).status == "authorized"
        fault["kind"] = "explode"
        with pytest.raises(PSPRejected) as err:
            await psp.find_payments("pay_hdr")
        assert err.value.code == "parameter_invalid"


async def test_metadata_fault_hits_the_first_authorize_calls_of_that_payment(
    sandbox: tuple[FastAPI, str], http: httpx.AsyncClient, psp: SandboxPSP
) -> None:
    _, url = sandbox
    tok = await psp.tokenize_card(CARD)
    body = {
        "amount": 500,
        "currency": "usd",
        "token": tok.token,
        "reference": "pay_meta",
        "metadata": {"sandbox_fault": "error", "sandbox_fault_count": "2", "order": "o_1"},
    }
    headers = {**AUTH, "Idempotency-Key": "pay_meta:authorize"}
    statuses = [
        (await http.post(f"{url}/v1/payments", json=body, headers=headers)).status_code for _ in range(4)
    ]
    assert statuses[:2] != [200, 200] and all(s >= 500 for s in statuses[:2])
    assert statuses[2:] == [200, 200]
    (payment,) = (
        await http.get(f"{url}/v1/payments", params={"reference": "pay_meta"}, headers=AUTH)
    ).json()["data"]
    assert payment["metadata"]["order"] == "o_1"
    # another payment without the metadata is not affected
    assert (await psp.authorize(auth_req("pay_other", tok.token))).status == "authorized"


async def test_metadata_is_validated(sandbox: tuple[FastAPI, str], http: httpx.AsyncClient) -> None:
    _, url = sandbox
    body = {"amount": 5, "currency": "usd", "token": "tok_x", "reference": "p", "metadata": {"k": 1}}
    r = await http.post(f"{url}/v1/payments", json=body, headers={**AUTH, "Idempotency-Key": "m1"})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("metadata")


async def test_same_seed_same_faults_over_http(sandbox: tuple[FastAPI, str], http: httpx.AsyncClient) -> None:
    _, url = sandbox

    async def outcomes(seed: int) -> list[str]:
        await set_faults(http, url, seed=seed, error_rate=0.25, rate_limit_rate=0.25, reset_rate=0.2)
        seen = []
        for _ in range(24):
            try:
                r = await http.get(f"{url}/v1/payments", params={"reference": "x"}, headers=AUTH)
                seen.append(str(r.status_code))
            except httpx.RemoteProtocolError:
                seen.append("reset")
        return seen

    first = await outcomes(21)
    assert set(first) >= {"200", "429", "reset"} and any(s.startswith("50") for s in first)
    assert await outcomes(21) == first
    assert await outcomes(22) != first


# ---- webhook faults, seen at a receiver ----


class Receiver:
    def __init__(self) -> None:
        self.requests: list[tuple[float, httpx.Request]] = []
        self._lock = threading.Lock()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            self.requests.append((time.monotonic(), request))
        return httpx.Response(200)

    def events(self) -> list[dict[str, Any]]:
        for _, request in self.requests:
            verify_header(request.content, request.headers["Paysaga-Signature"], WEBHOOK_SECRET)
        return [json.loads(request.content) for _, request in self.requests]


@contextlib.asynccontextmanager
async def webhook_sandbox(**settings: Any) -> AsyncIterator[tuple[FastAPI, Receiver, SandboxPSP]]:
    receiver = Receiver()
    app = create_app(
        db_path=":memory:",
        api_key=API_KEY,
        webhook_secret=WEBHOOK_SECRET,
        webhook_url="http://merchant.test/psp-webhooks",
        webhook_transport=httpx.MockTransport(receiver),
        faults=FaultPlan(FaultSettings(**settings)),
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as client:
        yield app, receiver, SandboxPSP(client, "http://sandbox", API_KEY)
    app.state.webhooks.close(timeout=10)  # delivers what is queued, then stops
    app.state.sandbox.close()


async def _authorize_and_capture(psp: SandboxPSP, reference: str) -> str:
    tok = await psp.tokenize_card(CARD)
    pay = await psp.authorize(auth_req(reference, tok.token))
    await psp.capture(pay.id, 1000, idempotency_key=f"{reference}:capture")
    return pay.id


async def test_webhooks_lost() -> None:
    async with webhook_sandbox(webhook_loss_rate=1.0) as (app, receiver, psp):
        await _authorize_and_capture(psp, "pay_wl")
    assert receiver.requests == []
    assert app.state.webhooks.lost == 2
    assert app.state.faults.snapshot()["injected"]["webhook_lost"] == 2


async def test_webhooks_duplicated_with_the_same_event_id() -> None:
    async with webhook_sandbox(webhook_duplicate_rate=1.0) as (app, receiver, psp):
        await _authorize_and_capture(psp, "pay_wd")
    ids = [e["id"] for e in receiver.events()]
    assert len(ids) == 4 and len(set(ids)) == 2
    assert ids[0] == ids[1] and ids[2] == ids[3]
    assert app.state.webhooks.duplicated == 2


async def test_webhooks_reordered() -> None:
    async with webhook_sandbox(webhook_reorder=True, webhook_reorder_window_ms=1000) as (_, receiver, psp):
        await _authorize_and_capture(psp, "pay_wr")
    assert [e["type"] for e in receiver.events()] == ["payment.captured", "payment.authorized"]


async def test_webhooks_in_order_without_the_fault() -> None:
    async with webhook_sandbox() as (_, receiver, psp):
        await _authorize_and_capture(psp, "pay_wo")
    assert [e["type"] for e in receiver.events()] == ["payment.authorized", "payment.captured"]


async def test_webhooks_delayed() -> None:
    async with webhook_sandbox(webhook_delay_ms=400) as (_, receiver, psp):
        tok = await psp.tokenize_card(CARD)
        sent = time.monotonic()
        await psp.authorize(auth_req("pay_wdl", tok.token))
    ((arrived, _),) = receiver.requests
    assert arrived - sent >= 0.4


async def test_webhook_loss_is_reproducible_by_seed() -> None:
    async def lost_types(seed: int) -> list[str]:
        async with webhook_sandbox(seed=seed, webhook_loss_rate=0.5) as (_, receiver, psp):
            for i in range(4):
                await _authorize_and_capture(psp, f"pay_ws{i}")
        return [f"{e['type']}:{e['data']['object']['reference']}" for e in receiver.events()]

    first = await lost_types(3)
    assert 0 < len(first) < 8  # some lost, some delivered
    assert await lost_types(3) == first
