"""CheckoutWorkflow on the time-skipping test server with fake activities under the real names."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import pytest
from temporalio import activity
from temporalio.api.enums.v1 import EventType
from temporalio.client import (
    Client,
    WithStartWorkflowOperation,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowUpdateFailedError,
)
from temporalio.common import SearchAttributePair, TypedSearchAttributes, WorkflowIDConflictPolicy
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError, CancelledError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer, Worker

from workflows import options
from workflows.checkout import CheckoutWorkflow
from workflows.contracts import (
    SA_AMOUNT_MINOR,
    SA_CURRENCY,
    SA_MERCHANT_ID,
    SA_PAYMENT_STATUS,
    Act,
    AuthenticateInput,
    AuthenticateRequest,
    AuthorizeInput,
    CancelRequest,
    CaptureInput,
    CaptureRequest,
    CartLine,
    CheckoutInput,
    CheckoutResult,
    ConfirmOrderInput,
    CreatePaymentInput,
    FraudCheckInput,
    FraudCheckResult,
    FraudDecision,
    LookupInput,
    NextAction,
    PaymentState,
    PaymentUpdate,
    PostCaptureInput,
    PostCaptureResult,
    PSPResult,
    ReceiptInput,
    RefundInput,
    ReviewRequest,
    StockInput,
    Upd,
    VoidInput,
    checkout_workflow_id,
)

AMOUNT = 10_000
GOOD_OTP = "123456"


# ---------------------------------------------------------------- fakes


@dataclass
class FakeServices:
    """In-memory stand-ins for the database, stock, fraud, PSP, ledger and mail activities.

    Every attempt is recorded in `calls` (name, input); the knobs below decide the answers.
    """

    calls: list[tuple[str, Any]] = field(default_factory=list)
    fraud: FraudDecision = "approve"
    fraud_reasons: list[str] = field(default_factory=list)
    out_of_stock: bool = False
    authorize_status: str = "authorized"  # authorized | requires_action | failed
    decline_code: str | None = None
    authorize_transient_failures: int = 0  # first N attempts raise a retryable error
    psp_down: bool = False  # authorize never answers...
    psp_down_charges: bool = True  # ...but the first attempt did authorize at the PSP
    # look-ups fail too (the PSP is unreachable) for this long after the first authorize attempt
    lookup_down_for: timedelta | None = None
    down_since: datetime | None = None
    capture_down: bool = False  # capture captures at the PSP, then never answers
    void_fails: bool = False
    ledger_fails: bool = False
    receipt_fails: bool = False
    # the activity waits for the event: lets a test act while the call is in flight
    authorize_gate: asyncio.Event | None = None
    release_gate: asyncio.Event | None = None
    receipt_gate: asyncio.Event | None = None
    # what the fake PSP holds for this payment (lookup answers with it)
    psp: PSPResult | None = None

    def count(self, name: str) -> int:
        return sum(1 for n, _ in self.calls if n == name)

    def inputs(self, name: str) -> list[Any]:
        return [arg for n, arg in self.calls if n == name]

    def order(self, *names: str) -> list[str]:
        """The calls among `names`, in the order they happened."""
        return [n for n, _ in self.calls if n in names]

    def statuses(self) -> list[str]:
        """The statuses written by update_payment, in order (timeline notes included)."""
        return [u.status for u in self.inputs(Act.UPDATE_PAYMENT)]

    def _psp(self, status: str, **changes: Any) -> PSPResult:
        base = self.psp or PSPResult(psp_payment_id="psp_1", status="authorized", amount=AMOUNT)
        self.psp = replace(base, status=status, **changes)  # type: ignore[arg-type]
        return self.psp

    # -- database / stock / fraud

    @activity.defn(name=Act.CREATE_PAYMENT)
    async def create_payment(self, inp: CreatePaymentInput) -> None:
        self.calls.append((Act.CREATE_PAYMENT, inp))

    @activity.defn(name=Act.UPDATE_PAYMENT)
    async def update_payment(self, inp: PaymentUpdate) -> None:
        self.calls.append((Act.UPDATE_PAYMENT, inp))

    @activity.defn(name=Act.RESERVE_STOCK)
    async def reserve_stock(self, inp: StockInput) -> None:
        self.calls.append((Act.RESERVE_STOCK, inp))
        if self.out_of_stock:
            raise ApplicationError("sku-1: 0 left", type="OutOfStock")

    @activity.defn(name=Act.RELEASE_STOCK)
    async def release_stock(self, inp: StockInput) -> None:
        self.calls.append((Act.RELEASE_STOCK, inp))
        if self.release_gate is not None:
            await self.release_gate.wait()

    @activity.defn(name=Act.CONFIRM_ORDER)
    async def confirm_order(self, inp: ConfirmOrderInput) -> None:
        self.calls.append((Act.CONFIRM_ORDER, inp))

    @activity.defn(name=Act.CHECK_FRAUD)
    async def check_fraud(self, inp: FraudCheckInput) -> FraudCheckResult:
        self.calls.append((Act.CHECK_FRAUD, inp))
        return FraudCheckResult(decision=self.fraud, reasons=self.fraud_reasons)

    # -- PSP

    @activity.defn(name=Act.AUTHORIZE_PAYMENT)
    async def authorize_payment(self, inp: AuthorizeInput) -> PSPResult:
        self.calls.append((Act.AUTHORIZE_PAYMENT, inp))
        if self.down_since is None:
            self.down_since = activity.info().current_attempt_scheduled_time  # the server's (skipped) clock
        if self.authorize_gate is not None:
            await self.authorize_gate.wait()
        if self.psp_down:
            if self.psp_down_charges and self.psp is None:
                self._psp("authorized", amount=inp.amount)  # acted, then the answer was lost
            raise ApplicationError("PSP timed out", type="PSPAmbiguous")
        if activity.info().attempt <= self.authorize_transient_failures:
            raise ApplicationError("PSP answered 503", type="PSPUnavailable")
        if self.authorize_status == "requires_action":
            return self._psp("requires_action", amount=inp.amount, next_action=NextAction(type="otp"))
        if self.authorize_status == "failed":
            return self._psp("failed", amount=inp.amount, decline_code=self.decline_code, message="declined")
        return self._psp("authorized", amount=inp.amount)

    @activity.defn(name=Act.AUTHENTICATE_PAYMENT)
    async def authenticate_payment(self, inp: AuthenticateInput) -> PSPResult:
        self.calls.append((Act.AUTHENTICATE_PAYMENT, inp))
        if inp.otp == GOOD_OTP:
            return self._psp("authorized", next_action=None)
        return self._psp("failed", decline_code="authentication_failed", next_action=None)

    @activity.defn(name=Act.CAPTURE_PAYMENT)
    async def capture_payment(self, inp: CaptureInput) -> PSPResult:
        self.calls.append((Act.CAPTURE_PAYMENT, inp))
        if self.capture_down:
            self._psp("captured", amount_captured=inp.amount)
            raise ApplicationError("PSP timed out", type="PSPAmbiguous")
        return self._psp("captured", amount_captured=inp.amount)

    @activity.defn(name=Act.VOID_PAYMENT)
    async def void_payment(self, inp: VoidInput) -> PSPResult:
        self.calls.append((Act.VOID_PAYMENT, inp))
        if self.void_fails:
            raise ApplicationError("PSP refused the void", type="PSPRejected", non_retryable=True)
        return self._psp("canceled")

    @activity.defn(name=Act.REFUND_PAYMENT)
    async def refund_payment(self, inp: RefundInput) -> PSPResult:
        self.calls.append((Act.REFUND_PAYMENT, inp))
        return self._psp("refunded", amount_refunded=inp.amount)

    @activity.defn(name=Act.LOOKUP_PSP_PAYMENT)
    async def lookup_psp_payment(self, inp: LookupInput) -> PSPResult | None:
        self.calls.append((Act.LOOKUP_PSP_PAYMENT, inp))
        now = activity.info().current_attempt_scheduled_time
        if self.lookup_down_for and self.down_since and now < self.down_since + self.lookup_down_for:
            raise ApplicationError("PSP answered 503", type="PSPUnavailable")
        return self.psp

    # -- ledger / notifications

    @activity.defn(name=Act.POST_CAPTURE)
    async def post_capture(self, inp: PostCaptureInput) -> PostCaptureResult:
        self.calls.append((Act.POST_CAPTURE, inp))
        if self.ledger_fails:
            raise ApplicationError("entries do not balance", type="LedgerPostingFailed")
        fee = inp.amount * 29 // 1000 + 30
        return PostCaptureResult(
            transaction_key=f"payment:{inp.payment_id}:capture", fee=fee, net=inp.amount - fee
        )

    @activity.defn(name=Act.SEND_RECEIPT)
    async def send_receipt(self, inp: ReceiptInput) -> None:
        self.calls.append((Act.SEND_RECEIPT, inp))
        if self.receipt_gate is not None:
            await self.receipt_gate.wait()
        if self.receipt_fails:
            raise ApplicationError("SMTP relay down", type="SMTPError")

    def activities(self) -> list[Callable[..., Any]]:
        return [
            self.create_payment,
            self.update_payment,
            self.reserve_stock,
            self.release_stock,
            self.confirm_order,
            self.check_fraud,
            self.authorize_payment,
            self.authenticate_payment,
            self.capture_payment,
            self.void_payment,
            self.refund_payment,
            self.lookup_psp_payment,
            self.post_capture,
            self.send_receipt,
        ]


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture
def fake() -> FakeServices:
    return FakeServices()


@pytest.fixture
async def task_queue(env: WorkflowEnvironment, fake: FakeServices) -> AsyncIterator[str]:
    queue = f"checkout-test-{uuid.uuid4()}"
    async with Worker(
        env.client, task_queue=queue, workflows=[CheckoutWorkflow], activities=fake.activities()
    ):
        yield queue


@pytest.fixture
def client(env: WorkflowEnvironment) -> Client:
    return env.client


def checkout_input(**changes: Any) -> CheckoutInput:
    inp = CheckoutInput(
        payment_id=f"pay_{uuid.uuid4().hex[:16]}",
        merchant_id="mer_1",
        customer_id="cus_1",
        payment_method_id="pm_1",
        psp="sandbox",
        psp_token="tok_visa",
        amount=AMOUNT,
        currency="usd",
    )
    return replace(inp, **changes)


def cart_input(**changes: Any) -> CheckoutInput:
    return checkout_input(order_id=f"ord_{uuid.uuid4().hex[:8]}", items=[CartLine("sku-1", 2)], **changes)


def start_kwargs(inp: CheckoutInput, task_queue: str) -> dict[str, Any]:
    """What the API passes at start: business-derived id, search attributes, USE_EXISTING."""
    return {
        "id": checkout_workflow_id(inp.payment_id),
        "task_queue": task_queue,
        "id_conflict_policy": WorkflowIDConflictPolicy.USE_EXISTING,
        "search_attributes": TypedSearchAttributes(
            [
                SearchAttributePair(SA_PAYMENT_STATUS, "processing"),
                SearchAttributePair(SA_MERCHANT_ID, inp.merchant_id),
                SearchAttributePair(SA_AMOUNT_MINOR, inp.amount),
                SearchAttributePair(SA_CURRENCY, inp.currency),
            ]
        ),
        # a stuck test ends at this (skipped) time instead of hanging
        "execution_timeout": timedelta(days=30),
    }


async def start(client: Client, inp: CheckoutInput, task_queue: str) -> WorkflowHandle[Any, CheckoutResult]:
    return await client.start_workflow(CheckoutWorkflow.run, inp, **start_kwargs(inp, task_queue))


async def update(handle: WorkflowHandle[Any, Any], name: str, arg: Any = None) -> PaymentState:
    """Call an update by name, as the API does (arg None = the no-argument wait_for_stable)."""
    args = [] if arg is None else [arg]
    state: PaymentState = await handle.execute_update(name, args=args, result_type=PaymentState)
    return state


async def stable(handle: WorkflowHandle[Any, Any]) -> PaymentState:
    return await update(handle, Upd.WAIT_FOR_STABLE)


async def rejected(handle: WorkflowHandle[Any, Any], name: str, arg: Any) -> ApplicationError:
    with pytest.raises(WorkflowUpdateFailedError) as info:
        await update(handle, name, arg)
    cause = info.value.cause
    assert isinstance(cause, ApplicationError)
    return cause


async def eventually(check: Callable[[], bool], what: str) -> None:
    for _ in range(200):
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def cancel_and_wait_delivered(handle: WorkflowHandle[Any, Any]) -> list[EventType.ValueType]:
    """Cancel the workflow and wait until a workflow task has processed the request; returns the
    history's event types."""
    await handle.cancel()
    for _ in range(200):
        types = [e.event_type async for e in handle.fetch_history_events()]
        requested = types.index(CANCEL_REQUESTED) if CANCEL_REQUESTED in types else len(types)
        if EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED in types[requested:]:
            return types
        await asyncio.sleep(0.05)
    raise AssertionError("cancel request not processed")


