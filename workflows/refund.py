"""RefundWorkflow: one refund (refund:{refund_id}) from pending to succeeded or failed.

The refund row is already pending when the workflow starts: whoever created it (POST /v1/refunds,
or a received return) checked refundable = captured - refunded - pending under the payment's row
lock, so the amount is reserved and concurrent refunds cannot exceed the capture. Then:

(PSP payment id missing on our row: look it up at the PSP by our payment id) -> PSP refund with
the stable key "refund:{refund_id}" -> definite refusal: refund failed, the reservation released,
ledger untouched -> success: one DB activity posts the ledger reversal, marks the refund succeeded
and the payment partially_refunded / refunded -> customer notice (succeeded or failed).

The sandbox answers a refund synchronously (succeeded, or a 4xx refusal), so the activity's answer
settles the refund; no webhook wait is needed for it.

The PSP call is retried without limit while its outcome is unknown (timeouts, 5xx): a refund the
PSP may already have paid out must never be reported failed, and the stable key makes every retry
the same request. PSP call and settlement run as one shielded unit, so a workflow cancellation
cannot fall between money leaving and the ledger saying so.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Final

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

# passed through the sandbox, helpers included: see workflows/__init__.py
with workflow.unsafe.imports_passed_through():
    from workflows import options
    from workflows.contracts import (
        REFUND_WORKFLOW,
        SA_AMOUNT_MINOR,
        SA_CURRENCY,
        SA_MERCHANT_ID,
        Act,
        CompleteRefundInput,
        CompleteRefundResult,
        FailRefundInput,
        LookupInput,
        PSPResult,
        RefundAct,
        RefundInput,
        RefundNoticeInput,
        RefundNoticeKind,
        RefundWorkflowInput,
        RefundWorkflowResult,
    )
    from workflows.saga import run_shielded

# ApplicationError types by which the PSP activity says "certainly not refunded".
DEFINITE_REFUSALS: Final = ("PSPRejected", "PSPRefundFailed", "UnknownPSP")

PSP_REFUND: Final[options.ActivityOptions] = {
    "start_to_close_timeout": timedelta(seconds=15),
    "retry_policy": RetryPolicy(
        initial_interval=timedelta(seconds=1),
        backoff_coefficient=2.0,
        maximum_interval=timedelta(seconds=60),
        maximum_attempts=0,
        non_retryable_error_types=list(DEFINITE_REFUSALS),
    ),
}


def psp_refund_key(refund_id: str) -> str:
    return f"refund:{refund_id}"


def _refusal(err: ActivityError) -> tuple[str, str] | None:
    """(failure_reason code, message) if the PSP certainly did not refund; None otherwise."""
    cause = err.cause
    if not isinstance(cause, ApplicationError) or cause.type not in DEFINITE_REFUSALS:
        return None
    code = "unknown" if cause.type == "UnknownPSP" else "declined"
    details: Any = cause.details[0] if cause.details else None
    if isinstance(details, dict) and isinstance(details.get("code"), str):
        code = details["code"]  # the PSP's own reason (e.g. amount_too_large, charge_disputed)
    return code, cause.message


@workflow.defn(name=REFUND_WORKFLOW)
class RefundWorkflow:
    @workflow.run
    async def run(self, inp: RefundWorkflowInput) -> RefundWorkflowResult:
        workflow.upsert_search_attributes(
            [
                SA_MERCHANT_ID.value_set(inp.merchant_id),
                SA_AMOUNT_MINOR.value_set(inp.amount),
                SA_CURRENCY.value_set(inp.currency),
            ]
        )
        result = await run_shielded(self._refund(inp))
        kind: RefundNoticeKind = "refund_succeeded" if result.status == "succeeded" else "refund_failed"
        notice = RefundNoticeInput(refund_id=inp.refund_id, kind=kind)
        try:
            await workflow.execute_activity(RefundAct.SEND_REFUND_NOTICE, notice, **options.NOTIFY)
        except ActivityError as err:
            # the refund stands either way; a lost email is not a reason to fail it
            workflow.logger.warning("refund notice %s not sent: %s", inp.refund_id, err.cause or err)
        return result

    async def _refund(self, inp: RefundWorkflowInput) -> RefundWorkflowResult:
        try:
            psp_payment_id = inp.psp_payment_id or await self._find_psp_payment(inp)
            if psp_payment_id is None:
                return await self._fail(inp, "unknown", "the PSP has no payment for this reference")
            await workflow.execute_activity(
                Act.REFUND_PAYMENT,
                RefundInput(
                    payment_id=inp.payment_id,
                    psp=inp.psp,
                    psp_payment_id=psp_payment_id,
                    amount=inp.amount,
                    idempotency_key=psp_refund_key(inp.refund_id),
                ),
                result_type=PSPResult,
                **PSP_REFUND,
            )
        except ActivityError as err:
            refusal = _refusal(err)
            if refusal is None:
                raise  # not a business answer: fail loudly, the refund stays pending (reserved)
            return await self._fail(inp, *refusal)

        done: CompleteRefundResult = await workflow.execute_activity(
            RefundAct.COMPLETE_REFUND,
            CompleteRefundInput(refund_id=inp.refund_id),
            result_type=CompleteRefundResult,
            **options.DB,
        )
        workflow.logger.info(
            "refund %s succeeded (fee returned %d), payment %s",
            inp.refund_id,
            done.fee_returned,
            done.payment_status,
        )
        return RefundWorkflowResult(
            refund_id=inp.refund_id, status="succeeded", payment_status=done.payment_status
        )

    async def _find_psp_payment(self, inp: RefundWorkflowInput) -> str | None:
        """The PSP's id of the payment when our row lacks it: asked by reference (our payment id)."""
        found: PSPResult | None = await workflow.execute_activity(
            Act.LOOKUP_PSP_PAYMENT,
            LookupInput(payment_id=inp.payment_id, psp=inp.psp),
            result_type=PSPResult,
            **PSP_REFUND,
        )
        return found.psp_payment_id if found is not None else None

    async def _fail(self, inp: RefundWorkflowInput, code: str, message: str) -> RefundWorkflowResult:
        """Definitely not refunded: the refund fails and its reservation is released."""
        workflow.logger.info("refund %s not made: %s (%s)", inp.refund_id, code, message)
        await workflow.execute_activity(
            RefundAct.FAIL_REFUND,
            FailRefundInput(refund_id=inp.refund_id, reason=code, message=message),
            **options.DB,
        )
        return RefundWorkflowResult(refund_id=inp.refund_id, status="failed", failure_reason=code)
