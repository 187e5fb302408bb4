"""ReturnWorkflow: one authorized return (return:{return_id}) until it is refunded or expires.

authorized -> wait for the operator's `receive` update until the return window closes (30 days
from authorization; no items by then: expired) -> received: the items go back in stock (one
idempotent activity) -> the return's refund row is created under the payment's row lock (the same
rule as POST /v1/refunds) -> a child RefundWorkflow refunds it -> refunded.

The workflow is the only writer of the return's status after authorization, so the receive update
and the expiry timer cannot both win: whichever the workflow sees first closes the other's door
(the validator refuses a receive once the return expired).
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ApplicationError

# passed through the sandbox, helpers included: see workflows/__init__.py
with workflow.unsafe.imports_passed_through():
    from workflows import options
    from workflows.contracts import (
        REFUND_WORKFLOW,
        RETURN_WORKFLOW,
        SA_MERCHANT_ID,
        FinishReturnInput,
        ReceiveRequest,
        RefundAct,
        RefundWorkflowResult,
        ReturnRefundResult,
        ReturnState,
        ReturnStepInput,
        ReturnUpd,
        ReturnWorkflowInput,
        refund_workflow_id,
    )
    from workflows.saga import run_shielded

INVALID_STATE = "InvalidState"
INVALID_REQUEST = "InvalidRequest"


@workflow.defn(name=RETURN_WORKFLOW)
class ReturnWorkflow:
    @workflow.init
    def __init__(self, inp: ReturnWorkflowInput) -> None:
        self._state = ReturnState(return_id=inp.return_id, status="authorized")
        self._receive: ReceiveRequest | None = None
        self._done = False

    @workflow.run
    async def run(self, inp: ReturnWorkflowInput) -> ReturnState:
        workflow.upsert_search_attributes([SA_MERCHANT_ID.value_set(inp.merchant_id)])
        step = ReturnStepInput(return_id=inp.return_id)
        left = inp.expires_at - workflow.now()
        arrived = False
        if left > timedelta(0):
            try:
                await workflow.wait_condition(
                    lambda: self._receive is not None, timeout=left, timeout_summary="return_window"
                )
                arrived = True
            except TimeoutError:
                pass
        if not arrived:
            # set before any await: from here on the validator refuses a late receive
            self._state.status = "expired"
            await workflow.execute_activity(RefundAct.EXPIRE_RETURN, step, result_type=str, **options.DB)
            self._done = True
            return self._snapshot()

        assert self._receive is not None
        workflow.logger.info("return %s received by %s", inp.return_id, self._receive.operator_id)
        self._state.status = "received"
        # Restock, refund and the final status run as one unit: a workflow cancellation arriving
        # meanwhile cannot leave items restocked with the refund half-way.
        await run_shielded(self._receive_and_refund(step))
        self._done = True
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self._snapshot()

    async def _receive_and_refund(self, step: ReturnStepInput) -> None:
        await workflow.execute_activity(RefundAct.RECEIVE_RETURN, step, **options.DB)
        planned: ReturnRefundResult = await workflow.execute_activity(
            RefundAct.CREATE_RETURN_REFUND, step, result_type=ReturnRefundResult, **options.DB
        )
        if planned.refund is None:
            self._state.note = planned.reason or "nothing to refund"
            workflow.logger.warning("return %s received, not refunded: %s", step.return_id, self._state.note)
            return
        refund = planned.refund
        self._state.refund_id = refund.refund_id
        self._state.refund_status = "pending"
        result: RefundWorkflowResult = await workflow.execute_child_workflow(
            REFUND_WORKFLOW,
            refund,
            id=refund_workflow_id(refund.refund_id),
            result_type=RefundWorkflowResult,
            # the refund must finish even if this return's workflow is terminated
            parent_close_policy=workflow.ParentClosePolicy.ABANDON,
        )
        self._state.refund_status = result.status
        refunded = result.status == "succeeded"
        await workflow.execute_activity(
            RefundAct.FINISH_RETURN,
            FinishReturnInput(return_id=step.return_id, refunded=refunded),
            **options.DB,
        )
        if refunded:
            self._state.status = "refunded"
        else:
            self._state.note = f"refund failed: {result.failure_reason or 'unknown'}"

    def _snapshot(self) -> ReturnState:
        return dataclasses.replace(self._state)

    @workflow.update(name=ReturnUpd.RECEIVE)
    async def receive(self, req: ReceiveRequest) -> ReturnState:
        """The operator has the items: restock and refund them; answers once that is settled."""
        if self._receive is None:
            self._receive = req
        await workflow.wait_condition(lambda: self._done)
        return self._snapshot()

    @receive.validator
    def _validate_receive(self, req: ReceiveRequest) -> None:
        if not req.operator_id:
            raise ApplicationError("operator_id is required", type=INVALID_REQUEST)
        if self._receive is not None and not self._done:
            return  # already being received: this one waits for the same outcome
        if self._state.status != "authorized":
            raise ApplicationError(
                f"return is {self._state.status}; it cannot be received", type=INVALID_STATE
            )

    @workflow.query(name=ReturnUpd.QUERY_STATE)
    def state(self) -> ReturnState:
        return self._state