CANCEL_REQUESTED = EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED


async def assert_replays(handle: WorkflowHandle[Any, Any]) -> None:
    """The recorded history replays without nondeterminism (shielded tasks, timers, updates)."""
    replayer = Replayer(workflows=[CheckoutWorkflow], data_converter=pydantic_data_converter)
    await replayer.replay_workflow(await handle.fetch_history())


# ---------------------------------------------------------------- happy paths


async def test_automatic_capture(client: Client, task_queue: str, fake: FakeServices) -> None:
    inp = cart_input()
    handle = await start(client, inp, task_queue)
    result = await handle.result()

    assert result == CheckoutResult(payment_id=inp.payment_id, status="succeeded", amount_received=AMOUNT)
    assert fake.count(Act.CREATE_PAYMENT) == 1
    assert fake.inputs(Act.CREATE_PAYMENT)[0].workflow_id == checkout_workflow_id(inp.payment_id)
    assert fake.count(Act.RESERVE_STOCK) == 1
    assert fake.count(Act.AUTHORIZE_PAYMENT) == 1
    assert fake.count(Act.CAPTURE_PAYMENT) == 1
    assert fake.inputs(Act.CAPTURE_PAYMENT)[0].amount == AMOUNT
    assert fake.count(Act.POST_CAPTURE) == 1
    assert fake.inputs(Act.POST_CAPTURE)[0].amount == AMOUNT
    assert fake.count(Act.SEND_RECEIPT) == 1
    assert [c.confirmed for c in fake.inputs(Act.CONFIRM_ORDER)] == [True]
    for undo in (Act.RELEASE_STOCK, Act.VOID_PAYMENT, Act.REFUND_PAYMENT, Act.LOOKUP_PSP_PAYMENT):
        assert fake.count(undo) == 0, undo
    # processing was written by create_payment, succeeded by post_capture: no status write of our own
    assert fake.statuses() == []
    assert await handle.query(CheckoutWorkflow.state) == PaymentState(
        payment_id=inp.payment_id, status="succeeded", amount_received=AMOUNT, psp_payment_id="psp_1"
    )
    attrs = (await handle.describe()).typed_search_attributes
    assert attrs.get(SA_PAYMENT_STATUS) == "succeeded"
    assert attrs.get(SA_MERCHANT_ID) == "mer_1"
    assert attrs.get(SA_AMOUNT_MINOR) == AMOUNT
    assert attrs.get(SA_CURRENCY) == "usd"


