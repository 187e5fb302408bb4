"""RefundWorkflow on the time-skipping server with the REAL database activities (SQLite and
PostgreSQL) and a fake PSP that keeps its own books, so every test can check the two invariants:
the ledger balances, and what the PSP paid back equals what the ledger says was refunded."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col, select
from temporalio import activity
from temporalio.client import Client, WorkflowHandle
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment
from temporalio.worker import Replayer, Worker

from activities.ledger import LedgerActivities
from activities.notify import NotifyActivities
from activities.refunds import RefundActivities
from core.config import Settings
from core.ids import new_id
from core.ledger_store import account_view, check_ledger, write_transaction
from core.refunds import RefundRejected, reserve_refund
from core.tables import LedgerTransaction, Notification, Payment, Refund
from tests.factories import Seed, make_payment, seed
from workflows.contracts import (
    REFUND_WORKFLOW,
    Act,
    LookupInput,
    PostCaptureInput,
    PSPResult,
    RefundInput,
    RefundWorkflowInput,
    RefundWorkflowResult,
    refund_workflow_id,
)
from workflows.refund import RefundWorkflow
from workflows.returns import ReturnWorkflow

CAPTURED = 10_000


@dataclass
class FakePsp:
    """The PSP's side of refunds: idempotent by key, like the sandbox. Knobs make it fail."""

    refunded: dict[str, int] = field(default_factory=dict)  # psp payment id -> amount refunded
    by_key: dict[str, int] = field(default_factory=dict)  # idempotency key -> amount
    calls: list[RefundInput] = field(default_factory=list)
    by_reference: dict[str, str] = field(default_factory=dict)  # our payment id -> PSP payment id
    lookups: list[LookupInput] = field(default_factory=list)
    refuse: bool = False  # a definite no (card closed)
    lose_answers: int = 0  # the first N attempts refund but the answer is lost (timeout)

    @activity.defn(name=Act.LOOKUP_PSP_PAYMENT)
    async def lookup_psp_payment(self, inp: LookupInput) -> PSPResult | None:
        self.lookups.append(inp)
        psp_id = self.by_reference.get(inp.payment_id)
        if psp_id is None:
            return None
        return PSPResult(psp_payment_id=psp_id, status="captured", amount=CAPTURED, amount_captured=CAPTURED)

    @activity.defn(name=Act.REFUND_PAYMENT)
    async def refund_payment(self, inp: RefundInput) -> PSPResult:
        self.calls.append(inp)
        if self.refuse:
            raise ApplicationError(
                "the card account is closed",
                {"code": "expired_or_canceled_card"},
                type="PSPRejected",
                non_retryable=True,
            )
        if inp.idempotency_key not in self.by_key:
            self.by_key[inp.idempotency_key] = inp.amount
            self.refunded[inp.psp_payment_id] = self.refunded.get(inp.psp_payment_id, 0) + inp.amount
        if activity.info().attempt <= self.lose_answers:
            # a short retry delay only so the test does not wait out the real backoff
            raise ApplicationError(
                "PSP timed out", type="PSPAmbiguous", next_retry_delay=timedelta(milliseconds=10)
            )
        return PSPResult(
            psp_payment_id=inp.psp_payment_id,
            status="captured",
            amount=CAPTURED,
            amount_captured=CAPTURED,
            amount_refunded=self.refunded[inp.psp_payment_id],
        )


@pytest.fixture
def psp() -> FakePsp:
    return FakePsp()


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=8) as pool:
        yield pool


@pytest.fixture
async def task_queue(
    env: WorkflowEnvironment, sessions: sessionmaker[Session], psp: FakePsp, executor: ThreadPoolExecutor
) -> AsyncIterator[str]:
    queue = f"refund-test-{uuid.uuid4()}"
    notify = NotifyActivities(sessions, Settings.model_validate({"smtp_url": ""}))
    async with Worker(
        env.client,
        task_queue=queue,
        workflows=[RefundWorkflow, ReturnWorkflow],
        activities=[
            *RefundActivities(sessions).activities(),
            *notify.activities(),
            psp.refund_payment,
            psp.lookup_psp_payment,
        ],
        activity_executor=executor,
    ):
        # No automatic skipping while a test waits for a result: the database activities take real
        # time, and a server that skipped ahead meanwhile would time them out (start_to_close) and
        # retry them in a loop. Tests that need the clock move it with env.sleep().
        with env.auto_time_skipping_disabled():
            yield queue


