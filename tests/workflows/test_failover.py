"""PSP failover in the CheckoutWorkflow (workflows/failover.py) on the time-skipping test server:
the checkout fakes of test_checkout, with a PSP per name whose authorize answers are scripted and
a choose_psp that skips the PSPs whose circuit is "open"."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from temporalio import activity
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from tests.workflows.test_checkout import (
    AMOUNT,
    GOOD_OTP,
    FakeServices,
    assert_replays,
    checkout_input,
    stable,
    start,
    update,
)
from workflows.checkout import CheckoutWorkflow
from workflows.contracts import (
    Act,
    AuthenticateRequest,
    AuthorizeInput,
    CaptureRequest,
    CheckoutInput,
    ChoosePspInput,
    ChoosePspResult,
    NextAction,
    PaymentUpdate,
    PSPResult,
    Upd,
)
from workflows.failover import ATTEMPTS_BEFORE_FAILOVER

A, B, C = "sandbox", "sandbox_b", "stripe"
# the activities that talk to a PSP, and so carry its name
PSP_CALLS = (
    Act.AUTHORIZE_PAYMENT,
    Act.AUTHENTICATE_PAYMENT,
    Act.CAPTURE_PAYMENT,
    Act.VOID_PAYMENT,
    Act.REFUND_PAYMENT,
    Act.LOOKUP_PSP_PAYMENT,
)


@dataclass
class RoutedFake(FakeServices):
    """Each PSP's authorize answers come from its script ("ok" when it runs out): "unavailable"
    (503, nothing sent), "ambiguous" (charged, then the answer lost), "declined", "circuit_open"."""

    scripts: dict[str, list[str]] = field(default_factory=dict)
    open_circuits: set[str] = field(default_factory=set)
    charged_at: list[str] = field(default_factory=list)  # PSPs where an authorize took money

    @activity.defn(name=Act.AUTHORIZE_PAYMENT)
    async def authorize_payment(self, inp: AuthorizeInput) -> PSPResult:
        self.calls.append((Act.AUTHORIZE_PAYMENT, inp))
        if inp.psp in self.open_circuits:
            raise ApplicationError("circuit open; nothing was sent", type="CircuitOpen", non_retryable=True)
        script = self.scripts.get(inp.psp, [])
        outcome = script.pop(0) if script else "ok"
        pid = f"{inp.psp}_pay_1"
        if outcome == "unavailable":
            raise ApplicationError(f"{inp.psp}: HTTP 503", type="PSPUnavailable")
        if outcome == "circuit_open":
            raise ApplicationError("circuit open; nothing was sent", type="CircuitOpen", non_retryable=True)
        if outcome == "declined":
            return self._psp("failed", psp_payment_id=pid, amount=inp.amount, decline_code="do_not_honor")
        self.charged_at.append(inp.psp)
        if self.authorize_status == "requires_action":
            return self._psp(
                "requires_action", psp_payment_id=pid, amount=inp.amount, next_action=NextAction("otp")
            )
        result = self._psp("authorized", psp_payment_id=pid, amount=inp.amount)
        if outcome == "ambiguous":
            raise ApplicationError(f"{inp.psp}: read timeout", type="PSPAmbiguous")
        return result

    @activity.defn(name=Act.CHOOSE_PSP)
    async def choose_psp(self, inp: ChoosePspInput) -> ChoosePspResult:
        self.calls.append((Act.CHOOSE_PSP, inp))
        skipped: dict[str, str] = {}
        for psp in inp.candidates:
            if psp not in self.open_circuits:
                return ChoosePspResult(psp=psp, skipped=skipped)
            skipped[psp] = "circuit open, next trial in 12 s"
        return ChoosePspResult(psp=None, skipped=skipped)

    def activities(self) -> list[Callable[..., Any]]:
        return [*super().activities(), self.choose_psp]

    def psps_called(self) -> list[tuple[str, str]]:
        """(activity, PSP) of every PSP call, in order."""
        return [(name, arg.psp) for name, arg in self.calls if name in PSP_CALLS]

    def authorizes(self, psp: str) -> int:
        return sum(1 for name, p in self.psps_called() if name == Act.AUTHORIZE_PAYMENT and p == psp)

    def routing_notes(self) -> list[PaymentUpdate]:
        return [u for u in self.inputs(Act.UPDATE_PAYMENT) if (u.reason or "").startswith("routing:")]


@pytest.fixture
def fake() -> RoutedFake:
    return RoutedFake()


@pytest.fixture
async def task_queue(env: WorkflowEnvironment, fake: RoutedFake) -> AsyncIterator[str]:
    queue = f"failover-test-{uuid.uuid4()}"
    async with Worker(
        env.client, task_queue=queue, workflows=[CheckoutWorkflow], activities=fake.activities()
    ):
        yield queue


@pytest.fixture
def client(env: WorkflowEnvironment) -> Client:
    return env.client


def routed(*route: str, **changes: Any) -> CheckoutInput:
    tokens = {psp: f"tok_{psp}" for psp in (A, B, C)}
    return checkout_input(
        psp=route[0], psp_token=tokens[route[0]], psp_tokens=tokens, route=list(route), **changes
    )


# ---------------------------------------------------------------- failover


async def test_first_psp_down_fails_over_to_the_second(
    client: Client, task_queue: str, fake: RoutedFake
) -> None:
    fake.scripts = {A: ["unavailable"] * ATTEMPTS_BEFORE_FAILOVER}
    handle = await start(client, routed(A, B), task_queue)
    result = await handle.result()

    assert (result.status, result.amount_received) == ("succeeded", AMOUNT)
    # a few attempts at the first, none of which reached it; one authorization in total, at the second
    assert fake.authorizes(A) == ATTEMPTS_BEFORE_FAILOVER and fake.authorizes(B) == 1
    assert fake.charged_at == [B]
    at_b = [a for a in fake.inputs(Act.AUTHORIZE_PAYMENT) if a.psp == B]
    assert at_b[0].psp_token == "tok_sandbox_b"  # a token issued by that PSP, not the first one's
    # every later step goes to the PSP that authorized, the ledger included
    after = fake.psps_called()[ATTEMPTS_BEFORE_FAILOVER + 1 :]
    assert after == [(Act.CAPTURE_PAYMENT, B)]
    assert [p.psp for p in fake.inputs(Act.POST_CAPTURE)] == [B]
    # the decision: in the history (choose_psp twice) and on the payment (psp + a timeline note)
    assert [c.candidates for c in fake.inputs(Act.CHOOSE_PSP)] == [[A, B], [B]]
    [note] = fake.routing_notes()
    assert note.psp == B and note.status == "processing"
    assert note.reason is not None and note.reason.startswith("routing: sandbox unavailable (3 attempts:")
    assert note.reason.endswith("failing over to sandbox_b")
    # the note is written before the second PSP is asked
    order = [n for n, _ in fake.calls if n in (Act.UPDATE_PAYMENT, Act.AUTHORIZE_PAYMENT)]
    assert order[-2:] == [Act.UPDATE_PAYMENT, Act.AUTHORIZE_PAYMENT]
    assert fake.count(Act.VOID_PAYMENT) == fake.count(Act.LOOKUP_PSP_PAYMENT) == 0
    await assert_replays(handle)


async def test_a_blip_is_retried_at_the_same_psp(client: Client, task_queue: str, fake: RoutedFake) -> None:
    fake.scripts = {A: ["unavailable"]}
    result = await (await start(client, routed(A, B), task_queue)).result()
    assert result.status == "succeeded"
    assert (fake.authorizes(A), fake.authorizes(B)) == (2, 0)
    assert fake.routing_notes() == []
    assert [p.psp for p in fake.inputs(Act.CAPTURE_PAYMENT)] == [A]


async def test_ambiguous_first_attempt_does_not_fail_over(
    client: Client, task_queue: str, fake: RoutedFake
) -> None:
    # the first PSP took the money and the answer was lost: charging at the second could charge twice
    fake.scripts = {A: ["ambiguous"]}
    handle = await start(client, routed(A, B), task_queue)
    result = await handle.result()

    assert fake.authorizes(A) == 1 and fake.authorizes(B) == 0
    assert {psp for _, psp in fake.psps_called()} == {A}  # resolved where the money is
    assert fake.charged_at == [A]
    assert fake.routing_notes() == []
    # consistent with the first PSP: captured there, or released there
    if result.status == "succeeded":
        assert fake.psp is not None and fake.psp.status == "captured" and fake.count(Act.CAPTURE_PAYMENT) == 1
    else:
        assert result.status == "failed"
        assert fake.psp is not None and fake.psp.status == "canceled"
    await assert_replays(handle)


async def test_unavailable_after_an_ambiguous_attempt_does_not_fail_over(
    client: Client, task_queue: str, fake: RoutedFake
) -> None:
    fake.scripts = {A: ["unavailable", "ambiguous", "unavailable"]}
    await (await start(client, routed(A, B), task_queue)).result()
    assert fake.authorizes(B) == 0
    assert fake.authorizes(A) == 2  # the ambiguous attempt ended the tries at the first PSP
    assert {psp for _, psp in fake.psps_called()} == {A}


async def test_open_circuit_is_skipped_without_calling(
    client: Client, task_queue: str, fake: RoutedFake
) -> None:
    fake.open_circuits = {A}
    handle = await start(client, routed(A, B), task_queue)
    result = await handle.result()

    assert result.status == "succeeded"
    assert fake.authorizes(A) == 0 and fake.authorizes(B) == 1
    assert [c.candidates for c in fake.inputs(Act.CHOOSE_PSP)] == [[A, B]]
    [note] = fake.routing_notes()
    assert note.psp == B
    assert (
        note.reason
        == "routing: sandbox skipped (circuit open, next trial in 12 s), failing over to sandbox_b"
    )


async def test_circuit_opening_mid_way_fails_over_at_once(
    client: Client, task_queue: str, fake: RoutedFake
) -> None:
    fake.scripts = {A: ["unavailable", "circuit_open"]}
    result = await (await start(client, routed(A, B, C), task_queue)).result()
    assert result.status == "succeeded"
    assert (fake.authorizes(A), fake.authorizes(B), fake.authorizes(C)) == (2, 1, 0)
    [note] = fake.routing_notes()
    assert note.reason == "routing: sandbox unavailable (circuit open), failing over to sandbox_b"


async def test_three_psps_fail_over_twice(client: Client, task_queue: str, fake: RoutedFake) -> None:
    fake.scripts = {A: ["unavailable"] * 3, B: ["unavailable"] * 3}
    result = await (await start(client, routed(A, B, C), task_queue)).result()
    assert result.status == "succeeded"
    assert (fake.authorizes(A), fake.authorizes(B), fake.authorizes(C)) == (3, 3, 1)
    assert [n.psp for n in fake.routing_notes()] == [B, C]
    assert fake.charged_at == [C]


async def test_a_decline_is_not_failed_over(client: Client, task_queue: str, fake: RoutedFake) -> None:
    fake.scripts = {A: ["declined"]}
    result = await (await start(client, routed(A, B), task_queue)).result()
    assert (result.status, result.decline_code) == ("failed", "do_not_honor")
    assert fake.authorizes(B) == 0


async def test_every_psp_down_fails_the_payment(client: Client, task_queue: str, fake: RoutedFake) -> None:
    # the last candidate gets the PSP preset's retries, like a payment with a single PSP
    fake.scripts = {A: ["unavailable"] * 3, B: ["unavailable"] * 8}
    result = await (await start(client, routed(A, B), task_queue)).result()
    assert result.status == "failed"
    assert (fake.authorizes(A), fake.authorizes(B)) == (3, 8)
    assert fake.charged_at == [] and fake.count(Act.CAPTURE_PAYMENT) == 0
    assert {psp for _, psp in fake.psps_called()} <= {A, B}


async def test_every_circuit_open_is_one_fast_refusal(
    client: Client, task_queue: str, fake: RoutedFake
) -> None:
    fake.open_circuits = {A, B}
    result = await (await start(client, routed(A, B), task_queue)).result()
    assert result.status == "failed"
    assert fake.authorizes(A) == 1 and fake.authorizes(B) == 0  # refused by the circuit, nothing sent
    [note] = fake.routing_notes()
    assert note.reason is not None and note.reason.endswith("every circuit is open, trying sandbox")


async def test_otp_and_manual_capture_stay_at_the_chosen_psp(
    client: Client, task_queue: str, fake: RoutedFake
) -> None:
    fake.open_circuits = {A}
    fake.authorize_status = "requires_action"
    handle = await start(client, routed(A, B, capture_method="manual"), task_queue)
    assert (await stable(handle)).status == "requires_action"
    state = await update(handle, Upd.AUTHENTICATE, AuthenticateRequest(otp=GOOD_OTP))
    assert state.status == "requires_capture"
    state = await update(handle, Upd.CAPTURE, CaptureRequest())
    assert state.status == "succeeded"
    assert {psp for _, psp in fake.psps_called()} == {B}


# ---------------------------------------------------------------- no route: the old path


@pytest.mark.parametrize("route", [[], [A]])
async def test_without_a_choice_there_is_no_routing_step(
    client: Client, task_queue: str, fake: RoutedFake, route: list[str]
) -> None:
    handle = await start(client, checkout_input(route=route), task_queue)
    assert (await handle.result()).status == "succeeded"
    assert fake.count(Act.CHOOSE_PSP) == 0 and fake.routing_notes() == []
    assert fake.authorizes(A) == 1