async def test_manual_capture(client: Client, task_queue: str, fake: FakeServices) -> None:
    handle = await start(client, checkout_input(capture_method="manual"), task_queue)

    state = await stable(handle)
    assert (state.status, state.amount_capturable) == ("requires_capture", AMOUNT)
    assert fake.count(Act.CAPTURE_PAYMENT) == 0

    state = await update(handle, Upd.CAPTURE, CaptureRequest())
    assert (state.status, state.amount_received, state.amount_capturable) == ("succeeded", AMOUNT, 0)
    assert (await handle.result()).status == "succeeded"
    assert [c.amount for c in fake.inputs(Act.CAPTURE_PAYMENT)] == [AMOUNT]
    assert fake.statuses() == ["requires_capture"]
    assert fake.inputs(Act.UPDATE_PAYMENT)[0].amount_capturable == AMOUNT


async def test_manual_partial_capture(client: Client, task_queue: str, fake: FakeServices) -> None:
    handle = await start(client, checkout_input(capture_method="manual"), task_queue)
    await stable(handle)

    state = await update(handle, Upd.CAPTURE, CaptureRequest(amount=6_000))
    assert (state.status, state.amount_received) == ("succeeded", 6_000)
    assert [c.amount for c in fake.inputs(Act.CAPTURE_PAYMENT)] == [6_000]
    assert [p.amount for p in fake.inputs(Act.POST_CAPTURE)] == [6_000]
    assert (await handle.result()).amount_received == 6_000


