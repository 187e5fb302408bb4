"""DisputeWorkflow on the time-skipping test server with the REAL database activities (SQLite) and a
fake PSP that decides like the sandbox (defended wins, conceded loses). After every scenario the
whole ledger is checked: balanced, the reserve empty, the merchant's balance where it should be."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col, select
from temporalio.client import WorkflowHandle, WorkflowUpdateFailedError
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer, Worker

from activities.disputes import DisputeActivities
from core.db import make_engine, session_factory
from core.ledger_store import account_view, check_ledger
from core.migrate import upgrade
from core.tables import Dispute, Notification, Payment
from psp.base import PSP, PSPDispute, PSPRejected
from tests.activities.test_dispute_activities import AMOUNT, FEE, Captured, captured_payment
from workflows.contracts import (
    DisputeInput,
    DisputeOutcome,
    DisputeResult,
    DisputeState,
    DisputeStatusName,
    DisputeUpd,
    EvidenceRequest,
    dispute_workflow_id,
)
from workflows.dispute import OUTCOME_FIRST_POLL, DisputeWorkflow

EVIDENCE = {"receipt": "rcpt-8841", "shipping_tracking_number": "1Z999AA10123456784"}


@dataclass
class FakePSP:
    """The sandbox's dispute rules in memory. `webhooks` False: the outcome is only learnt by polling."""

    name: str = "sandbox"
    status: DisputeStatusName = "needs_response"
    submitted: list[dict[str, str]] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    lookups: int = 0
    reject_submission: bool = False

    def _dispute(self, psp_dispute_id: str) -> PSPDispute:
        return PSPDispute(
            id=psp_dispute_id, payment_id="psp_pay", amount=AMOUNT, currency="usd", status=self.status
        )

    async def submit_dispute_evidence(
        self, psp_dispute_id: str, evidence: dict[str, str], *, idempotency_key: str
    ) -> PSPDispute:
        self.keys.append(idempotency_key)
        if self.reject_submission or self.status != "needs_response":
            raise PSPRejected("This dispute is closed.", code="dispute_unexpected_state")
        self.submitted.append(dict(evidence))
        answer = self._dispute(psp_dispute_id)
        self.status = "won" if any(v.strip() for v in evidence.values()) else "lost"
        return PSPDispute(**{**answer.__dict__, "status": "under_review"})

    async def get_dispute(self, psp_dispute_id: str) -> PSPDispute:
        self.lookups += 1
        return self._dispute(psp_dispute_id)


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    url = f"sqlite:///{tmp_path / 'app.db'}"
    upgrade(url)
    engine = make_engine(url)
    yield session_factory(engine)
    engine.dispose()


@pytest.fixture
def psp() -> FakePSP:
    return FakePSP()


@pytest.fixture
async def task_queue(
    env: WorkflowEnvironment, sessions: sessionmaker[Session], psp: FakePSP
) -> AsyncIterator[str]:
    queue = f"dispute-test-{uuid.uuid4()}"
    acts = DisputeActivities(sessions, {"sandbox": cast(PSP, psp)})
    with ThreadPoolExecutor(max_workers=4) as executor:
        async with Worker(
            env.client,
            task_queue=queue,
            workflows=[DisputeWorkflow],
            activities=acts.activities(),
            activity_executor=executor,
        ):
            yield queue


@dataclass
class Case:
    captured: Captured
    inp: DisputeInput
    handle: WorkflowHandle[Any, DisputeResult]


async def open_case(
    env: WorkflowEnvironment, sessions: sessionmaker[Session], task_queue: str, **kw: Any
) -> Case:
    c = captured_payment(sessions)
    # the PSP's due date, by the test server's clock (earlier tests have moved it ahead of ours)
    due = int((await env.get_current_time() + timedelta(days=7)).timestamp())
    client = env.client
    inp = DisputeInput(
        dispute_id=f"dp_{uuid.uuid4().hex[:20]}",
        payment_id=c.payment.id,
        merchant_id=c.merchant_id,
        psp="sandbox",
        psp_dispute_id=f"dp_psp_{uuid.uuid4().hex[:12]}",
        amount=AMOUNT,
        currency="usd",
        reason="product_not_received",
        evidence_due_by=kw.pop("evidence_due_by", due),
    )
    handle = await client.start_workflow(
        DisputeWorkflow.run,
        inp,
        id=dispute_workflow_id(inp.dispute_id),
        task_queue=task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        execution_timeout=timedelta(days=120),  # a stuck test ends here (skipped time), not never
    )
    return Case(c, inp, handle)


