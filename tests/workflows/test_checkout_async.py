"""CheckoutWorkflow learning the PSP's truth asynchronously, on the time-skipping server: redirect
methods completed by webhook, by the return-URL nudge or by polling only; the redirect deadline;
an OTP completed elsewhere; ambiguous authorize and capture failures resolved by looking up.

The fakes are tests/workflows/test_checkout.py's, with a PSP that can hold a redirect payment the
"customer" approves or declines (the test flips the fake PSP's state, as the bank page would)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from temporalio import activity
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from tests.workflows.test_checkout import (
    AMOUNT,
    FakeServices,
    assert_replays,
    checkout_input,
    eventually,
    stable,
    start,
    update,
)
from workflows import options
from workflows.checkout import CheckoutWorkflow
from workflows.contracts import (
    PSP_EVENT_SIGNAL,
    RECHECK_UPDATE,
    Act,
    AuthenticateRequest,
    AuthorizeInput,
    CancelRequest,
    CaptureInput,
    LookupInput,
    NextAction,
    PaymentState,
    PSPEvent,
    PSPResult,
)

REDIRECT_URL = "http://psp.test/redirect/psp_1"
REDIRECT = NextAction(type="redirect_to_url", url=REDIRECT_URL)


@dataclass
class AsyncFake(FakeServices):
    """FakeServices plus a redirect method and PSP answers that change between look-ups."""

    redirect: bool = False  # authorize answers requires_action + redirect_to_url
    approve_at_lookup: int = 0  # the customer approves just before this look-up (0: never by itself)
    lost_captures: int = 0  # the first N capture attempts never reach the PSP and lose their answer
    capture_gate: asyncio.Event | None = None  # set: capture waits for it (after capture_started)
    capture_started: asyncio.Event = field(default_factory=asyncio.Event)

    @activity.defn(name=Act.AUTHORIZE_PAYMENT)
    async def authorize_payment(self, inp: AuthorizeInput) -> PSPResult:
        if self.redirect and not self.psp_down:
            self.calls.append((Act.AUTHORIZE_PAYMENT, inp))
            return self._psp("requires_action", amount=inp.amount, next_action=REDIRECT)
        return await super().authorize_payment(inp)

    @activity.defn(name=Act.LOOKUP_PSP_PAYMENT)
    async def lookup_psp_payment(self, inp: LookupInput) -> PSPResult | None:
        if self.approve_at_lookup and self.count(Act.LOOKUP_PSP_PAYMENT) + 1 == self.approve_at_lookup:
            self.approve()
        return await super().lookup_psp_payment(inp)

    @activity.defn(name=Act.CAPTURE_PAYMENT)
    async def capture_payment(self, inp: CaptureInput) -> PSPResult:
        if self.capture_gate is not None:
            self.capture_started.set()
            await self.capture_gate.wait()
        if self.count(Act.CAPTURE_PAYMENT) < self.lost_captures:
            self.calls.append((Act.CAPTURE_PAYMENT, inp))
            raise ApplicationError("connection reset", type="PSPAmbiguous")
        return await super().capture_payment(inp)

    def approve(self) -> None:
        self._psp("authorized", next_action=None)

    def decline(self, code: str) -> None:
        self._psp("failed", next_action=None, decline_code=code, message="declined at the bank")


@pytest.fixture
def fake() -> AsyncFake:
    return AsyncFake()


@pytest.fixture
async def task_queue(env: WorkflowEnvironment, fake: AsyncFake) -> AsyncIterator[str]:
    queue = f"checkout-async-{uuid.uuid4()}"
    async with Worker(
        env.client, task_queue=queue, workflows=[CheckoutWorkflow], activities=fake.activities()
    ):
        yield queue


@pytest.fixture
def client(env: WorkflowEnvironment) -> Client:
    return env.client


def event(status: str, n: int = 1) -> PSPEvent:
    return PSPEvent(
        id=f"evt_{n}", type=f"payment.{status}", psp="sandbox", object_id="psp_1", status=status, created=n
    )


async def history_types(handle: WorkflowHandle[Any, Any]) -> list[EventType.ValueType]:
    return [e.event_type async for e in handle.fetch_history_events()]


async def timers(handle: WorkflowHandle[Any, Any]) -> list[float]:
    """The durations (s) of the timers the workflow started, in order."""
    out = []
    async for e in handle.fetch_history_events():
        if e.event_type == EventType.EVENT_TYPE_TIMER_STARTED:
            out.append(e.timer_started_event_attributes.start_to_fire_timeout.ToTimedelta().total_seconds())
    return out


async def signal_processed(handle: WorkflowHandle[Any, Any]) -> None:
    """Wait until a workflow task completed after the last signal in the history."""
    for _ in range(200):
        types = await history_types(handle)
        last = max(i for i, t in enumerate(types) if t == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED)
        if EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED in types[last:]:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("signal not processed")


def scheduled(types: list[EventType.ValueType]) -> int:
    return types.count(EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED)


async def requires_action(client: Client, fake: AsyncFake, task_queue: str, **inp: Any) -> Any:
    handle = await start(client, checkout_input(**inp), task_queue)
    state = await stable(handle)
    assert (state.status, state.next_action) == ("requires_action", REDIRECT)
    return handle


# ---------------------------------------------------------------- redirect methods


async def test_redirect_approved_by_webhook(client: Client, task_queue: str, fake: AsyncFake) -> None:
    fake.redirect = True
    handle = await requires_action(client, fake, task_queue)
    assert fake.statuses() == ["requires_action"]
    assert fake.inputs(Act.UPDATE_PAYMENT)[0].next_action == REDIRECT

    # a webhook while the customer is still on the bank page: looked up, nothing changes
    await handle.signal(PSP_EVENT_SIGNAL, event("requires_action", 1))
    await eventually(lambda: fake.count(Act.LOOKUP_PSP_PAYMENT) == 1, "first look-up")
    # the same event redelivered: ignored (no look-up scheduled for it)
    before = scheduled(await history_types(handle))
    await handle.signal(PSP_EVENT_SIGNAL, event("requires_action", 1))
    await signal_processed(handle)
    assert scheduled(await history_types(handle)) == before

    fake.approve()
    await handle.signal(PSP_EVENT_SIGNAL, event("authorized", 2))
    result = await handle.result()

    assert (result.status, result.amount_received) == ("succeeded", AMOUNT)
    assert fake.count(Act.LOOKUP_PSP_PAYMENT) == 2
    assert [c.amount for c in fake.inputs(Act.CAPTURE_PAYMENT)] == [AMOUNT]
    assert fake.count(Act.AUTHENTICATE_PAYMENT) == 0  # a redirect is completed at the PSP itself
    # learnt from the webhooks alone: no poll timer ever fired
    assert EventType.EVENT_TYPE_TIMER_FIRED not in await history_types(handle)
    await assert_replays(handle)


async def test_return_url_just_after_the_webhook_waits_for_the_outcome(
    client: Client, task_queue: str, fake: AsyncFake
) -> None:
    """The webhook can beat the customer's browser: the wait for the PSP is over and the payment
    is on its way to succeeded when the return page nudges. The nudge then waits for that outcome
    (the page shows it) instead of being refused while the payment still reads requires_action."""
    fake.redirect = True
    fake.capture_gate = asyncio.Event()
    handle = await requires_action(client, fake, task_queue)
    fake.approve()
    await handle.signal(PSP_EVENT_SIGNAL, event("authorized"))
    await asyncio.wait_for(fake.capture_started.wait(), timeout=10)

    nudge = asyncio.create_task(update(handle, RECHECK_UPDATE))
    await asyncio.sleep(0.5)  # the nudge is accepted while the capture is still running
    assert not nudge.done()
    fake.capture_gate.set()

    assert (await nudge).status == "succeeded"
    assert (await handle.result()).status == "succeeded"
    assert fake.count(Act.LOOKUP_PSP_PAYMENT) == 1  # the webhook's look-up; the nudge needed none
    await assert_replays(handle)


async def test_redirect_approved_by_return_url(client: Client, task_queue: str, fake: AsyncFake) -> None:
    fake.redirect = True
    handle = await requires_action(client, fake, task_queue, capture_method="manual")

    # the customer came back before deciding (the bank page's "back" link): nothing to learn yet
    state = await update(handle, RECHECK_UPDATE)
    assert state.status == "requires_action"
    assert fake.count(Act.LOOKUP_PSP_PAYMENT) == 1

    fake.approve()
    state = await update(handle, RECHECK_UPDATE)
    assert (state.status, state.amount_capturable) == ("requires_capture", AMOUNT)
    assert fake.count(Act.LOOKUP_PSP_PAYMENT) == 2
    # no PSP wait is open any more: the nudge is refused (and leaves no trace in the history)
    with pytest.raises(WorkflowUpdateFailedError) as info:
        await update(handle, RECHECK_UPDATE)
    assert isinstance(info.value.cause, ApplicationError) and info.value.cause.type == "InvalidState"

    await update(handle, "cancel", CancelRequest(reason="abandoned"))
    assert (await handle.result()).status == "canceled"
    assert [v.psp_payment_id for v in fake.inputs(Act.VOID_PAYMENT)] == ["psp_1"]
    assert EventType.EVENT_TYPE_TIMER_FIRED not in await history_types(handle)
    await assert_replays(handle)


async def test_redirect_approved_by_polling_only(client: Client, task_queue: str, fake: AsyncFake) -> None:
    fake.redirect, fake.approve_at_lookup = True, 4  # webhook lost; the 4th poll sees the approval
    handle = await requires_action(client, fake, task_queue)

    result = await handle.result()

    assert result.status == "succeeded"
    assert fake.count(Act.LOOKUP_PSP_PAYMENT) == 4
    assert fake.count(Act.CAPTURE_PAYMENT) == 1
    assert fake.psp is not None and (fake.psp.status, fake.psp.amount_captured) == ("captured", AMOUNT)
    # polled with backoff: 5 s, doubling
    assert await timers(handle) == [5, 10, 20, 40]
    await assert_replays(handle)


async def test_redirect_timeout_voids_and_notifies(client: Client, task_queue: str, fake: AsyncFake) -> None:
    fake.redirect = True  # the customer never comes back
    handle = await requires_action(client, fake, task_queue)

    result = await handle.result()  # skips the 10 minutes

    assert result.status == "canceled"
    # backoff capped at 60 s; the last timer ends at the 10-minute deadline (less the moments the
    # look-ups took)
    waits = await timers(handle)
    assert waits[:-1] == [5, 10, 20, 40, 60, 60, 60, 60, 60, 60, 60, 60]
    assert 40 < waits[-1] <= 45
    assert options.ACTION_TIMEOUT.total_seconds() - 5 < sum(waits) <= options.ACTION_TIMEOUT.total_seconds()
    assert fake.count(Act.LOOKUP_PSP_PAYMENT) == 12  # one after every poll but the last
    assert [v.psp_payment_id for v in fake.inputs(Act.VOID_PAYMENT)] == ["psp_1"]
    assert fake.psp is not None and fake.psp.status == "canceled"  # the PSP agrees
    last = fake.inputs(Act.UPDATE_PAYMENT)[-1]
    assert (last.status, last.reason) == ("canceled", "authentication timed out")
    assert [r.kind for r in fake.inputs(Act.SEND_RECEIPT)] == ["payment_failed"]
    assert fake.count(Act.CAPTURE_PAYMENT) == 0


async def test_redirect_declined(client: Client, task_queue: str, fake: AsyncFake) -> None:
    fake.redirect = True
    handle = await requires_action(client, fake, task_queue)

    fake.decline("bank_declined")
    await handle.signal(PSP_EVENT_SIGNAL, event("failed"))
    result = await handle.result()

    assert (result.status, result.failure_code, result.decline_code) == (
        "failed",
        "payment_method_provider_decline",
        "bank_declined",
    )
    assert fake.count(Act.VOID_PAYMENT) == 0  # the PSP failed it: nothing held
    assert fake.count(Act.CAPTURE_PAYMENT) == 0
    assert fake.count(Act.SEND_RECEIPT) == 0  # the customer saw the decline on the bank page


async def test_cancel_while_on_the_redirect_page(client: Client, task_queue: str, fake: AsyncFake) -> None:
    fake.redirect = True
    handle = await requires_action(client, fake, task_queue)

    state = await update(handle, "cancel", CancelRequest())

    assert state.status == "canceled"
    assert (await handle.result()).status == "canceled"
    assert [v.psp_payment_id for v in fake.inputs(Act.VOID_PAYMENT)] == ["psp_1"]
    assert fake.psp is not None and fake.psp.status == "canceled"


async def test_otp_completed_elsewhere(client: Client, task_queue: str, fake: AsyncFake) -> None:
    fake.authorize_status = "requires_action"  # OTP
    handle = await start(client, checkout_input(), task_queue)
    assert (await stable(handle)).next_action == NextAction(type="otp")

    fake.approve()  # e.g. the issuer's app confirmed it
    await handle.signal(PSP_EVENT_SIGNAL, event("authorized"))
    result = await handle.result()

    assert result.status == "succeeded"
    assert fake.count(Act.AUTHENTICATE_PAYMENT) == 0
    assert fake.count(Act.CAPTURE_PAYMENT) == 1


async def test_otp_wait_does_not_poll_the_psp(client: Client, task_queue: str, fake: AsyncFake) -> None:
    """The OTP comes to us: a parked OTP payment holds one timer (its deadline) and never looks
    the PSP up, so thousands of them waiting cost nothing until they are answered."""
    fake.authorize_status = "requires_action"
    handle = await start(client, checkout_input(), task_queue)
    await stable(handle)

    result = await handle.result()  # skips the 10 minutes

    assert result.status == "canceled"
    assert fake.count(Act.LOOKUP_PSP_PAYMENT) == 0
    assert await timers(handle) == [options.ACTION_TIMEOUT.total_seconds()]


async def test_otp_still_works_with_the_update(client: Client, task_queue: str, fake: AsyncFake) -> None:
    fake.authorize_status = "requires_action"
    handle = await start(client, checkout_input(), task_queue)
    await stable(handle)

    state: PaymentState = await update(handle, "authenticate", AuthenticateRequest(otp="123456"))

    assert state.status == "succeeded"
    assert (await handle.result()).status == "succeeded"  # a test leaves no workflow running
    assert fake.count(Act.AUTHENTICATE_PAYMENT) == 1
    assert fake.count(Act.LOOKUP_PSP_PAYMENT) == 0  # answered before the first poll


# ---------------------------------------------------------------- ambiguous PSP failures


async def test_ambiguous_authorize_resolved_as_authorized(
    client: Client, task_queue: str, fake: AsyncFake
) -> None:
    fake.psp_down = True  # the first attempt authorized, every answer was lost

    result = await (await start(client, checkout_input(), task_queue)).result()

    assert (result.status, result.amount_received) == ("succeeded", AMOUNT)
    assert fake.count(Act.AUTHORIZE_PAYMENT) == 8  # PSP preset attempts, none answered
    assert fake.count(Act.LOOKUP_PSP_PAYMENT) == 1  # the first poll found the authorization
    # one authorization, captured once, nothing voided
    assert [c.psp_payment_id for c in fake.inputs(Act.CAPTURE_PAYMENT)] == ["psp_1"]
    assert fake.psp is not None and (fake.psp.status, fake.psp.amount_captured) == ("captured", AMOUNT)
    assert fake.count(Act.VOID_PAYMENT) == 0
    assert [p.amount for p in fake.inputs(Act.POST_CAPTURE)] == [AMOUNT]
    reasons = [u.reason or "" for u in fake.inputs(Act.UPDATE_PAYMENT)]
    assert any(r.startswith("PSP answer lost during authorize") for r in reasons)
    assert "PSP lookup after the lost answer: authorized" in reasons


async def test_ambiguous_authorize_resolved_by_webhook(
    client: Client, task_queue: str, fake: AsyncFake
) -> None:
    fake.psp_down = True
    handle = await start(client, checkout_input(), task_queue)
    # the PSP's payment.authorized webhook arrives while the authorize attempts are still failing
    await handle.signal(PSP_EVENT_SIGNAL, event("authorized"))

    result = await handle.result()

    assert result.status == "succeeded"
    assert fake.count(Act.AUTHORIZE_PAYMENT) == 8
    assert fake.count(Act.LOOKUP_PSP_PAYMENT) == 1
    assert await timers(handle) == []  # looked up at once: no poll was needed


async def test_ambiguous_authorize_resolved_as_not_found(
    client: Client, task_queue: str, fake: AsyncFake
) -> None:
    fake.psp_down, fake.psp_down_charges = True, False  # nothing reached the PSP

    handle = await start(client, checkout_input(), task_queue)
    result = await handle.result()

    assert (result.status, result.failure_code) == ("failed", "psp_unavailable")
    assert fake.psp is None  # the PSP holds nothing
    assert fake.count(Act.CAPTURE_PAYMENT) == 0
    assert fake.count(Act.POST_CAPTURE) == 0
    assert fake.count(Act.VOID_PAYMENT) == 0
    assert fake.count(Act.REFUND_PAYMENT) == 0
    # "no payment" believed only once AMBIGUITY_SETTLE passed since the failure
    assert await timers(handle) == [5, 10, 20]
    assert [r.kind for r in fake.inputs(Act.SEND_RECEIPT)] == ["payment_failed"]
    await assert_replays(handle)


async def test_ambiguous_authorize_of_a_redirect_payment(
    client: Client, task_queue: str, fake: AsyncFake
) -> None:
    # the authorize created a redirect payment at the PSP, and its answer was lost
    fake.psp_down = True
    fake.psp = PSPResult(
        psp_payment_id="psp_1", status="requires_action", amount=AMOUNT, next_action=REDIRECT
    )
    fake.approve_at_lookup = 3  # found at the 1st look-up, approved before the 3rd

    handle = await start(client, checkout_input(), task_queue)
    result = await handle.result()

    assert result.status == "succeeded"
    assert fake.count(Act.LOOKUP_PSP_PAYMENT) == 3
    action = [u for u in fake.inputs(Act.UPDATE_PAYMENT) if u.status == "requires_action"]
    assert [u.next_action for u in action] == [REDIRECT]  # the customer was sent to the page
    assert fake.count(Act.CAPTURE_PAYMENT) == 1
    assert fake.count(Act.VOID_PAYMENT) == 0


async def test_ambiguous_capture_never_reached_the_psp(
    client: Client, task_queue: str, fake: AsyncFake
) -> None:
    fake.lost_captures = 8  # the whole first capture call: lost, and nothing captured

    result = await (await start(client, checkout_input(), task_queue)).result()

    assert (result.status, result.amount_received) == ("succeeded", AMOUNT)
    # looked up (still authorized), then captured again with the same key: one capture
    assert fake.count(Act.LOOKUP_PSP_PAYMENT) == 1
    assert fake.count(Act.CAPTURE_PAYMENT) == 9
    assert fake.order(Act.LOOKUP_PSP_PAYMENT, Act.CAPTURE_PAYMENT)[-2:] == [
        Act.LOOKUP_PSP_PAYMENT,
        Act.CAPTURE_PAYMENT,
    ]
    assert fake.psp is not None and fake.psp.amount_captured == AMOUNT
    assert [p.amount for p in fake.inputs(Act.POST_CAPTURE)] == [AMOUNT]
    assert fake.count(Act.REFUND_PAYMENT) == 0