async def test_capture_window_expires(client: Client, task_queue: str, fake: FakeServices) -> None:
    handle = await start(client, checkout_input(capture_method="manual"), task_queue)
    assert (await stable(handle)).status == "requires_capture"

    result = await handle.result()  # the test server skips the 7 days

    assert result.status == "canceled"
    assert fake.count(Act.CAPTURE_PAYMENT) == 0
    assert [v.psp_payment_id for v in fake.inputs(Act.VOID_PAYMENT)] == ["psp_1"]
    last = fake.inputs(Act.UPDATE_PAYMENT)[-1]
    assert (last.status, last.reason) == ("canceled", "capture window expired")


async def test_cancel_update_in_requires_capture(client: Client, task_queue: str, fake: FakeServices) -> None:
    handle = await start(client, cart_input(capture_method="manual"), task_queue)
    await stable(handle)

    state = await update(handle, Upd.CANCEL, CancelRequest(reason="abandoned"))

    assert state.status == "canceled"
    assert (await handle.result()).status == "canceled"
    assert fake.count(Act.VOID_PAYMENT) == 1
    assert fake.count(Act.RELEASE_STOCK) == 1
    assert [c.confirmed for c in fake.inputs(Act.CONFIRM_ORDER)] == [False]
    assert fake.inputs(Act.UPDATE_PAYMENT)[-1].reason == "abandoned"


# ---------------------------------------------------------------- declines and authentication


async def test_decline_releases_stock(client: Client, task_queue: str, fake: FakeServices) -> None:
    fake.authorize_status, fake.decline_code = "failed", "insufficient_funds"
    inp = cart_input()

    result = await (await start(client, inp, task_queue)).result()

    assert (result.status, result.failure_code, result.decline_code) == (
        "failed",
        "card_declined",
        "insufficient_funds",
    )
    assert [s.order_id for s in fake.inputs(Act.RELEASE_STOCK)] == [inp.order_id]
    assert [c.confirmed for c in fake.inputs(Act.CONFIRM_ORDER)] == [False]
    assert fake.count(Act.VOID_PAYMENT) == 0  # nothing is held for a declined authorization
    assert fake.count(Act.CAPTURE_PAYMENT) == 0
    update = fake.inputs(Act.UPDATE_PAYMENT)[-1]
    assert (update.status, update.failure_code, update.decline_code) == (
        "failed",
        "card_declined",
        "insufficient_funds",
    )


async def test_otp_right(client: Client, task_queue: str, fake: FakeServices) -> None:
    fake.authorize_status = "requires_action"
    handle = await start(client, checkout_input(), task_queue)

    state = await stable(handle)
    assert state.status == "requires_action"
    assert state.next_action == NextAction(type="otp")

    state = await update(handle, Upd.AUTHENTICATE, AuthenticateRequest(otp=GOOD_OTP))
    assert state.status == "succeeded"
    assert state.next_action is None
    assert [a.otp for a in fake.inputs(Act.AUTHENTICATE_PAYMENT)] == [GOOD_OTP]
    assert fake.count(Act.CAPTURE_PAYMENT) == 1
    assert (await handle.result()).status == "succeeded"
    assert fake.statuses() == ["requires_action"]
    await assert_replays(handle)


