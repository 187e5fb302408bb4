"""The ceiling for `make bench`: a no-op workflow that makes the same number and kind of calls as a
successful automatic-capture checkout (the same activities with the same options, the same search
attribute upserts, the same Update-with-Start early return), with activities that do nothing.
Whatever checkouts/s falls short of ceilings/s is the cost of our own code (API, DB, PSP).

Run as its own worker process, with the production worker's tuning:
    python -m bench.ceiling   (TEMPORAL_ADDRESS, PAYLOAD_KEYS from the environment)
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from temporalio import activity, workflow
from temporalio.worker import Worker

with workflow.unsafe.imports_passed_through():
    from workflows import options
    from workflows.contracts import (
        SA_AMOUNT_MINOR,
        SA_CURRENCY,
        SA_MERCHANT_ID,
        SA_PAYMENT_STATUS,
        Act,
        CheckoutInput,
        CheckoutResult,
        FraudCheckResult,
        PaymentState,
        PostCaptureResult,
        PSPResult,
        Upd,
    )

CEILING_WORKFLOW = "CeilingWorkflow"
CEILING_QUEUE = "paysaga-ceiling"


@activity.defn(name=Act.CREATE_PAYMENT)
async def create_payment(_: object) -> None:
    return None


@activity.defn(name=Act.CHECK_FRAUD)
async def check_fraud(_: object) -> FraudCheckResult:
    return FraudCheckResult(decision="approve")


@activity.defn(name=Act.AUTHORIZE_PAYMENT)
async def authorize_payment(_: object) -> PSPResult:
    return PSPResult(psp_payment_id="noop", status="authorized", amount=0)


@activity.defn(name=Act.CAPTURE_PAYMENT)
async def capture_payment(_: object) -> PSPResult:
    return PSPResult(psp_payment_id="noop", status="captured", amount=0)


@activity.defn(name=Act.POST_CAPTURE)
async def post_capture(_: object) -> PostCaptureResult:
    return PostCaptureResult(transaction_key="noop", fee=0, net=0)


@activity.defn(name=Act.SEND_RECEIPT)
async def send_receipt(_: object) -> None:
    return None


NOOP_ACTIVITIES = [
    create_payment,
    check_fraud,
    authorize_payment,
    capture_payment,
    post_capture,
    send_receipt,
]


@workflow.defn(name=CEILING_WORKFLOW)
class CeilingWorkflow:
    @workflow.init
    def __init__(self, inp: CheckoutInput) -> None:
        self._state = PaymentState(payment_id=inp.payment_id, status="processing")

    @workflow.run
    async def run(self, inp: CheckoutInput) -> CheckoutResult:
        workflow.upsert_search_attributes(
            [
                SA_MERCHANT_ID.value_set(inp.merchant_id),
                SA_AMOUNT_MINOR.value_set(inp.amount),
                SA_CURRENCY.value_set(inp.currency),
                SA_PAYMENT_STATUS.value_set("processing"),
            ]
        )
        # the same calls, in the same order and with the same presets, as checkout's happy path
        for name, preset in (
            (Act.CREATE_PAYMENT, options.DB),
            (Act.CHECK_FRAUD, options.DB),
            (Act.AUTHORIZE_PAYMENT, options.PSP),
            (Act.CAPTURE_PAYMENT, options.PSP),
            (Act.POST_CAPTURE, options.DB),
        ):
            await workflow.execute_activity(name, inp.payment_id, **preset)
        self._state.status = "succeeded"
        workflow.upsert_search_attributes([SA_PAYMENT_STATUS.value_set("succeeded")])
        await workflow.execute_activity(Act.SEND_RECEIPT, inp.payment_id, **options.NOTIFY)
        await workflow.wait_condition(workflow.all_handlers_finished)
        return CheckoutResult(payment_id=inp.payment_id, status="succeeded", amount_received=inp.amount)

    @workflow.update(name=Upd.WAIT_FOR_STABLE)
    async def wait_for_stable(self) -> PaymentState:
        await workflow.wait_condition(lambda: self._state.status == "succeeded")
        return self._state


async def main() -> None:
    from core.config import get_settings
    from worker import (
        ACTIVITY_THREADS,
        GRACEFUL_SHUTDOWN,
        MAX_CONCURRENT_ACTIVITIES,
        MAX_CONCURRENT_WORKFLOW_TASKS,
        connect_with_retry,
    )

    settings = get_settings()
    client = await connect_with_retry(settings)
    with ThreadPoolExecutor(ACTIVITY_THREADS) as executor:
        worker = Worker(
            client,
            task_queue=CEILING_QUEUE,
            workflows=[CeilingWorkflow],
            activities=NOOP_ACTIVITIES,
            activity_executor=executor,
            max_concurrent_activities=MAX_CONCURRENT_ACTIVITIES,
            max_concurrent_workflow_tasks=MAX_CONCURRENT_WORKFLOW_TASKS,
            max_cached_workflows=settings.worker_max_cached_workflows,
            graceful_shutdown_timeout=GRACEFUL_SHUTDOWN,
        )
        await worker.run()


if __name__ == "__main__":
    asyncio.run(main())
