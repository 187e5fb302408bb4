"""PspActivities in an ActivityEnvironment, against the real sandbox PSP (over httpx.ASGITransport) wrapped
to count calls or to lose answers, plus a scripted PSP for error mapping."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from fastapi import FastAPI
from temporalio import activity
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.psp import PspActivities
from core.config import Settings
from psp.base import (
    AuthorizeRequest,
    CardDetails,
    CardToken,
    MethodDetails,
    MethodToken,
    PSPAmbiguous,
    PSPDispute,
    PSPPayment,
    PSPRefund,
    PSPUnavailable,
)
from psp.registry import build_psps
from psp.sandbox.app import create_app
from psp.sandbox.client import SandboxPSP
from workflows.contracts import (
    Act,
    AuthenticateInput,
    AuthorizeInput,
    CaptureInput,
    LookupInput,
    NextAction,
    PSPResult,
    RefundInput,
    VoidInput,
)

API_KEY = "sk_sandbox_test"
NEXT_YEAR = datetime.now(UTC).year + 1


class CountingPSP:
    """The real sandbox client, counting calls; lose_answer makes authorize act and then fail as if the
    response was lost on the way back."""

    name = "sandbox"

    def __init__(self, inner: SandboxPSP) -> None:
        self.inner = inner
        self.calls: dict[str, int] = {}
        self.keys: list[str] = []
        self.lose_answer = False

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    async def tokenize_card(self, card: CardDetails) -> CardToken:
        return await self.inner.tokenize_card(card)

    async def tokenize_method(self, method: MethodDetails) -> MethodToken:
        return await self.inner.tokenize_method(method)

    async def authorize(self, req: AuthorizeRequest) -> PSPPayment:
        self._count("authorize")
        self.keys.append(req.idempotency_key)
        payment = await self.inner.authorize(req)
        if self.lose_answer:
            raise PSPAmbiguous("read timeout")
        return payment

    async def authenticate(self, psp_payment_id: str, otp: str, *, idempotency_key: str) -> PSPPayment:
        self._count("authenticate")
        self.keys.append(idempotency_key)
        return await self.inner.authenticate(psp_payment_id, otp, idempotency_key=idempotency_key)

    async def capture(self, psp_payment_id: str, amount: int, *, idempotency_key: str) -> PSPPayment:
        self._count("capture")
        self.keys.append(idempotency_key)
        return await self.inner.capture(psp_payment_id, amount, idempotency_key=idempotency_key)

    async def void(self, psp_payment_id: str, *, idempotency_key: str) -> PSPPayment:
        self._count("void")
        self.keys.append(idempotency_key)
        return await self.inner.void(psp_payment_id, idempotency_key=idempotency_key)

    async def refund(self, psp_payment_id: str, amount: int, *, idempotency_key: str) -> PSPRefund:
        self._count("refund")
        self.keys.append(idempotency_key)
        return await self.inner.refund(psp_payment_id, amount, idempotency_key=idempotency_key)

    async def get_payment(self, psp_payment_id: str) -> PSPPayment:
        self._count("get_payment")
        return await self.inner.get_payment(psp_payment_id)

    async def find_payments(self, reference: str) -> list[PSPPayment]:
        self._count("find_payments")
        return await self.inner.find_payments(reference)

    async def submit_dispute_evidence(
        self, psp_dispute_id: str, evidence: dict[str, str], *, idempotency_key: str
    ) -> PSPDispute:
        return await self.inner.submit_dispute_evidence(
            psp_dispute_id, evidence, idempotency_key=idempotency_key
        )

    async def get_dispute(self, psp_dispute_id: str) -> PSPDispute:
        return await self.inner.get_dispute(psp_dispute_id)


class FailingPSP(CountingPSP):
    """Every money call raises the given error."""

    def __init__(self, inner: SandboxPSP, error: Exception) -> None:
        super().__init__(inner)
        self.error = error

    async def authorize(self, req: AuthorizeRequest) -> PSPPayment:
        raise self.error

    async def capture(self, psp_payment_id: str, amount: int, *, idempotency_key: str) -> PSPPayment:
        raise self.error

    async def find_payments(self, reference: str) -> list[PSPPayment]:
        raise self.error


@pytest.fixture
async def sandbox() -> AsyncIterator[FastAPI]:
    app = create_app(db_path=":memory:", api_key=API_KEY, webhook_secret="whsec")
    yield app
    app.state.sandbox.close()


@pytest.fixture
async def real_psp(sandbox: FastAPI) -> AsyncIterator[SandboxPSP]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=sandbox)) as client:
        yield SandboxPSP(client, "http://sandbox", API_KEY)


@pytest.fixture
def psp(real_psp: SandboxPSP) -> CountingPSP:
    return CountingPSP(real_psp)


@pytest.fixture
def acts(psp: CountingPSP) -> PspActivities:
    return PspActivities({"sandbox": psp})


def env(attempt: int = 1) -> ActivityEnvironment:
    e = ActivityEnvironment()
    e.info = dataclasses.replace(e.info, attempt=attempt)
    return e


async def token(psp: CountingPSP, number: str = "4242424242424242") -> str:
    return (await psp.tokenize_card(CardDetails(number, 12, NEXT_YEAR, "123"))).token


def auth_input(tok: str, payment_id: str = "pay_1", amount: int = 1000) -> AuthorizeInput:
    return AuthorizeInput(payment_id=payment_id, psp="sandbox", psp_token=tok, amount=amount, currency="usd")


def test_activity_names_and_list(acts: PspActivities) -> None:
    names = [activity._Definition.must_from_callable(fn).name for fn in acts.activities()]
    assert names == [
        Act.AUTHORIZE_PAYMENT,
        Act.AUTHENTICATE_PAYMENT,
        Act.CAPTURE_PAYMENT,
        Act.VOID_PAYMENT,
        Act.REFUND_PAYMENT,
        Act.LOOKUP_PSP_PAYMENT,
    ]


async def test_authorize_capture_refund(acts: PspActivities, psp: CountingPSP) -> None:
    tok = await token(psp)
    auth = await env().run(acts.authorize_payment, auth_input(tok))
    assert isinstance(auth, PSPResult)
    assert (auth.status, auth.amount, auth.amount_captured) == ("authorized", 1000, 0)
    assert psp.calls == {"authorize": 1}  # attempt 1 does not look up first

    cap = await env().run(acts.capture_payment, CaptureInput("pay_1", "sandbox", auth.psp_payment_id, 600))
    assert (cap.status, cap.amount_captured) == ("captured", 600)

    refund_in = RefundInput("pay_1", "sandbox", auth.psp_payment_id, 200, idempotency_key="pay_1:refund:re_1")
    after = await env().run(acts.refund_payment, refund_in)
    assert (after.psp_payment_id, after.status, after.amount_refunded) == (
        auth.psp_payment_id,
        "captured",
        200,
    )
    # a retried refund activity reuses its key: no second refund
    again = await env(attempt=2).run(acts.refund_payment, refund_in)
    assert again.amount_refunded == 200
    assert psp.keys == ["pay_1:authorize", "pay_1:capture", "pay_1:refund:re_1", "pay_1:refund:re_1"]


async def test_decline_is_a_result(acts: PspActivities, psp: CountingPSP) -> None:
    tok = await token(psp, "4000000000009995")
    res = await env().run(acts.authorize_payment, auth_input(tok))
    assert (res.status, res.decline_code) == ("failed", "insufficient_funds")
    assert res.message


async def test_otp_flow_maps_next_action(acts: PspActivities, psp: CountingPSP) -> None:
    tok = await token(psp, "4000002760003184")
    res = await env().run(acts.authorize_payment, auth_input(tok))
    assert res.status == "requires_action"
    assert res.next_action == NextAction(type="otp", url=None)
    done = await env().run(
        acts.authenticate_payment, AuthenticateInput("pay_1", "sandbox", res.psp_payment_id, "123456")
    )
    assert (done.status, done.next_action) == ("authorized", None)
    voided = await env().run(acts.void_payment, VoidInput("pay_1", "sandbox", res.psp_payment_id))
    assert voided.status == "canceled"
    assert psp.keys == ["pay_1:authorize", "pay_1:authenticate", "pay_1:void"]


async def test_retry_looks_up_first_and_does_not_charge_twice(acts: PspActivities, psp: CountingPSP) -> None:
    tok = await token(psp)
    psp.lose_answer = True
    with pytest.raises(ApplicationError) as err:
        await env(attempt=1).run(acts.authorize_payment, auth_input(tok))
    assert err.value.type == "PSPAmbiguous" and not err.value.non_retryable
    psp.lose_answer = False

    res = await env(attempt=2).run(acts.authorize_payment, auth_input(tok))
    assert res.status == "authorized"
    assert psp.calls == {"authorize": 1, "find_payments": 1}  # found, not authorized again
    found = await psp.find_payments("pay_1")
    assert [p.id for p in found] == [res.psp_payment_id]


async def test_retry_authorizes_when_the_psp_never_saw_it(acts: PspActivities, psp: CountingPSP) -> None:
    tok = await token(psp)
    res = await env(attempt=3).run(acts.authorize_payment, auth_input(tok))
    assert res.status == "authorized"
    assert psp.calls == {"find_payments": 1, "authorize": 1}


async def test_retry_returns_an_earlier_decline(acts: PspActivities, psp: CountingPSP) -> None:
    tok = await token(psp, "4000000000000002")
    first = await env().run(acts.authorize_payment, auth_input(tok))
    again = await env(attempt=2).run(acts.authorize_payment, auth_input(tok))
    assert again == first
    assert again.decline_code == "generic_decline"
    assert psp.calls["authorize"] == 1


async def test_processing_error_is_retryable_and_the_key_is_stable(
    acts: PspActivities, psp: CountingPSP
) -> None:
    # The sandbox fails this card twice per idempotency key: success on attempt 3 proves the key is stable.
    tok = await token(psp, "4000000000000119")
    for attempt in (1, 2):
        with pytest.raises(ApplicationError) as err:
            await env(attempt).run(acts.authorize_payment, auth_input(tok))
        assert err.value.type == "PSPUnavailable" and not err.value.non_retryable
    res = await env(3).run(acts.authorize_payment, auth_input(tok))
    assert res.status == "authorized"
    assert psp.keys == ["pay_1:authorize"] * 3


async def test_rejected_is_non_retryable(acts: PspActivities) -> None:
    with pytest.raises(ApplicationError) as err:
        await env().run(acts.authorize_payment, auth_input("tok_unknown"))
    assert err.value.type == "PSPRejected"
    assert err.value.non_retryable
    assert err.value.details == ({"code": "resource_missing"},)


async def test_capture_in_the_wrong_state_is_non_retryable(acts: PspActivities, psp: CountingPSP) -> None:
    tok = await token(psp)
    auth = await env().run(acts.authorize_payment, auth_input(tok))
    await env().run(acts.void_payment, VoidInput("pay_1", "sandbox", auth.psp_payment_id))
    with pytest.raises(ApplicationError) as err:
        await env().run(acts.capture_payment, CaptureInput("pay_1", "sandbox", auth.psp_payment_id, 1000))
    assert (err.value.type, err.value.non_retryable) == ("PSPRejected", True)


@pytest.mark.parametrize(
    ("error", "type_", "delay"),
    [
        (PSPUnavailable("503", retry_after=7), "PSPUnavailable", timedelta(seconds=7)),
        (PSPUnavailable("connect refused"), "PSPUnavailable", None),
        (PSPAmbiguous("read timeout"), "PSPAmbiguous", None),
    ],
)
async def test_transport_errors_are_retryable(
    real_psp: SandboxPSP, error: Exception, type_: str, delay: timedelta | None
) -> None:
    acts = PspActivities({"sandbox": FailingPSP(real_psp, error)})
    with pytest.raises(ApplicationError) as err:
        await env().run(acts.capture_payment, CaptureInput("pay_1", "sandbox", "psp_pay_1", 100))
    assert err.value.type == type_
    assert not err.value.non_retryable
    assert err.value.next_retry_delay == delay


async def test_lookup_failure_on_retry_is_retryable(real_psp: SandboxPSP) -> None:
    failing = FailingPSP(real_psp, PSPUnavailable("down"))
    acts = PspActivities({"sandbox": failing})
    with pytest.raises(ApplicationError) as err:
        await env(attempt=2).run(acts.authorize_payment, auth_input("tok_1"))
    assert err.value.type == "PSPUnavailable" and not err.value.non_retryable


async def test_lookup(acts: PspActivities, psp: CountingPSP) -> None:
    assert await env().run(acts.lookup_psp_payment, LookupInput("pay_1", "sandbox")) is None
    tok = await token(psp)
    auth = await env().run(acts.authorize_payment, auth_input(tok))
    found = await env().run(acts.lookup_psp_payment, LookupInput("pay_1", "sandbox"))
    assert found == auth


async def test_lookup_prefers_the_live_payment(acts: PspActivities, psp: CountingPSP) -> None:
    # Two PSP payments for one reference (e.g. a decline, then a retry with another card outside our keys).
    declined = await psp.inner.authorize(
        AuthorizeRequest("pay_1", await token(psp, "4000000000000002"), 100, "usd", "a")
    )
    live = await psp.inner.authorize(AuthorizeRequest("pay_1", await token(psp), 100, "usd", "b"))
    later_decline = await psp.inner.authorize(
        AuthorizeRequest("pay_1", await token(psp, "4000000000000002"), 100, "usd", "c")
    )
    assert declined.status == later_decline.status == "failed"
    found = await env().run(acts.lookup_psp_payment, LookupInput("pay_1", "sandbox"))
    assert found is not None and found.psp_payment_id == live.id


async def test_unknown_psp_is_non_retryable(acts: PspActivities) -> None:
    with pytest.raises(ApplicationError) as err:
        await env().run(acts.lookup_psp_payment, LookupInput("pay_1", "stripe"))
    assert (err.value.type, err.value.non_retryable) == ("UnknownPSP", True)


async def test_registry_builds_the_sandbox_client() -> None:
    settings = Settings.model_validate(
        {"sandbox_url": "http://psp.internal:8100", "sandbox_api_key": "sk_reg"}
    )
    async with httpx.AsyncClient() as http:
        psps = build_psps(settings, http)
    assert list(psps) == ["sandbox"]
    client = psps["sandbox"]
    assert isinstance(client, SandboxPSP) and client.name == "sandbox"
    assert client._base_url == "http://psp.internal:8100" and client._api_key == "sk_reg"