async def test_parked_runs_evicted_from_the_cache_finish_after_replay(
    env: WorkflowEnvironment, fake: FakeServices
) -> None:
    """The worker bounds its cache (worker_max_cached_workflows): payments parked in OTP beyond it
    are evicted, and the OTP that comes later replays them from history and completes them."""
    fake.authorize_status = "requires_action"
    queue = f"checkout-cache-{uuid.uuid4()}"
    async with Worker(
        env.client,
        task_queue=queue,
        workflows=[CheckoutWorkflow],
        activities=fake.activities(),
        max_cached_workflows=2,
        max_concurrent_workflow_tasks=2,
    ):
        handles = [await start(env.client, checkout_input(), queue) for _ in range(5)]
        for handle in handles:
            assert (await stable(handle)).status == "requires_action"
        for handle in handles:  # at most 2 still cached: the first 3 are replayed here
            state = await update(handle, Upd.AUTHENTICATE, AuthenticateRequest(otp=GOOD_OTP))
            assert state.status == "succeeded"
        assert [(await h.result()).status for h in handles] == ["succeeded"] * 5
    assert fake.count(Act.CAPTURE_PAYMENT) == 5


async def test_otp_wrong(client: Client, task_queue: str, fake: FakeServices) -> None:
    fake.authorize_status = "requires_action"
    handle = await start(client, checkout_input(), task_queue)
    await stable(handle)

    state = await update(handle, Upd.AUTHENTICATE, AuthenticateRequest(otp="000000"))

    assert (state.status, state.failure_code, state.decline_code) == (
        "failed",
        "card_declined",
        "authentication_failed",
    )
    assert fake.count(Act.CAPTURE_PAYMENT) == 0
    assert fake.count(Act.POST_CAPTURE) == 0
    assert fake.count(Act.VOID_PAYMENT) == 0  # the PSP failed the payment: no hold to release
    assert (await handle.result()).decline_code == "authentication_failed"


async def test_otp_timeout(client: Client, task_queue: str, fake: FakeServices) -> None:
    fake.authorize_status = "requires_action"
    handle = await start(client, checkout_input(), task_queue)
    await stable(handle)

    result = await handle.result()  # skips the 10 minutes

    assert result.status == "canceled"
    assert fake.count(Act.AUTHENTICATE_PAYMENT) == 0
    assert fake.count(Act.VOID_PAYMENT) == 1
    last = fake.inputs(Act.UPDATE_PAYMENT)[-1]
    assert (last.status, last.reason) == ("canceled", "authentication timed out")
    assert (await handle.query(CheckoutWorkflow.state)).message == "authentication timed out"


# ---------------------------------------------------------------- fraud review


async def test_review_approve(client: Client, task_queue: str, fake: FakeServices) -> None:
    fake.fraud, fake.fraud_reasons = "review", ["velocity", "new_device"]
    handle = await start(client, checkout_input(), task_queue)

    state = await stable(handle)
    assert (state.status, state.review_pending) == ("processing", True)
    assert fake.count(Act.AUTHORIZE_PAYMENT) == 0
    note = fake.inputs(Act.UPDATE_PAYMENT)[0]
    assert (note.status, note.reason) == ("processing", "manual review: velocity, new_device")

    state = await update(handle, Upd.REVIEW, ReviewRequest(decision="approve", operator_id="op_1"))
    assert (state.status, state.review_pending) == ("succeeded", False)
    assert fake.count(Act.AUTHORIZE_PAYMENT) == 1
    assert (await handle.result()).status == "succeeded"
    await assert_replays(handle)


async def test_review_reject(client: Client, task_queue: str, fake: FakeServices) -> None:
    fake.fraud = "review"
    handle = await start(client, cart_input(), task_queue)
    await stable(handle)

    state = await update(handle, Upd.REVIEW, ReviewRequest(decision="reject", operator_id="op_1"))

    assert (state.status, state.failure_code, state.decline_code) == ("failed", "card_declined", "fraudulent")
    assert "rejected" in (state.message or "")
    assert fake.count(Act.AUTHORIZE_PAYMENT) == 0
    assert fake.count(Act.RELEASE_STOCK) == 1
    assert (await handle.result()).status == "failed"


async def test_review_timeout(client: Client, task_queue: str, fake: FakeServices) -> None:
    fake.fraud = "review"
    handle = await start(client, checkout_input(), task_queue)
    await stable(handle)

    result = await handle.result()  # skips the 24 h

    assert (result.status, result.failure_code, result.decline_code) == (
        "failed",
        "card_declined",
        "fraudulent",
    )
    assert "not completed in time" in (fake.inputs(Act.UPDATE_PAYMENT)[-1].failure_message or "")
    assert fake.count(Act.AUTHORIZE_PAYMENT) == 0


async def test_fraud_decline(client: Client, task_queue: str, fake: FakeServices) -> None:
    fake.fraud = "decline"
    result = await (await start(client, checkout_input(), task_queue)).result()
    assert (result.status, result.decline_code) == ("failed", "fraudulent")
    assert fake.count(Act.AUTHORIZE_PAYMENT) == 0


# ---------------------------------------------------------------- PSP and ledger trouble