@pytest.fixture
def client(env: WorkflowEnvironment) -> Client:
    return env.client


# ---- helpers (test_returns.py uses them too) ----------------------------------------------------


def captured_payment(sessions: sessionmaker[Session], base: Seed, amount: int = CAPTURED) -> Payment:
    with sessions() as s, s.begin():
        pay = make_payment(
            s,
            base.method,
            amount=amount,
            status="requires_capture",
            psp_payment_id=f"psp_{uuid.uuid4().hex[:10]}",
        )
    ActivityEnvironment().run(
        LedgerActivities(sessions).post_capture,
        PostCaptureInput(pay.id, base.merchant.id, "sandbox", amount, "usd"),
    )
    return pay


def reserve(sessions: sessionmaker[Session], pay: Payment, amount: int | None) -> RefundWorkflowInput:
    """What POST /v1/refunds does before it starts the workflow."""
    with write_transaction(sessions) as s:
        return reserve_refund(
            s, refund_id=new_id("re"), merchant_id=pay.merchant_id, payment_id=pay.id, amount=amount
        )


async def start_refund(
    client: Client, inp: RefundWorkflowInput, task_queue: str
) -> WorkflowHandle[Any, RefundWorkflowResult]:
    return await client.start_workflow(
        REFUND_WORKFLOW,
        inp,
        id=refund_workflow_id(inp.refund_id),
        task_queue=task_queue,
        result_type=RefundWorkflowResult,
        execution_timeout=timedelta(days=60),  # a stuck test ends at this (skipped) time
    )


def payment_status(sessions: sessionmaker[Session], payment_id: str) -> str:
    with sessions() as s:
        row = s.get(Payment, payment_id)
    assert row is not None
    return row.status


def refund_rows(sessions: sessionmaker[Session], payment_id: str) -> list[tuple[int, str]]:
    with sessions() as s:
        rows = s.exec(
            select(Refund).where(col(Refund.payment_id) == payment_id).order_by(col(Refund.id))
        ).all()
    return [(r.amount, r.status) for r in rows]


def ledger_refunds(sessions: sessionmaker[Session], payment_id: str) -> int:
    with sessions() as s:
        view = account_view(s, "psp_receivable:sandbox:usd", limit=10_000)
    return -sum(e.amount for e in view.entries if e.kind == "refund" and e.ref == payment_id)


def assert_books_agree(sessions: sessionmaker[Session], psp: FakePsp, pay: Payment) -> None:
    """The ledger balances and the PSP paid back exactly what the ledger and the refunds say."""
    with sessions() as s:
        report = check_ledger(s)
    assert report.balanced, report.unbalanced
    assert pay.psp_payment_id is not None
    succeeded = sum(a for a, st in refund_rows(sessions, pay.id) if st == "succeeded")
    assert psp.refunded.get(pay.psp_payment_id, 0) == ledger_refunds(sessions, pay.id) == succeeded


async def assert_replays(handle: WorkflowHandle[Any, Any]) -> None:
    """The recorded history replays against the workflow code (no nondeterminism)."""
    replayer = Replayer(workflows=[RefundWorkflow, ReturnWorkflow], data_converter=pydantic_data_converter)
    await replayer.replay_workflow(await handle.fetch_history())


def notices(sessions: sessionmaker[Session], refund_id: str) -> list[str]:
    with sessions() as s:
        rows = s.exec(select(Notification).where(col(Notification.payment_id) == refund_id)).all()
    return [n.kind for n in rows]


# ---- tests --------------------------------------------------------------------------------------