async def submit(case: Case, evidence: dict[str, str]) -> DisputeState:
    state: DisputeState = await case.handle.execute_update(
        DisputeUpd.SUBMIT_EVIDENCE, EvidenceRequest(evidence=evidence), result_type=DisputeState
    )
    return state


async def until(check: Any, what: str) -> None:
    for _ in range(200):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def balances(sessions: sessionmaker[Session], merchant_id: str) -> dict[str, int]:
    accounts = {
        "merchant_payable": f"merchant_payable:{merchant_id}:usd",
        "dispute_reserve": f"dispute_reserve:{merchant_id}:usd",
        "psp_receivable": "psp_receivable:sandbox:usd",
        "platform_fees": "platform_fees:usd",
    }
    with sessions() as s:
        return {name: account_view(s, account).balance for name, account in accounts.items()}


def assert_ledger(sessions: sessionmaker[Session], case: Case, *, lost: bool) -> None:
    """Balanced; the reserve is empty; the merchant is back where the capture left it (won) or gave
    the amount back and paid the fee (lost)."""
    with sessions() as s:
        check = check_ledger(s)
    assert check.balanced, check.unbalanced
    got = balances(sessions, case.captured.merchant_id)
    assert got["dispute_reserve"] == 0
    net, fee = case.captured.net, AMOUNT - case.captured.net
    if lost:
        assert got["merchant_payable"] == -net + AMOUNT + FEE
        assert got["psp_receivable"] == 0  # the PSP kept what it owed us
        assert got["platform_fees"] == -fee - FEE
    else:
        assert got["merchant_payable"] == -net
        assert got["psp_receivable"] == AMOUNT
        assert got["platform_fees"] == -fee


def dispute_row(sessions: sessionmaker[Session], dispute_id: str) -> Dispute:
    with sessions() as s:
        found = s.get(Dispute, dispute_id)
    assert found is not None
    return found


def payment_status(sessions: sessionmaker[Session], payment_id: str) -> str:
    with sessions() as s:
        found = s.get(Payment, payment_id)
    assert found is not None
    return found.status


def notices(sessions: sessionmaker[Session], payment_id: str) -> list[str]:
    with sessions() as s:
        rows = s.exec(
            select(Notification)
            .where(col(Notification.payment_id) == payment_id)
            .order_by(col(Notification.id))
        ).all()
    return [n.kind for n in rows]


async def assert_replays(handle: WorkflowHandle[Any, Any]) -> None:
    replayer = Replayer(workflows=[DisputeWorkflow], data_converter=pydantic_data_converter)
    await replayer.replay_workflow(await handle.fetch_history())


# ---------------------------------------------------------------- scenarios


async def test_dispute_won_with_evidence(
    env: WorkflowEnvironment, sessions: sessionmaker[Session], task_queue: str, psp: FakePSP
) -> None:
    case = await open_case(env, sessions, task_queue)

    state = await submit(case, EVIDENCE)
    assert (state.status, state.evidence_submitted) == ("under_review", True)
    assert psp.submitted == [EVIDENCE]
    assert psp.keys == [f"{case.inp.dispute_id}:evidence"]
    row = dispute_row(sessions, case.inp.dispute_id)
    assert (row.status, row.evidence) == ("under_review", EVIDENCE)
    assert payment_status(sessions, case.captured.payment.id) == "disputed"

    # the PSP's dispute.closed webhook, as the receiver signals it (delivered twice: no harm)
    for _ in range(2):
        await case.handle.signal(DisputeUpd.OUTCOME, DisputeOutcome(status="won", event_id="evt_1"))
    result = await case.handle.result()

    assert result == DisputeResult(dispute_id=case.inp.dispute_id, status="won", chargeback_fee=0)
    assert dispute_row(sessions, case.inp.dispute_id).status == "won"
    assert payment_status(sessions, case.captured.payment.id) == "succeeded"
    assert notices(sessions, case.captured.payment.id) == ["dispute_opened", "dispute_won"]
    assert psp.lookups == 0  # the webhook came: no polling
    assert_ledger(sessions, case, lost=False)
    await assert_replays(case.handle)