async def test_transient_psp_errors_are_retried(client: Client, task_queue: str, fake: FakeServices) -> None:
    fake.authorize_transient_failures = 2

    result = await (await start(client, checkout_input(), task_queue)).result()

    assert result.status == "succeeded"
    # three attempts, one authorization at the PSP, all with the same input (the activity derives
    # its idempotency key from the payment id)
    attempts = fake.inputs(Act.AUTHORIZE_PAYMENT)
    assert len(attempts) == 3 and len(set(map(repr, attempts))) == 1
    assert fake.count(Act.CAPTURE_PAYMENT) == 1
    assert fake.count(Act.VOID_PAYMENT) == 0


# PSP unreachable for longer than the workflow investigates a lost answer (AMBIGUITY_TIMEOUT).
DOWN_LONG = options.AMBIGUITY_TIMEOUT + timedelta(minutes=5)


async def test_psp_down_for_good(client: Client, task_queue: str, fake: FakeServices) -> None:
    fake.psp_down = True  # the first attempt authorized at the PSP but its answer was lost
    fake.lookup_down_for = DOWN_LONG  # and look-ups fail until after the investigation gave up

    result = await (await start(client, checkout_input(), task_queue)).result()

    assert (result.status, result.failure_code) == ("failed", "psp_unavailable")
    assert fake.count(Act.AUTHORIZE_PAYMENT) == 8  # PSP preset maximum_attempts
    # polled during the investigation, then the undo looked again until the PSP answered...
    assert fake.count(Act.LOOKUP_PSP_PAYMENT) > 10
    # ...found the lost authorization and voided it
    assert [v.psp_payment_id for v in fake.inputs(Act.VOID_PAYMENT)] == ["psp_1"]
    assert fake.count(Act.CAPTURE_PAYMENT) == 0
    assert [r.kind for r in fake.inputs(Act.SEND_RECEIPT)] == ["payment_failed"]


async def test_psp_down_nothing_held(client: Client, task_queue: str, fake: FakeServices) -> None:
    fake.psp_down, fake.psp_down_charges = True, False
    result = await (await start(client, checkout_input(), task_queue)).result()
    assert result.failure_code == "psp_unavailable"
    # polls at +5 s, +15 s, +35 s after the failure: "no payment" counts only after AMBIGUITY_SETTLE
    # (30 s), then the void undo looks once more before doing nothing
    assert fake.count(Act.LOOKUP_PSP_PAYMENT) == 4
    assert fake.count(Act.VOID_PAYMENT) == 0  # the lookup found nothing to void
    assert "nothing was charged" in (fake.inputs(Act.UPDATE_PAYMENT)[-1].failure_message or "")
    assert [r.kind for r in fake.inputs(Act.SEND_RECEIPT)] == ["payment_failed"]


async def test_failing_undo_does_not_stop_the_others(
    client: Client, task_queue: str, fake: FakeServices
) -> None:
    fake.psp_down, fake.void_fails, fake.lookup_down_for = True, True, DOWN_LONG
    inp = cart_input()

    result = await (await start(client, inp, task_queue)).result()

    assert result.failure_code == "psp_unavailable"
    assert fake.count(Act.VOID_PAYMENT) == 1
    assert fake.count(Act.RELEASE_STOCK) == 1  # registered earlier, compensated after the failed void
    assert fake.order(Act.VOID_PAYMENT, Act.RELEASE_STOCK) == [Act.VOID_PAYMENT, Act.RELEASE_STOCK]
    assert [c.confirmed for c in fake.inputs(Act.CONFIRM_ORDER)] == [False]


async def test_lost_capture_answer_is_looked_up(client: Client, task_queue: str, fake: FakeServices) -> None:
    fake.capture_down = True  # captures at the PSP, then never answers
    inp = checkout_input()

    result = await (await start(client, inp, task_queue)).result()

    # the PSP said captured: the payment goes on, posted once, nothing undone
    assert (result.status, result.amount_received) == ("succeeded", AMOUNT)
    assert fake.count(Act.CAPTURE_PAYMENT) == 8
    assert fake.count(Act.LOOKUP_PSP_PAYMENT) == 1
    assert [p.amount for p in fake.inputs(Act.POST_CAPTURE)] == [AMOUNT]
    assert fake.count(Act.VOID_PAYMENT) == 0
    assert fake.count(Act.REFUND_PAYMENT) == 0


async def test_lost_capture_answer_psp_unreachable_is_refunded(
    client: Client, task_queue: str, fake: FakeServices
) -> None:
    fake.capture_down, fake.lookup_down_for = True, DOWN_LONG
    inp = checkout_input()

    result = await (await start(client, inp, task_queue)).result()

    assert (result.status, result.failure_code) == ("failed", "psp_unavailable")
    assert fake.count(Act.CAPTURE_PAYMENT) == 8
    assert fake.count(Act.POST_CAPTURE) == 0
    # the void undo looked the payment up once the PSP answered, found it captured and refunded
    assert fake.count(Act.VOID_PAYMENT) == 0
    [refund] = fake.inputs(Act.REFUND_PAYMENT)
    assert (refund.amount, refund.idempotency_key) == (AMOUNT, f"{inp.payment_id}:compensate_refund")