async def test_full_refund(
    client: Client, task_queue: str, sessions: sessionmaker[Session], psp: FakePsp
) -> None:
    pay = captured_payment(sessions, seed(sessions))
    inp = reserve(sessions, pay, None)
    assert inp.amount == CAPTURED

    handle = await start_refund(client, inp, task_queue)
    result = await handle.result()

    assert (result.status, result.payment_status, result.failure_reason) == ("succeeded", "refunded", None)
    assert [(c.amount, c.idempotency_key, c.psp_payment_id) for c in psp.calls] == [
        (CAPTURED, f"refund:{inp.refund_id}", pay.psp_payment_id)
    ]
    assert payment_status(sessions, pay.id) == "refunded"
    assert refund_rows(sessions, pay.id) == [(CAPTURED, "succeeded")]
    assert notices(sessions, inp.refund_id) == ["refund_succeeded"]
    assert_books_agree(sessions, psp, pay)
    await assert_replays(handle)


async def test_partial_refunds_summing_to_the_captured_amount(
    client: Client, task_queue: str, sessions: sessionmaker[Session], psp: FakePsp
) -> None:
    pay = captured_payment(sessions, seed(sessions))
    first = reserve(sessions, pay, 2_500)
    result = await (await start_refund(client, first, task_queue)).result()
    assert (result.status, result.payment_status) == ("succeeded", "partially_refunded")
    assert_books_agree(sessions, psp, pay)

    # the rest in three refunds running at the same time
    parts = [reserve(sessions, pay, amount) for amount in (2_500, 3_000, 2_000)]
    handles = [await start_refund(client, p, task_queue) for p in parts]
    results = await asyncio.gather(*(h.result() for h in handles))
    assert [r.status for r in results] == ["succeeded"] * 3
    # whichever finished last saw the payment fully refunded
    assert sorted(r.payment_status or "" for r in results) == [
        "partially_refunded",
        "partially_refunded",
        "refunded",
    ]
    assert payment_status(sessions, pay.id) == "refunded"
    assert sum(a for a, _ in refund_rows(sessions, pay.id)) == CAPTURED
    assert_books_agree(sessions, psp, pay)

    with pytest.raises(RefundRejected) as info:
        reserve(sessions, pay, 1)
    assert info.value.code == "charge_already_refunded"


async def test_over_refund_is_rejected_and_nothing_moves(
    client: Client, task_queue: str, sessions: sessionmaker[Session], psp: FakePsp
) -> None:
    pay = captured_payment(sessions, seed(sessions))
    ok = reserve(sessions, pay, 6_000)
    # refused while the first is still pending: the pending 6_000 is reserved
    with pytest.raises(RefundRejected) as info:
        reserve(sessions, pay, 4_001)
    assert (info.value.status, info.value.code) == (400, "amount_too_large")
    await (await start_refund(client, ok, task_queue)).result()
    with pytest.raises(RefundRejected) as info:
        reserve(sessions, pay, 4_001)
    assert info.value.code == "amount_too_large"

    assert refund_rows(sessions, pay.id) == [(6_000, "succeeded")]
    assert len(psp.calls) == 1  # the rejected refunds never reached the PSP
    with sessions() as s:
        keys = s.exec(select(LedgerTransaction.key)).all()
    assert sorted(keys) == sorted([f"payment:{pay.id}:capture", f"refund:{ok.refund_id}"])
    assert payment_status(sessions, pay.id) == "partially_refunded"
    assert_books_agree(sessions, psp, pay)


async def test_psp_refund_failure_fails_the_refund_and_leaves_the_ledger(
    client: Client, task_queue: str, sessions: sessionmaker[Session], psp: FakePsp
) -> None:
    pay = captured_payment(sessions, seed(sessions))
    psp.refuse = True
    inp = reserve(sessions, pay, 4_000)

    result = await (await start_refund(client, inp, task_queue)).result()

    assert (result.status, result.failure_reason) == ("failed", "expired_or_canceled_card")
    assert len(psp.calls) == 1  # a definite no is not retried
    with sessions() as s:
        row = s.get(Refund, inp.refund_id)
        assert row is not None and (row.status, row.failure_reason) == ("failed", "expired_or_canceled_card")
        assert s.exec(select(LedgerTransaction.key)).all() == [f"payment:{pay.id}:capture"]
    assert payment_status(sessions, pay.id) == "succeeded"
    assert notices(sessions, inp.refund_id) == ["refund_failed"]
    assert_books_agree(sessions, psp, pay)
    # the failed refund released its reservation: the whole capture is refundable again
    assert reserve(sessions, pay, None).amount == CAPTURED


