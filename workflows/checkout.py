"""CheckoutWorkflow: one payment (optionally a cart) from creation to a final status, as a saga.

create payment -> reserve stock (undo: release) -> fraud check (decline / manual review) ->
authorize at the PSP (undo: void, after a lookup if the PSP's answer was lost) -> customer
authentication (OTP, or a wallet / bank redirect) -> capture (automatic, or manual within the
capture window) -> ledger posting (undo after capture: refund) -> succeeded, order confirmed, receipt.

What the PSP holds is learnt, not assumed (_watch_psp): a webhook (psp_event signal) or the
customer's return from a redirect page (recheck update) wakes the workflow to look the payment up,
and polls with backoff cover the lost webhook. An authorize or capture that gave up without an
answer is investigated the same way before anything else happens: found -> carry on; the PSP has
nothing -> fail, nothing charged; the PSP unreachable until the deadline -> fail and let the void
undo settle whatever turns up. Deadlines (authentication, capture window, review, investigation)
cancel or void and email the customer.

A decline, a fraud rejection, a timeout or a customer cancel is a business outcome: the workflow
compensates and COMPLETES with a failed/canceled CheckoutResult. Only an operator cancelling the
workflow itself ends it as cancelled (after the same compensation).

Cancellation model: every activity runs to completion (saga.run_shielded), so a workflow
cancellation never leaves a PSP or database call with an unknown outcome; it interrupts only the
waits for the customer, the merchant or the reviewer. The steps that must not be split (capture to
ledger posting to success; compensate to final status) run as one shielded unit.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Literal

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

# passed through the sandbox, helpers included: see workflows/__init__.py
with workflow.unsafe.imports_passed_through():
    from domain.states import STABLE, PaymentStatus
    from workflows import options
    from workflows.contracts import (
        CHECKOUT_WORKFLOW,
        PSP_EVENT_SIGNAL,
        RECHECK_UPDATE,
        SA_AMOUNT_MINOR,
        SA_CURRENCY,
        SA_MERCHANT_ID,
        SA_PAYMENT_STATUS,
        Act,
        AuthenticateInput,
        AuthenticateRequest,
        CancelRequest,
        CaptureInput,
        CaptureRequest,
        CheckoutInput,
        CheckoutResult,
        ConfirmOrderInput,
        CreatePaymentInput,
        FraudCheckInput,
        FraudCheckResult,
        LookupInput,
        NextAction,
        PaymentState,
        PaymentUpdate,
        PostCaptureInput,
        PostCaptureResult,
        PSPEvent,
        PSPResult,
        ReceiptInput,
        RefundInput,
        ReviewRequest,
        StockInput,
        Upd,
        VoidInput,
    )
    from workflows.failover import RoutingHooks, authorize_with_failover
    from workflows.saga import Saga, run_shielded

S = PaymentStatus
# workflow.patched() ids: each marks a change of commands that runs started before it replay around
PATCH_OTP_WAIT_WITHOUT_POLLING = "otp-wait-without-polling"
# Where the checkout saga ends; update handlers that wait for "the outcome" wait for one of these.
FINAL: frozenset[PaymentStatus] = frozenset({S.SUCCEEDED, S.FAILED, S.CANCELED})
# ApplicationError types the validators reject with (the API maps both to 409).
INVALID_STATE = "InvalidState"
INVALID_REQUEST = "InvalidRequest"


class _Stop(Exception):
    """Ends the forward path: the saga compensates and the payment ends in `status`."""

    def __init__(
        self,
        status: PaymentStatus,
        *,
        reason: str,
        failure_code: str | None = None,
        decline_code: str | None = None,
        message: str | None = None,
        notify: bool = False,
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.failure_code = failure_code
        self.decline_code = decline_code
        self.message = message
        # a deadline ended the payment while nobody was waiting on it: tell the customer by email
        self.notify = notify


def _cause(err: ActivityError) -> tuple[str | None, str]:
    """(ApplicationError type, message) of the failure behind an ActivityError."""
    cause = err.cause
    if isinstance(cause, ApplicationError):
        return cause.type, cause.message
    return None, str(cause or err)


@workflow.defn(name=CHECKOUT_WORKFLOW)
class CheckoutWorkflow:
    @workflow.init
    def __init__(self, inp: CheckoutInput) -> None:
        # Built from the input before any handler runs: Update-with-Start delivers the first update
        # in the same activation as the start.
        self._inp = inp
        self._state = PaymentState(payment_id=inp.payment_id, status=S.PROCESSING.value)
        self._saga = Saga()
        # Which update the saga is waiting for right now ("review" | "action" | "capture"); the
        # validators accept an update only while its wait is open.
        self._waiting_for: str | None = None
        self._otp: str | None = None
        self._capture: CaptureRequest | None = None
        self._cancel: CancelRequest | None = None
        self._review: ReviewRequest | None = None
        self._psp_status: str | None = None  # the PSP's last answer about this payment
        self._psp_uncertain = False  # a PSP call's outcome is unknown: look the payment up before undoing
        self._routed_psp: str | None = None  # the PSP routing chose (workflows/failover.py)
        self._psp_event: PSPEvent | None = None  # the newest PSP webhook about this payment
        self._events_seen: set[str] = set()  # webhook event ids already counted (redeliveries)
        # What wakes a loop waiting for the PSP (_watch_psp) to look the payment up before its
        # next poll: a new webhook, a return-URL nudge (recheck update).
        self._wake = 0
        self._wake_seen = 0
        self._nudges = 0
        self._nudges_seen = 0
        self._lookups = 0  # look-ups done by _watch_psp, answered or not
        self._idle = False  # _watch_psp is blocked between look-ups
        self._authorized = 0
        self._captured = 0

    # ---------------------------------------------------------------- run

    @workflow.run
    async def run(self, inp: CheckoutInput) -> CheckoutResult:
        try:
            await self._checkout()
        except asyncio.CancelledError:
            # The workflow itself was cancelled (operator): undo and mark canceled, unless the
            # payment already reached its final status, then end as cancelled.
            if self._state.status not in FINAL:
                await run_shielded(self._finish(_Stop(S.CANCELED, reason="workflow canceled by operator")))
            await workflow.wait_condition(workflow.all_handlers_finished)
            raise
        await workflow.wait_condition(workflow.all_handlers_finished)
        st = self._state
        return CheckoutResult(
            payment_id=st.payment_id,
            status=st.status,
            failure_code=st.failure_code,
            decline_code=st.decline_code,
            amount_received=st.amount_received,
        )

    async def _checkout(self) -> None:
        inp = self._inp
        if inp.items and not inp.order_id:
            raise ApplicationError(
                "a cart checkout needs an order_id", type=INVALID_REQUEST, non_retryable=True
            )
        workflow.upsert_search_attributes(
            [
                SA_MERCHANT_ID.value_set(inp.merchant_id),
                SA_AMOUNT_MINOR.value_set(inp.amount),
                SA_CURRENCY.value_set(inp.currency),
                SA_PAYMENT_STATUS.value_set(self._state.status),
            ]
        )
        await self._act(
            Act.CREATE_PAYMENT,
            CreatePaymentInput(
                payment_id=inp.payment_id,
                merchant_id=inp.merchant_id,
                customer_id=inp.customer_id,
                payment_method_id=inp.payment_method_id,
                psp=inp.psp,
                amount=inp.amount,
                currency=inp.currency,
                capture_method=inp.capture_method,
                workflow_id=workflow.info().workflow_id,
                description=inp.description,
                metadata=inp.metadata,
                order_id=inp.order_id,
                idempotency_key=inp.idempotency_key,
            ),
            options.DB,
        )
        try:
            await self._forward()
        except _Stop as stop:
            await run_shielded(self._finish(stop))
        except ActivityError as err:
            # A non-retryable failure with no specific meaning (the DB preset retries everything
            # else): still undo what was done and end the payment, rather than leave a hold behind.
            err_type, msg = _cause(err)
            workflow.logger.error("checkout step failed (%s): %s", err_type, msg)
            internal = _Stop(
                S.FAILED, reason=f"internal error: {err_type}", failure_code="processing_error", message=msg
            )
            await run_shielded(self._finish(internal))

    async def _forward(self) -> None:
        inp = self._inp
        if inp.items:
            assert inp.order_id is not None  # checked in _checkout
            stock = StockInput(order_id=inp.order_id, items=inp.items)

            async def release_stock() -> None:
                await self._act(Act.RELEASE_STOCK, stock, options.COMPENSATION)

            self._saga.add(release_stock, "release_stock")
            try:
                await self._act(Act.RESERVE_STOCK, stock, options.DB)
            except ActivityError as err:
                err_type, msg = _cause(err)
                if err_type == "OutOfStock":
                    raise _Stop(
                        S.FAILED, reason="out of stock", failure_code="out_of_stock", message=msg
                    ) from err
                raise

        fraud: FraudCheckResult = await self._act(
            Act.CHECK_FRAUD,
            FraudCheckInput(
                payment_id=inp.payment_id,
                merchant_id=inp.merchant_id,
                customer_id=inp.customer_id,
                payment_method_id=inp.payment_method_id,
                amount=inp.amount,
                currency=inp.currency,
                shipping_country=inp.shipping_country,
            ),
            options.DB,
            FraudCheckResult,
        )
        if fraud.decision == "decline":
            raise _Stop(
                S.FAILED,
                reason=f"fraud screening declined: {', '.join(fraud.reasons) or 'no reason given'}",
                failure_code="card_declined",
                decline_code="fraudulent",
                message="The payment was declined by fraud screening.",
            )
        if fraud.decision == "review":
            await self._manual_review(fraud.reasons)

        await self._authorize()
        amount = self._authorized
        if inp.capture_method == "manual":
            await self._set_status(S.REQUIRES_CAPTURE, reason="authorized", amount_capturable=amount)
            arrived = await self._wait_for(
                "capture", lambda: self._capture is not None, options.CAPTURE_WINDOW, "capture_window"
            )
            self._raise_if_canceled()
            if not arrived:
                raise _Stop(S.CANCELED, reason="capture window expired", notify=True)
            assert self._capture is not None
            amount = self._capture.amount or amount
        # Capture, ledger posting and the success steps run as one unit: a workflow cancellation
        # arriving meanwhile is seen only after it (never between a capture and its posting).
        await run_shielded(self._capture_and_settle(amount))

    # ---------------------------------------------------------------- steps

    async def _manual_review(self, reasons: list[str]) -> None:
        await self._note(f"manual review: {', '.join(reasons) or 'no reason given'}")
        self._state.review_pending = True
        arrived = await self._wait_for(
            "review", lambda: self._review is not None, options.REVIEW_TIMEOUT, "review_timeout"
        )
        self._raise_if_canceled()
        if not arrived:
            raise _Stop(
                S.FAILED,
                reason="manual review timed out",
                failure_code="card_declined",
                decline_code="fraudulent",
                message="Manual review was not completed in time.",
                notify=True,
            )
        review = self._review
        assert review is not None
        if review.decision == "reject":
            raise _Stop(
                S.FAILED,
                reason=f"manual review: rejected by {review.operator_id}",
                failure_code="card_declined",
                decline_code="fraudulent",
                message="The payment was rejected in manual review.",
            )
        await self._note(f"manual review: approved by {review.operator_id}")
        self._state.review_pending = False

    async def _authorize(self) -> None:
        inp = self._inp
        # Registered first: if the authorize answer is lost, the undo looks the payment up and voids it.
        self._saga.add(self._undo_authorization, "void")
        try:
            # Routing (workflows/failover.py): the first PSP of the route that takes the payment; from
            # here on every PSP call goes to the one it chose (self._psp_name).
            auth = await authorize_with_failover(
                inp,
                RoutingHooks(
                    authorize=lambda arg, preset: self._psp_call(Act.AUTHORIZE_PAYMENT, arg, preset),
                    use_psp=self._use_psp,
                    note=self._route_note,
                ),
            )
        except ActivityError as err:
            auth = await self._authorize_outcome(err)
        self._authorized = auth.amount

        if auth.status == "requires_action":
            auth = await self._authenticate(auth.next_action)
        if auth.status == "failed":
            raise _Stop(
                S.FAILED,
                reason="declined by the card issuer",
                failure_code="card_declined",
                decline_code=auth.decline_code or "generic_decline",
                message=auth.message,
            )
        if auth.status != "authorized":
            raise _Stop(
                S.FAILED,
                reason=f"unexpected PSP status after authorize: {auth.status}",
                failure_code="processing_error",
                message=auth.message,
            )

    async def _authorize_outcome(self, err: ActivityError) -> PSPResult:
        """authorize_payment gave up without an answer. A refusal is final; anything else may have
        authorized at the PSP, so ask the PSP (webhooks, polls) before calling the payment failed."""
        err_type, msg = _cause(err)
        if err_type == "PSPRejected":
            raise self._psp_failure(err, "authorize") from err
        workflow.logger.warning("authorize without an answer (%s): looking the payment up", err_type)
        await self._note(f"PSP answer lost during authorize ({err_type}): looking the payment up")
        failed_at = workflow.now()

        def settled(found: PSPResult | None) -> bool:
            # "no payment" is believed only once a request still in flight would have landed
            return found is not None or workflow.now() - failed_at >= options.AMBIGUITY_SETTLE

        outcome, found = await self._watch_psp(
            "resolve", options.AMBIGUITY_TIMEOUT, settled, "authorize_lookup_timeout"
        )
        if outcome == "settled" and found is not None:
            await self._note(f"PSP lookup after the lost answer: {found.status}")
            return found
        if outcome == "settled":
            raise _Stop(
                S.FAILED,
                reason="the PSP has no payment after the lost authorize answer: nothing charged",
                failure_code="psp_unavailable",
                message="The payment processor could not be reached; nothing was charged.",
                notify=True,  # decided long after POST /v1/payments answered "processing"
            ) from err
        raise _Stop(
            S.FAILED,
            reason="PSP unreachable: the authorize outcome is unknown",
            failure_code="psp_unavailable",
            message="The payment processor could not be reached.",
            notify=True,
        ) from err

    async def _authenticate(self, next_action: NextAction | None) -> PSPResult:
        """requires_action: wait for the customer. An OTP comes by the authenticate Update and is
        confirmed at the PSP here; a redirect (wallet, bank page) is completed at the PSP itself, and
        we learn it by webhook, by the return-URL nudge or by polling. An OTP completed elsewhere
        (the PSP says authorized) counts too."""
        inp = self._inp
        action = next_action or NextAction(type="otp")
        await self._set_status(
            S.REQUIRES_ACTION, reason="customer authentication required", next_action=action
        )
        # An OTP comes to us (the authenticate Update), so there is nothing to poll the PSP for:
        # a webhook still wakes the wait if the payment is completed elsewhere. Polling every
        # parked OTP payment was most of the load with 2,000 of them waiting. A redirect is
        # completed at the PSP, and polling covers a lost webhook.
        poll = action.type != "otp" or not workflow.patched(PATCH_OTP_WAIT_WITHOUT_POLLING)
        outcome, found = await self._watch_psp(
            "action",
            options.ACTION_TIMEOUT,
            lambda r: r is not None and r.status != "requires_action",
            "authentication_timeout",
            ready=lambda: self._otp is not None,
            poll=poll,
        )
        self._raise_if_canceled()
        if outcome == "timeout":
            raise _Stop(S.CANCELED, reason="authentication timed out", notify=True)
        if outcome == "settled":
            assert found is not None
            self._otp = None  # an OTP that arrived meanwhile is moot: the PSP decided
            return self._completed_at_psp(found, action)
        otp, self._otp = self._otp, None  # keep the one-time code no longer than needed
        assert otp is not None and self._state.psp_payment_id is not None
        self._psp_uncertain = True
        try:
            res = await self._psp_call(
                Act.AUTHENTICATE_PAYMENT,
                AuthenticateInput(
                    payment_id=inp.payment_id,
                    psp=self._psp_name,
                    psp_payment_id=self._state.psp_payment_id,
                    otp=otp,
                ),
            )
        except ActivityError as err:
            res = await self._authenticate_outcome(err)
        return self._completed_at_psp(res, action)

    async def _authenticate_outcome(self, err: ActivityError) -> PSPResult:
        """authenticate_payment failed: the PSP may have taken the code (or the payment was
        completed elsewhere and the PSP refused a second authentication). Look before failing."""
        err_type, _ = _cause(err)
        failed_at = workflow.now()

        def settled(found: PSPResult | None) -> bool:
            done = found is not None and found.status != "requires_action"
            return done or workflow.now() - failed_at >= options.AMBIGUITY_SETTLE

        outcome, found = await self._watch_psp(
            "resolve", options.AMBIGUITY_TIMEOUT, settled, "authenticate_lookup_timeout"
        )
        if outcome == "settled" and found is not None and found.status != "requires_action":
            return found
        raise self._psp_failure(err, "authenticate") from err

    def _completed_at_psp(self, res: PSPResult, action: NextAction) -> PSPResult:
        """The PSP's verdict on the customer's authentication."""
        if res.status == "failed":
            if action.type == "redirect_to_url":
                raise _Stop(
                    S.FAILED,
                    reason="the customer's wallet or bank declined the payment",
                    failure_code="payment_method_provider_decline",
                    decline_code=res.decline_code or "generic_decline",
                    message=res.message or "The payment was declined.",
                )
            raise _Stop(
                S.FAILED,
                reason="customer authentication failed",
                failure_code="card_declined",
                decline_code="authentication_failed",
                message=res.message or "The customer could not be authenticated.",
            )
        if res.status == "canceled":
            raise _Stop(S.CANCELED, reason="canceled at the PSP")
        if res.status == "authorized":
            self._authorized = res.amount
        return res

    async def _capture_and_settle(self, amount: int) -> None:
        inp = self._inp
        psp_payment_id = self._state.psp_payment_id
        assert psp_payment_id is not None
        self._psp_uncertain = True
        try:
            cap = await self._psp_call(
                Act.CAPTURE_PAYMENT,
                CaptureInput(
                    payment_id=inp.payment_id,
                    psp=self._psp_name,
                    psp_payment_id=psp_payment_id,
                    amount=amount,
                ),
            )
        except ActivityError as err:
            # The capture may have happened: look it up before anything else.
            cap = await self._capture_outcome(err, amount)
        if cap.status != "captured":
            raise _Stop(
                S.FAILED,
                reason=f"capture failed at the PSP ({cap.status})",
                failure_code="capture_failed",
                decline_code=cap.decline_code,
                message=cap.message,
            )
        self._captured = cap.amount_captured or amount
        # Money moved: a void no longer applies, a refund does. Registered before the ledger posting
        # so the saga never ends with money captured and nothing posted.
        self._saga.discard("void")
        self._saga.add(self._undo_capture, "refund")
        try:
            await self._act(
                Act.POST_CAPTURE,
                PostCaptureInput(
                    payment_id=inp.payment_id,
                    merchant_id=inp.merchant_id,
                    psp=self._psp_name,
                    amount=self._captured,
                    currency=inp.currency,
                    psp_payment_id=self._state.psp_payment_id,
                ),
                options.DB,
                PostCaptureResult,
            )
        except ActivityError as err:
            err_type, msg = _cause(err)
            raise _Stop(
                S.FAILED,
                reason=f"ledger posting failed ({err_type}); capture refunded",
                failure_code="ledger_error",
                message=msg,
            ) from err

        # Captured and posted: nothing is undone from here on (refunds are the RefundWorkflow's).
        self._saga.clear()
        if inp.items:
            assert inp.order_id is not None
            try:
                await self._act(
                    Act.CONFIRM_ORDER,
                    ConfirmOrderInput(order_id=inp.order_id, payment_id=inp.payment_id, confirmed=True),
                    options.DB,
                )
            except ActivityError as err:
                # The payment stands; an order that cannot be confirmed is for an operator, not a refund.
                workflow.logger.error("confirm_order failed for a succeeded payment: %s", _cause(err)[1])
        # post_capture wrote "succeeded" with the ledger transaction; only our view changes here. Set
        # after the order is confirmed, so whoever waits on an update sees a confirmed order.
        await self._set_status(S.SUCCEEDED, write=False, amount_capturable=0, amount_received=self._captured)
        try:
            await self._act(Act.SEND_RECEIPT, ReceiptInput(payment_id=inp.payment_id), options.NOTIFY)
        except ActivityError as err:
            workflow.logger.warning("receipt not sent: %s", _cause(err)[1])

    async def _capture_outcome(self, err: ActivityError, amount: int) -> PSPResult:
        """capture_payment gave up without an answer. Ask the PSP: captured -> go on; still only
        authorized -> the capture never happened, so capture again (same idempotency key) unless
        the PSP refused it; unreachable until the deadline -> fail (the void undo looks it up
        again and voids or refunds what it finds)."""
        inp = self._inp
        psp_payment_id = self._state.psp_payment_id
        assert psp_payment_id is not None
        deadline = workflow.now() + options.AMBIGUITY_TIMEOUT
        while True:
            err_type, msg = _cause(err)
            workflow.logger.warning("capture without an answer (%s): looking the payment up", err_type)
            outcome, found = await self._watch_psp(
                "resolve",
                deadline - workflow.now(),
                lambda r: r is not None and r.status != "requires_action",
                "capture_lookup_timeout",
            )
            if outcome != "settled" or found is None:
                raise _Stop(
                    S.FAILED,
                    reason="PSP unreachable: the capture outcome is unknown",
                    failure_code="psp_unavailable",
                    message="The payment processor could not be reached.",
                    notify=True,
                ) from err
            if found.status != "authorized":
                return found  # captured (go on), or voided / failed (the caller fails the payment)
            if err_type == "PSPRejected":
                raise _Stop(
                    S.FAILED,
                    reason="the PSP refused the capture",
                    failure_code="capture_failed",
                    message=msg,
                ) from err
            self._psp_uncertain = True
            try:
                return await self._psp_call(
                    Act.CAPTURE_PAYMENT,
                    CaptureInput(
                        payment_id=inp.payment_id,
                        psp=self._psp_name,
                        psp_payment_id=psp_payment_id,
                        amount=amount,
                    ),
                )
            except ActivityError as again:
                err = again

    async def _finish(self, stop: _Stop) -> None:
        """Compensate, then record the final failed/canceled status and cancel the order."""
        failed_undos = await self._saga.compensate()
        if failed_undos:
            workflow.logger.error("undo steps failed: %s", failed_undos)
        canceled = stop.status == S.CANCELED
        if self._inp.items:
            assert self._inp.order_id is not None
            await self._act(
                Act.CONFIRM_ORDER,
                ConfirmOrderInput(
                    order_id=self._inp.order_id, payment_id=self._inp.payment_id, confirmed=False
                ),
                options.DB,
            )
        await self._set_status(
            stop.status,
            reason=stop.reason,
            failure_code=stop.failure_code,
            decline_code=stop.decline_code,
            message=stop.message or (stop.reason if canceled else None),
            amount_capturable=0,
        )
        if stop.notify:
            try:
                await self._act(
                    Act.SEND_RECEIPT,
                    ReceiptInput(payment_id=self._inp.payment_id, kind="payment_failed"),
                    options.NOTIFY,
                )
            except ActivityError as err:
                workflow.logger.warning("failure notice not sent: %s", _cause(err)[1])

    # ---------------------------------------------------------------- undo steps

    async def _undo_authorization(self) -> None:
        """Release what the PSP holds for this payment. Idempotent: acts only on what it finds."""
        inp = self._inp
        psp_payment_id, status = self._state.psp_payment_id, self._psp_status
        if psp_payment_id is None or self._psp_uncertain:
            # An authorize/capture may have acted and lost its answer: ask the PSP what it holds.
            found: PSPResult | None = await self._act(
                Act.LOOKUP_PSP_PAYMENT,
                LookupInput(payment_id=inp.payment_id, psp=self._psp_name),
                options.COMPENSATION,
                PSPResult,
            )
            if found is None:
                return
            self._record_psp(found)
            psp_payment_id, status = found.psp_payment_id, found.status
            if status == "captured":
                self._captured = found.amount_captured - found.amount_refunded
                await self._undo_capture()
                return
        if status in ("authorized", "requires_action"):
            res: PSPResult = await self._act(
                Act.VOID_PAYMENT,
                VoidInput(payment_id=inp.payment_id, psp=self._psp_name, psp_payment_id=psp_payment_id),
                options.COMPENSATION,
                PSPResult,
            )
            self._record_psp(res)

    async def _undo_capture(self) -> None:
        psp_payment_id = self._state.psp_payment_id
        if psp_payment_id is None or self._captured <= 0:
            return
        await self._act(
            Act.REFUND_PAYMENT,
            RefundInput(
                payment_id=self._inp.payment_id,
                psp=self._psp_name,
                psp_payment_id=psp_payment_id,
                amount=self._captured,
                idempotency_key=f"{self._inp.payment_id}:compensate_refund",
            ),
            options.COMPENSATION,
        )

    # ---------------------------------------------------------------- helpers

    async def _act(
        self, name: str, arg: Any, preset: options.ActivityOptions, result_type: type | None = None
    ) -> Any:
        # Shielded: a workflow cancellation waits for the call to finish instead of abandoning it
        # with an unknown outcome; the CancelledError is raised right after.
        return await run_shielded(workflow.execute_activity(name, arg, result_type=result_type, **preset))

    async def _psp_call(
        self, name: str, arg: Any, preset: options.ActivityOptions = options.PSP
    ) -> PSPResult:
        """A forward PSP call; its answer is recorded inside the shielded task, so a cancellation
        arriving meanwhile cannot lose it (the void undo then knows what the PSP holds)."""

        async def call() -> PSPResult:
            res: PSPResult = await workflow.execute_activity(name, arg, result_type=PSPResult, **preset)
            self._record_psp(res)
            return res

        return await run_shielded(call())

    async def _set_status(
        self,
        status: PaymentStatus,
        *,
        reason: str | None = None,
        write: bool = True,
        failure_code: str | None = None,
        decline_code: str | None = None,
        message: str | None = None,
        next_action: NextAction | None = None,
        amount_capturable: int | None = None,
        amount_received: int | None = None,
    ) -> None:
        """The one place a status changes: payment row (unless post_capture wrote it), our state,
        the PaymentStatus search attribute."""
        st = self._state
        if write:
            await self._act(
                Act.UPDATE_PAYMENT,
                PaymentUpdate(
                    payment_id=st.payment_id,
                    status=status.value,
                    reason=reason,
                    psp_payment_id=st.psp_payment_id,
                    failure_code=failure_code,
                    decline_code=decline_code,
                    failure_message=message,
                    next_action=next_action,
                    amount_capturable=amount_capturable,
                    amount_received=amount_received,
                ),
                options.DB,
            )
        # All fields change in the same step as the status, so handlers woken by it see them all.
        st.failure_code, st.decline_code, st.message = failure_code, decline_code, message
        st.next_action = next_action
        if amount_capturable is not None:
            st.amount_capturable = amount_capturable
        if amount_received is not None:
            st.amount_received = amount_received
        if status in FINAL:
            st.review_pending = False
        st.status = status.value
        workflow.upsert_search_attributes([SA_PAYMENT_STATUS.value_set(status.value)])
        workflow.logger.info("payment %s -> %s (%s)", st.payment_id, status.value, reason)

    async def _note(self, reason: str) -> None:
        """A timeline entry without a status change."""
        st = self._state
        await self._act(
            Act.UPDATE_PAYMENT,
            PaymentUpdate(
                payment_id=st.payment_id, status=st.status, reason=reason, psp_payment_id=st.psp_payment_id
            ),
            options.DB,
        )

    async def _wait_for(self, phase: str, ready: Callable[[], bool], limit: timedelta, summary: str) -> bool:
        """Wait for an update (or a cancel); False when the timer fired first."""
        self._waiting_for = phase
        try:
            await workflow.wait_condition(
                lambda: ready() or self._cancel is not None, timeout=limit, timeout_summary=summary
            )
            return True
        except TimeoutError:
            return False
        finally:
            self._waiting_for = None

    async def _watch_psp(
        self,
        phase: str,
        limit: timedelta,
        settled: Callable[[PSPResult | None], bool],
        summary: str,
        *,
        ready: Callable[[], bool] = lambda: False,
        poll: bool = True,
    ) -> tuple[Literal["settled", "ready", "timeout"], PSPResult | None]:
        """Wait until the PSP's view of the payment settles: look it up at each new webhook, each
        return-URL nudge and each poll (POLL_FIRST, doubling up to POLL_MAX), until settled(found)
        ("settled") or `limit` passes ("timeout"). ready() (an OTP arrived) or a cancel end the wait
        early ("ready"). A webhook only wakes the loop: the look-up is what is believed, so a late,
        duplicated or reordered event cannot move the payment backwards. poll=False: no polls, only
        webhooks, nudges and the deadline."""
        deadline = workflow.now() + limit
        delay = options.POLL_FIRST if poll else limit
        found: PSPResult | None = None
        self._waiting_for = phase
        try:
            while True:
                if ready() or self._cancel is not None:
                    return "ready", found
                left = deadline - workflow.now()
                if left <= timedelta(0):
                    return "timeout", found
                self._idle = True
                try:
                    await workflow.wait_condition(
                        lambda: ready() or self._cancel is not None or self._woken(),
                        timeout=min(delay, left),
                        timeout_summary=summary if left <= delay else "psp_poll",
                    )
                except TimeoutError:
                    if workflow.now() >= deadline:
                        return "timeout", found
                    delay = min(delay * 2, options.POLL_MAX)
                finally:
                    self._idle = False
                if ready() or self._cancel is not None:
                    return "ready", found
                # what arrives during the look-up wakes the next round
                self._wake_seen, self._nudges_seen = self._wake, self._nudges
                answer, ok = await self._lookup()
                if ok:
                    found = answer
                    if settled(found):
                        return "settled", found
        finally:
            self._waiting_for = None

    def _woken(self) -> bool:
        return self._wake != self._wake_seen or self._nudges != self._nudges_seen

    async def _lookup(self) -> tuple[PSPResult | None, bool]:
        """(what the PSP holds for this payment, whether the PSP answered)."""
        try:
            found: PSPResult | None = await self._act(
                Act.LOOKUP_PSP_PAYMENT,
                LookupInput(payment_id=self._inp.payment_id, psp=self._psp_name),
                options.LOOKUP,
                PSPResult,
            )
        except ActivityError as err:
            workflow.logger.warning("PSP look-up failed: %s", _cause(err)[1])
            return None, False
        finally:
            self._lookups += 1
        if found is not None:
            self._record_psp(found)
        return found, True

    def _raise_if_canceled(self) -> None:
        if self._cancel is not None:
            raise _Stop(S.CANCELED, reason=self._cancel.reason)

    @property
    def _psp_name(self) -> str:
        """The PSP this payment is at: routing's choice (workflows/failover.py), else the input's."""
        return self._routed_psp or self._inp.psp

    def _use_psp(self, psp: str, in_flight: bool) -> None:
        # Routing hook: the saga's PSP calls and undo steps go to `psp`; in_flight = an authorize
        # may be held there, so the void undo looks it up first.
        self._routed_psp = psp
        self._psp_uncertain = in_flight

    async def _route_note(self, reason: str, psp: str) -> None:
        """Routing hook: a timeline note that also moves payments.psp to the chosen PSP."""
        st = self._state
        await self._act(
            Act.UPDATE_PAYMENT,
            PaymentUpdate(
                payment_id=st.payment_id,
                status=st.status,
                reason=reason,
                psp_payment_id=st.psp_payment_id,
                psp=psp,
            ),
            options.DB,
        )

    def _record_psp(self, res: PSPResult) -> None:
        self._state.psp_payment_id = res.psp_payment_id
        self._psp_status = res.status
        self._psp_uncertain = False

    def _psp_failure(self, err: ActivityError, step: str) -> _Stop:
        err_type, msg = _cause(err)
        if err_type == "PSPRejected":
            return _Stop(
                S.FAILED,
                reason=f"PSP rejected the {step} request",
                failure_code="processing_error",
                message=msg,
            )
        return _Stop(
            S.FAILED,
            reason=f"PSP unavailable during {step}",
            failure_code="psp_unavailable",
            message="The payment processor could not be reached.",
        )

    def _snapshot(self) -> PaymentState:
        return dataclasses.replace(self._state)

    # ---------------------------------------------------------------- updates and query

    @workflow.update(name=Upd.WAIT_FOR_STABLE)
    async def wait_for_stable(self) -> PaymentState:
        """Update-with-Start: answers once the payment reached its first stable status (or waits
        for manual review)."""
        await workflow.wait_condition(lambda: self._state.status in STABLE or self._state.review_pending)
        return self._snapshot()

    @workflow.update(name=Upd.AUTHENTICATE)
    async def authenticate(self, req: AuthenticateRequest) -> PaymentState:
        """Submit the customer's OTP; answers with the status that follows (succeeded,
        requires_capture, failed, canceled)."""
        self._otp = req.otp
        await workflow.wait_condition(
            lambda: self._state.status in STABLE and self._state.status != S.REQUIRES_ACTION
        )
        return self._snapshot()

    @authenticate.validator
    def _validate_authenticate(self, req: AuthenticateRequest) -> None:
        if not (
            self._state.status == S.REQUIRES_ACTION
            and self._waiting_for == "action"
            and self._otp is None
            and self._cancel is None
        ):
            raise ApplicationError(
                f"payment is {self._state.status}, not awaiting authentication", type=INVALID_STATE
            )
        if not req.otp.strip():
            raise ApplicationError("otp is required", type=INVALID_REQUEST)

    @workflow.update(name=Upd.CAPTURE)
    async def capture(self, req: CaptureRequest) -> PaymentState:
        """Capture a requires_capture payment (all, or `amount` of it); answers with the final
        state (succeeded, or failed/canceled if the capture did not go through)."""
        self._capture = req
        await workflow.wait_condition(lambda: self._state.status in FINAL)
        return self._snapshot()

    @capture.validator
    def _validate_capture(self, req: CaptureRequest) -> None:
        st = self._state
        if not (
            st.status == S.REQUIRES_CAPTURE
            and self._waiting_for == "capture"
            and self._capture is None
            and self._cancel is None
        ):
            raise ApplicationError(f"payment is {st.status}, not awaiting capture", type=INVALID_STATE)
        if req.amount is not None and not 0 < req.amount <= st.amount_capturable:
            raise ApplicationError(
                f"amount must be between 1 and {st.amount_capturable} (amount_capturable)",
                type=INVALID_REQUEST,
            )

    @workflow.update(name=Upd.CANCEL)
    async def cancel(self, req: CancelRequest) -> PaymentState:
        """Cancel while waiting for the customer, the merchant or the reviewer; answers once the
        undo steps ran and the payment is canceled."""
        if self._cancel is None:
            self._cancel = req
        await workflow.wait_condition(lambda: self._state.status in FINAL)
        return self._snapshot()

    @cancel.validator
    def _validate_cancel(self, req: CancelRequest) -> None:
        st = self._state
        if self._cancel is not None and st.status not in FINAL:
            return  # a cancel is already under way: this one waits for the same outcome
        waiting = (
            (st.status == S.REQUIRES_ACTION and self._waiting_for == "action" and self._otp is None)
            or (st.status == S.REQUIRES_CAPTURE and self._waiting_for == "capture" and self._capture is None)
            or (st.status == S.PROCESSING and st.review_pending and self._waiting_for == "review")
        )
        if not waiting:
            raise ApplicationError(f"payment is {st.status} and cannot be canceled now", type=INVALID_STATE)

    @workflow.update(name=Upd.REVIEW)
    async def review(self, req: ReviewRequest) -> PaymentState:
        """An operator's verdict on a payment in manual review; answers at the next stable status."""
        self._review = req
        await workflow.wait_condition(lambda: self._state.status in STABLE)
        return self._snapshot()

    @review.validator
    def _validate_review(self, req: ReviewRequest) -> None:
        if not (
            self._state.review_pending
            and self._waiting_for == "review"
            and self._review is None
            and self._cancel is None
        ):
            raise ApplicationError("payment is not awaiting manual review", type=INVALID_STATE)
        if req.decision not in ("approve", "reject"):
            raise ApplicationError("decision must be approve or reject", type=INVALID_REQUEST)
        if not req.operator_id:
            raise ApplicationError("operator_id is required", type=INVALID_REQUEST)

    @workflow.query(name=Upd.QUERY_STATE)
    def state(self) -> PaymentState:
        return self._state

    @workflow.signal(name=PSP_EVENT_SIGNAL)
    def psp_event(self, event: PSPEvent) -> None:
        """A PSP webhook about this payment: kept (the newest by the PSP's clock) and, the first
        time its id is seen, it wakes a loop waiting for the PSP (_watch_psp) to look the payment
        up now. Redelivered events change nothing."""
        if event.id in self._events_seen:
            return
        self._events_seen.add(event.id)
        latest = self._psp_event
        if latest is None or event.created >= latest.created:
            self._psp_event = event
        self._wake += 1

    @workflow.update(name=RECHECK_UPDATE)
    async def recheck(self) -> PaymentState:
        """The customer is back from the wallet's or bank's page (the return URL): look the payment
        up now. Answers once that look-up is done and the workflow went back to waiting, or moved
        on to its next stable status."""
        self._nudges += 1
        mark = self._lookups
        await workflow.wait_condition(
            lambda: (
                (self._lookups > mark and self._idle)
                or (self._state.status in STABLE and self._state.status != S.REQUIRES_ACTION)
            )
        )
        return self._snapshot()

    @recheck.validator
    def _validate_recheck(self) -> None:
        # Refused (and so kept out of the history) unless a wait for the PSP is open, or the
        # customer's wait just ended (a webhook beat the browser: the payment still reads
        # requires_action on its way to the outcome, which the nudge then waits for), and no nudge
        # is already pending: the return URL is public, reloading it must not grow the history.
        waiting = self._waiting_for in ("action", "resolve")
        moving_on = self._waiting_for is None and self._state.status == S.REQUIRES_ACTION
        if not (waiting or moving_on) or self._nudges > self._nudges_seen:
            raise ApplicationError("payment is not waiting for the PSP", type=INVALID_STATE)