async def test_ledger_failure_refunds(client: Client, task_queue: str, fake: FakeServices) -> None:
    fake.ledger_fails = True
    inp = cart_input()

    handle = await start(client, inp, task_queue)
    result = await handle.result()

    assert (result.status, result.failure_code, result.amount_received) == ("failed", "ledger_error", 0)
    assert fake.count(Act.POST_CAPTURE) == 1  # LedgerPostingFailed is non-retryable in the DB preset
    [refund] = fake.inputs(Act.REFUND_PAYMENT)
    assert (refund.amount, refund.idempotency_key, refund.psp_payment_id) == (
        AMOUNT,
        f"{inp.payment_id}:compensate_refund",
        "psp_1",
    )
    assert fake.count(Act.VOID_PAYMENT) == 0  # replaced by the refund once captured
    assert fake.count(Act.RELEASE_STOCK) == 1
    assert [c.confirmed for c in fake.inputs(Act.CONFIRM_ORDER)] == [False]
    assert fake.count(Act.SEND_RECEIPT) == 0
    # undone newest first; the order is canceled before the final status is published, so a
    # caller woken by the status already sees the canceled order
    assert fake.order(Act.REFUND_PAYMENT, Act.RELEASE_STOCK, Act.UPDATE_PAYMENT, Act.CONFIRM_ORDER) == [
        Act.REFUND_PAYMENT,
        Act.RELEASE_STOCK,
        Act.CONFIRM_ORDER,
        Act.UPDATE_PAYMENT,
    ]
    assert fake.statuses() == ["failed"]
    await assert_replays(handle)


async def test_receipt_failure_does_not_fail_payment(
    client: Client, task_queue: str, fake: FakeServices
) -> None:
    fake.receipt_fails = True
    result = await (await start(client, checkout_input(), task_queue)).result()
    assert result.status == "succeeded"
    assert fake.count(Act.SEND_RECEIPT) == 5  # NOTIFY preset maximum_attempts
    assert fake.count(Act.REFUND_PAYMENT) == 0


async def test_out_of_stock(client: Client, task_queue: str, fake: FakeServices) -> None:
    fake.out_of_stock = True

    result = await (await start(client, cart_input(), task_queue)).result()

    assert (result.status, result.failure_code) == ("failed", "out_of_stock")
    assert fake.count(Act.RESERVE_STOCK) == 1  # OutOfStock is non-retryable
    psp_calls = [
        n for n, _ in fake.calls if n in (Act.AUTHORIZE_PAYMENT, Act.LOOKUP_PSP_PAYMENT, Act.VOID_PAYMENT)
    ]
    assert psp_calls == []
    assert fake.count(Act.CHECK_FRAUD) == 0
    assert fake.count(Act.RELEASE_STOCK) == 1  # registered before the reserve; idempotent


# ---------------------------------------------------------------- starting


async def test_duplicate_start_uses_existing(client: Client, task_queue: str, fake: FakeServices) -> None:
    fake.authorize_status = "requires_action"
    inp = checkout_input()
    first = await start(client, inp, task_queue)
    second = await start(client, inp, task_queue)

    assert second.first_execution_run_id == first.first_execution_run_id
    assert (await stable(second)).status == "requires_action"
    await update(first, Upd.AUTHENTICATE, AuthenticateRequest(otp=GOOD_OTP))
    assert (await second.result()).status == "succeeded"
    assert fake.count(Act.CREATE_PAYMENT) == 1
    assert fake.count(Act.AUTHORIZE_PAYMENT) == 1


async def test_update_with_start_early_return(client: Client, task_queue: str, fake: FakeServices) -> None:
    fake.authorize_status = "requires_action"
    inp = checkout_input()

    async def post_payment() -> PaymentState:
        op = WithStartWorkflowOperation(CheckoutWorkflow.run, inp, **start_kwargs(inp, task_queue))
        state: PaymentState = await client.execute_update_with_start_workflow(
            Upd.WAIT_FOR_STABLE, start_workflow_operation=op, result_type=PaymentState
        )
        assert (await op.workflow_handle()).id == checkout_workflow_id(inp.payment_id)
        return state

    state = await post_payment()
    assert (state.status, state.next_action) == ("requires_action", NextAction(type="otp"))
    assert state.psp_payment_id == "psp_1"
    # the client retries the POST: same workflow, same answer, no second payment
    again = await post_payment()
    assert again == state
    assert fake.count(Act.CREATE_PAYMENT) == 1
    assert fake.count(Act.AUTHORIZE_PAYMENT) == 1

    handle = client.get_workflow_handle_for(CheckoutWorkflow.run, checkout_workflow_id(inp.payment_id))
    await update(handle, Upd.CANCEL, CancelRequest())
    assert (await handle.result()).status == "canceled"

    # ---------------------------------------------------------------- invalid updates
    await assert_replays(handle)