async def test_dispute_lost_despite_evidence(
    env: WorkflowEnvironment, sessions: sessionmaker[Session], task_queue: str, psp: FakePSP
) -> None:
    case = await open_case(env, sessions, task_queue)
    await submit(case, {"uncategorized_text": "the customer signed for it"})
    await case.handle.signal(DisputeUpd.OUTCOME, DisputeOutcome(status="lost", event_id="evt_2"))
    result = await case.handle.result()

    assert result == DisputeResult(dispute_id=case.inp.dispute_id, status="lost", chargeback_fee=FEE)
    assert dispute_row(sessions, case.inp.dispute_id).status == "lost"
    assert payment_status(sessions, case.captured.payment.id) == "disputed"
    assert notices(sessions, case.captured.payment.id) == ["dispute_opened", "dispute_lost"]
    assert_ledger(sessions, case, lost=True)


async def test_no_evidence_by_the_deadline_is_submitted_empty_and_lost(
    env: WorkflowEnvironment, sessions: sessionmaker[Session], task_queue: str, psp: FakePSP
) -> None:
    """No evidence and no webhook: the deadline timer (7 days) submits an empty response, and the
    outcome is found by polling the PSP."""
    case = await open_case(env, sessions, task_queue)
    result = await case.handle.result()  # time skips through the deadline and the first poll

    assert result.status == "lost" and result.chargeback_fee == FEE
    assert psp.submitted == [{}]
    assert psp.lookups == 1
    row = dispute_row(sessions, case.inp.dispute_id)
    assert (row.status, row.evidence) == ("lost", {})
    history = [e async for e in case.handle.fetch_history_events()]
    timers = [
        e.timer_started_event_attributes for e in history if e.HasField("timer_started_event_attributes")
    ]
    deadline = timers[0].start_to_fire_timeout.ToTimedelta()
    assert timedelta(days=6, hours=23) < deadline <= timedelta(days=7)
    assert timers[1].start_to_fire_timeout.ToTimedelta() == OUTCOME_FIRST_POLL
    assert_ledger(sessions, case, lost=True)
    await assert_replays(case.handle)


async def test_outcome_before_any_evidence_skips_the_submission(
    env: WorkflowEnvironment, sessions: sessionmaker[Session], task_queue: str, psp: FakePSP
) -> None:
    """The PSP closed the dispute on its own (forced outcome): nothing is submitted."""
    case = await open_case(env, sessions, task_queue)
    await case.handle.signal(DisputeUpd.OUTCOME, DisputeOutcome(status="won"))
    result = await case.handle.result()
    assert result.status == "won"
    assert psp.submitted == [] and psp.keys == []
    assert_ledger(sessions, case, lost=False)


async def test_refused_submission_takes_the_psps_outcome(
    env: WorkflowEnvironment, sessions: sessionmaker[Session], task_queue: str, psp: FakePSP
) -> None:
    """The PSP refuses the evidence because it closed the dispute meanwhile: its view decides."""
    psp.reject_submission = True
    psp.status = "lost"
    case = await open_case(env, sessions, task_queue, evidence_due_by=1)  # deadline long past
    result = await case.handle.result()
    assert result.status == "lost"
    assert psp.lookups == 1
    assert_ledger(sessions, case, lost=True)


async def test_evidence_is_validated_and_accepted_once(
    env: WorkflowEnvironment, sessions: sessionmaker[Session], task_queue: str, psp: FakePSP
) -> None:
    case = await open_case(env, sessions, task_queue)
    for bad in ({}, {"receipt": "   "}, {"reciept": "typo"}):
        with pytest.raises(WorkflowUpdateFailedError) as info:
            await submit(case, bad)
        assert isinstance(info.value.cause, ApplicationError)
        assert info.value.cause.type == "InvalidRequest"
    await submit(case, EVIDENCE)
    with pytest.raises(WorkflowUpdateFailedError) as info:
        await submit(case, {"receipt": "second try"})
    assert isinstance(info.value.cause, ApplicationError) and info.value.cause.type == "InvalidState"
    assert psp.submitted == [EVIDENCE]

    async def closed() -> bool:
        return psp.status == "won"

    await until(closed, "the fake PSP's decision")
    result = await case.handle.result()  # no webhook: found by polling
    assert result.status == "won" and psp.lookups == 1
    assert_ledger(sessions, case, lost=False)