async def test_lost_psp_answers_are_retried_with_the_same_key(
    client: Client, task_queue: str, sessions: sessionmaker[Session], psp: FakePsp
) -> None:
    pay = captured_payment(sessions, seed(sessions))
    psp.lose_answers = 3  # the PSP refunds on the first attempt; three answers get lost
    inp = reserve(sessions, pay, 1_234)

    result = await (await start_refund(client, inp, task_queue)).result()

    assert result.status == "succeeded"
    assert len(psp.calls) == 4
    assert {c.idempotency_key for c in psp.calls} == {f"refund:{inp.refund_id}"}
    assert pay.psp_payment_id is not None and psp.refunded[pay.psp_payment_id] == 1_234  # paid out once
    assert_books_agree(sessions, psp, pay)


async def test_a_second_start_of_the_same_refund_is_the_same_workflow(
    client: Client, task_queue: str, sessions: sessionmaker[Session], psp: FakePsp
) -> None:
    """The API re-attaches on a retried request (USE_EXISTING); the refund is paid once."""
    from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
    from temporalio.exceptions import WorkflowAlreadyStartedError

    pay = captured_payment(sessions, seed(sessions))
    inp = reserve(sessions, pay, 500)
    kwargs: dict[str, Any] = {
        "id": refund_workflow_id(inp.refund_id),
        "task_queue": task_queue,
        "result_type": RefundWorkflowResult,
        "id_conflict_policy": WorkflowIDConflictPolicy.USE_EXISTING,
        "id_reuse_policy": WorkflowIDReusePolicy.REJECT_DUPLICATE,
    }
    first = await client.start_workflow(REFUND_WORKFLOW, inp, **kwargs)
    second = await client.start_workflow(REFUND_WORKFLOW, inp, **kwargs)
    assert second.result_run_id == first.result_run_id
    assert (await first.result()).status == "succeeded"
    with pytest.raises(WorkflowAlreadyStartedError):
        await client.start_workflow(REFUND_WORKFLOW, inp, **kwargs)  # finished: never run again
    assert len(psp.calls) == 1
    assert_books_agree(sessions, psp, pay)


async def test_a_payment_without_its_psp_id_is_looked_up_at_the_psp(
    client: Client, task_queue: str, sessions: sessionmaker[Session], psp: FakePsp
) -> None:
    """An automatically captured payment may not have the PSP's id on its row: the workflow asks the
    PSP by our payment id; an unknown reference fails the refund without calling refund."""
    base = seed(sessions)
    pay = captured_payment(sessions, base)
    assert pay.psp_payment_id is not None
    psp.by_reference[pay.id] = pay.psp_payment_id
    with sessions() as s, s.begin():
        row = s.get(Payment, pay.id)
        assert row is not None
        row.psp_payment_id = None
    inp = reserve(sessions, pay, 700)
    assert inp.psp_payment_id is None

    result = await (await start_refund(client, inp, task_queue)).result()

    assert result.status == "succeeded"
    assert [c.psp_payment_id for c in psp.calls] == [pay.psp_payment_id]
    assert [lk.payment_id for lk in psp.lookups] == [pay.id]
    assert_books_agree(sessions, psp, pay)

    del psp.by_reference[pay.id]
    lost = reserve(sessions, pay, 300)
    failed = await (await start_refund(client, lost, task_queue)).result()
    assert (failed.status, failed.failure_reason) == ("failed", "unknown")
    assert len(psp.calls) == 1
    assert_books_agree(sessions, psp, pay)