async def test_invalid_updates_are_rejected(client: Client, task_queue: str, fake: FakeServices) -> None:
    fake.authorize_status = "requires_action"
    handle = await start(client, checkout_input(capture_method="manual"), task_queue)
    assert (await stable(handle)).status == "requires_action"

    err = await rejected(handle, Upd.CAPTURE, CaptureRequest())
    assert err.type == "InvalidState"
    err = await rejected(handle, Upd.REVIEW, ReviewRequest(decision="approve", operator_id="op_1"))
    assert err.type == "InvalidState"
    err = await rejected(handle, Upd.AUTHENTICATE, AuthenticateRequest(otp=" "))
    assert err.type == "InvalidRequest"

    state = await update(handle, Upd.AUTHENTICATE, AuthenticateRequest(otp=GOOD_OTP))
    assert state.status == "requires_capture"

    err = await rejected(handle, Upd.AUTHENTICATE, AuthenticateRequest(otp=GOOD_OTP))
    assert err.type == "InvalidState"
    for amount in (AMOUNT + 1, 0, -5):
        err = await rejected(handle, Upd.CAPTURE, CaptureRequest(amount=amount))
        assert err.type == "InvalidRequest"
    # rejected updates left no trace: the capture still works
    assert fake.count(Act.CAPTURE_PAYMENT) == 0
    state = await update(handle, Upd.CAPTURE, CaptureRequest(amount=AMOUNT))
    assert state.status == "succeeded"
    assert (await handle.result()).status == "succeeded"


async def test_no_cancel_or_capture_after_success(
    client: Client, task_queue: str, fake: FakeServices
) -> None:
    fake.receipt_gate = asyncio.Event()  # keeps the workflow running after it succeeded
    handle = await start(client, checkout_input(), task_queue)
    assert (await stable(handle)).status == "succeeded"

    err = await rejected(handle, Upd.CANCEL, CancelRequest())
    assert err.type == "InvalidState"
    err = await rejected(handle, Upd.CAPTURE, CaptureRequest())
    assert err.type == "InvalidState"

    fake.receipt_gate.set()
    assert (await handle.result()).status == "succeeded"
    assert fake.count(Act.VOID_PAYMENT) == 0
    assert fake.count(Act.REFUND_PAYMENT) == 0


# ---------------------------------------------------------------- workflow cancellation


async def test_workflow_cancellation_voids(client: Client, task_queue: str, fake: FakeServices) -> None:
    inp = cart_input(capture_method="manual")
    handle = await start(client, inp, task_queue)
    assert (await stable(handle)).status == "requires_capture"

    await handle.cancel()  # an operator cancels the workflow in the UI
    with pytest.raises(WorkflowFailureError) as info:
        await handle.result()

    assert isinstance(info.value.cause, CancelledError)
    assert [v.psp_payment_id for v in fake.inputs(Act.VOID_PAYMENT)] == ["psp_1"]
    assert fake.count(Act.RELEASE_STOCK) == 1
    assert [c.confirmed for c in fake.inputs(Act.CONFIRM_ORDER)] == [False]
    assert fake.count(Act.CAPTURE_PAYMENT) == 0
    last = fake.inputs(Act.UPDATE_PAYMENT)[-1]
    assert (last.status, last.reason) == ("canceled", "workflow canceled by operator")
    assert (await handle.describe()).typed_search_attributes.get(SA_PAYMENT_STATUS) == "canceled"
    await assert_replays(handle)


async def test_cancel_during_authorize_waits_for_the_answer(
    client: Client, task_queue: str, fake: FakeServices
) -> None:
    fake.authorize_gate = asyncio.Event()
    handle = await start(client, checkout_input(), task_queue)
    await eventually(lambda: fake.count(Act.AUTHORIZE_PAYMENT) == 1, "authorize")

    events = await cancel_and_wait_delivered(handle)
    # shielded: the in-flight authorize was not cancelled, so its answer will not be lost
    assert EventType.EVENT_TYPE_ACTIVITY_TASK_CANCEL_REQUESTED not in events
    fake.authorize_gate.set()

    with pytest.raises(WorkflowFailureError) as info:
        await handle.result()
    assert isinstance(info.value.cause, CancelledError)
    assert fake.count(Act.LOOKUP_PSP_PAYMENT) == 0  # the psp id was known, no lookup needed
    assert [v.psp_payment_id for v in fake.inputs(Act.VOID_PAYMENT)] == ["psp_1"]
    assert fake.statuses() == ["canceled"]
    await assert_replays(handle)


async def test_cancel_during_compensation_completes_it(
    client: Client, task_queue: str, fake: FakeServices
) -> None:
    fake.authorize_status, fake.decline_code = "failed", "do_not_honor"
    fake.release_gate = asyncio.Event()
    handle = await start(client, cart_input(), task_queue)
    await eventually(lambda: fake.count(Act.RELEASE_STOCK) == 1, "release_stock")

    events = await cancel_and_wait_delivered(handle)
    assert EventType.EVENT_TYPE_ACTIVITY_TASK_CANCEL_REQUESTED not in events
    fake.release_gate.set()

    with pytest.raises(WorkflowFailureError) as info:
        await handle.result()
    assert isinstance(info.value.cause, CancelledError)
    # the failure was recorded in full before the workflow ended as cancelled
    assert fake.statuses() == ["failed"]
    assert fake.inputs(Act.UPDATE_PAYMENT)[0].decline_code == "do_not_honor"
    assert [c.confirmed for c in fake.inputs(Act.CONFIRM_ORDER)] == [False]
    assert fake.count(Act.RELEASE_STOCK) == 1
    await assert_replays(handle)
