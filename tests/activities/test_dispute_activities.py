"""DisputeActivities in an ActivityEnvironment on SQLite and PostgreSQL: each database step run twice
where a retry is possible (the second run changes nothing), the ledger checked after each; the PSP
steps against a fake PSP."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col, func, select
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.disputes import DisputeActivities
from core.ids import new_id
from core.ledger_store import account_view, check_ledger, post_txn
from core.tables import (
    Dispute,
    LedgerTransaction,
    Merchant,
    Notification,
    Payment,
    PaymentEvent,
    Refund,
)
from domain.ledger import capture_txn
from domain.money import FeeSchedule, Money, allocate_fee
from psp.base import PSP, PSPDispute, PSPRejected, PSPUnavailable
from tests.factories import Seed, make_payment, seed
from workflows.contracts import (
    CloseDisputeInput,
    DisputeInput,
    DisputeNotice,
    DisputeStatusName,
    DisputeStatusUpdate,
    LookupDisputeInput,
    OpenDisputeResult,
    SubmitEvidenceInput,
)

AMOUNT = 10_000
FEE = 1_500


@dataclass
class Captured:
    base: Seed
    payment: Payment
    net: int  # what the capture left in merchant_payable (credit, so negative there)

    @property
    def merchant_id(self) -> str:
        return self.base.merchant.id


def captured_payment(
    sessions: sessionmaker[Session], amount: int = AMOUNT, chargeback_fee: int = FEE, **payment_kw: Any
) -> Captured:
    """A succeeded payment whose capture is posted, as the checkout leaves it."""
    base = seed(sessions, chargeback_fee=chargeback_fee)
    with sessions() as s, s.begin():
        payment = make_payment(
            s,
            base.method,
            amount=amount,
            status="succeeded",
            amount_received=amount,
            psp_payment_id=f"psp_pay_{new_id('x')}",
            **payment_kw,
        )
        split = allocate_fee(
            Money(amount, payment.currency), FeeSchedule(base.merchant.fee_bps, base.merchant.fee_fixed)
        )
        post_txn(s, capture_txn(payment.id, base.merchant.id, "sandbox", split))
    return Captured(base, payment, split.net.minor)


def dispute_input(c: Captured, amount: int = AMOUNT, **kw: Any) -> DisputeInput:
    values: dict[str, Any] = {
        "dispute_id": new_id("dp"),
        "payment_id": c.payment.id,
        "merchant_id": c.merchant_id,
        "psp": "sandbox",
        "psp_dispute_id": new_id("psp_dp"),
        "amount": amount,
        "currency": "usd",
        "reason": "fraudulent",
        "evidence_due_by": 0,
    }
    values.update(kw)
    return DisputeInput(**values)


def balance(sessions: sessionmaker[Session], account: str) -> int:
    with sessions() as s:
        return account_view(s, account).balance


def assert_balanced(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        check = check_ledger(s)
    assert check.balanced, check.unbalanced


def row(sessions: sessionmaker[Session], model: Any, id: str) -> Any:
    with sessions() as s:
        found = s.get(model, id)
    assert found is not None
    return found


def reasons(sessions: sessionmaker[Session], payment_id: str) -> list[str]:
    with sessions() as s:
        rows = s.exec(
            select(PaymentEvent)
            .where(col(PaymentEvent.payment_id) == payment_id)
            .order_by(col(PaymentEvent.id))
        ).all()
    return [r.reason or "" for r in rows]


def txn_count(sessions: sessionmaker[Session], prefix: str) -> int:
    with sessions() as s:
        return int(
            s.exec(
                select(func.count())
                .select_from(LedgerTransaction)
                .where(col(LedgerTransaction.key).startswith(prefix))
            ).one()
        )


@pytest.fixture
def env() -> ActivityEnvironment:
    return ActivityEnvironment()


@dataclass
class FakePSP:
    """Only the dispute half of the PSP protocol; `fail` raises on the next calls."""

    name: str = "sandbox"
    calls: list[tuple[str, str, dict[str, str] | None, str | None]] = field(default_factory=list)
    fail: Exception | None = None
    status: DisputeStatusName = "under_review"

    def _dispute(self, psp_dispute_id: str) -> PSPDispute:
        return PSPDispute(
            id=psp_dispute_id, payment_id="psp_pay_1", amount=AMOUNT, currency="usd", status=self.status
        )

    async def submit_dispute_evidence(
        self, psp_dispute_id: str, evidence: dict[str, str], *, idempotency_key: str
    ) -> PSPDispute:
        self.calls.append(("submit", psp_dispute_id, evidence, idempotency_key))
        if self.fail is not None:
            raise self.fail
        return self._dispute(psp_dispute_id)

    async def get_dispute(self, psp_dispute_id: str) -> PSPDispute:
        self.calls.append(("get", psp_dispute_id, None, None))
        if self.fail is not None:
            raise self.fail
        return self._dispute(psp_dispute_id)


@pytest.fixture
def psp() -> FakePSP:
    return FakePSP()


@pytest.fixture
def acts(sessions: sessionmaker[Session], psp: FakePSP) -> DisputeActivities:
    return DisputeActivities(sessions, {"sandbox": cast(PSP, psp)})


def opened(
    sessions: sessionmaker[Session], env: ActivityEnvironment, acts: DisputeActivities, **kw: Any
) -> tuple[Captured, DisputeInput]:
    c = captured_payment(sessions, **kw)
    inp = dispute_input(c)
    env.run(acts.open_dispute, inp)
    return c, inp


# ---- open ----


def test_open_creates_the_row_reserves_and_marks_the_payment(
    sessions: sessionmaker[Session], env: ActivityEnvironment, acts: DisputeActivities
) -> None:
    c = captured_payment(sessions)
    payable = f"merchant_payable:{c.merchant_id}:usd"
    reserve = f"dispute_reserve:{c.merchant_id}:usd"
    assert balance(sessions, payable) == -c.net
    inp = dispute_input(c, amount=4_000)

    first = env.run(acts.open_dispute, inp)
    again = env.run(acts.open_dispute, inp)  # a retry after a lost completion

    assert (
        first
        == again
        == OpenDisputeResult(reserve_key=f"dispute:{inp.dispute_id}:reserve", payment_status="disputed")
    )
    assert txn_count(sessions, f"dispute:{inp.dispute_id}:") == 1
    assert balance(sessions, payable) == -c.net + 4_000
    assert balance(sessions, reserve) == -4_000
    dispute = row(sessions, Dispute, inp.dispute_id)
    assert (dispute.status, dispute.amount, dispute.psp_dispute_id, dispute.workflow_id) == (
        "needs_response",
        4_000,
        inp.psp_dispute_id,
        f"dispute:{inp.dispute_id}",
    )
    assert (dispute.evidence_due_by - dispute.created).days == 7  # no due date from the PSP: the default
    assert row(sessions, Payment, c.payment.id).status == "disputed"
    held = f"dispute {inp.dispute_id} opened (fraudulent): 40.00 USD held"
    assert reasons(sessions, c.payment.id)[-1] == held
    assert_balanced(sessions)


def test_open_uses_the_row_the_webhook_inserted(
    sessions: sessionmaker[Session], env: ActivityEnvironment, acts: DisputeActivities
) -> None:
    from api.routes.psp_webhooks import dispute_row

    c = captured_payment(sessions)
    inp = dispute_input(c, evidence_due_by=1_900_000_000)
    with sessions() as s, s.begin():
        s.add(dispute_row(inp))
    env.run(acts.open_dispute, inp)
    with sessions() as s:
        assert s.exec(select(func.count()).select_from(Dispute)).one() == 1
    assert int(row(sessions, Dispute, inp.dispute_id).evidence_due_by.timestamp()) == 1_900_000_000


def test_open_waits_for_a_payment_whose_capture_is_not_posted(
    sessions: sessionmaker[Session], env: ActivityEnvironment, acts: DisputeActivities
) -> None:
    base = seed(sessions)
    with sessions() as s, s.begin():
        payment = make_payment(s, base.method, status="processing")
    c = Captured(base, payment, 0)
    with pytest.raises(ApplicationError) as info:
        env.run(acts.open_dispute, dispute_input(c))
    assert (info.value.type, info.value.non_retryable) == ("PaymentNotSettled", False)
    with sessions() as s:  # rolled back: no row, no posting
        assert s.exec(select(func.count()).select_from(Dispute)).one() == 0
    assert_balanced(sessions)


@pytest.mark.parametrize(
    ("status", "amount", "error"),
    [("failed", AMOUNT, "DisputeRejected"), ("succeeded", AMOUNT + 1, "DisputeRejected")],
)
def test_open_refuses_what_cannot_be_disputed(
    sessions: sessionmaker[Session],
    env: ActivityEnvironment,
    acts: DisputeActivities,
    status: str,
    amount: int,
    error: str,
) -> None:
    base = seed(sessions)
    with sessions() as s, s.begin():
        payment = make_payment(
            s, base.method, status=status, amount_received=AMOUNT if status == "succeeded" else 0
        )
    with pytest.raises(ApplicationError) as info:
        env.run(acts.open_dispute, dispute_input(Captured(base, payment, 0), amount=amount))
    assert (info.value.type, info.value.non_retryable) == (error, True)
    assert txn_count(sessions, "dispute:") == 0


# ---- evidence ----


def test_update_to_under_review_stores_the_evidence(
    sessions: sessionmaker[Session], env: ActivityEnvironment, acts: DisputeActivities
) -> None:
    c, inp = opened(sessions, env, acts)
    upd = DisputeStatusUpdate(
        dispute_id=inp.dispute_id,
        status="under_review",
        evidence={"receipt": "r-1"},
        note="evidence submitted",
    )
    env.run(acts.update_dispute, upd)
    env.run(acts.update_dispute, upd)
    dispute = row(sessions, Dispute, inp.dispute_id)
    assert (dispute.status, dispute.evidence) == ("under_review", {"receipt": "r-1"})
    assert reasons(sessions, c.payment.id).count("evidence submitted") == 1
    with pytest.raises(ApplicationError) as info:  # an outcome goes through close_dispute, with money
        env.run(acts.update_dispute, DisputeStatusUpdate(dispute_id=inp.dispute_id, status="won"))
    assert info.value.non_retryable


# ---- outcome ----


def test_won_releases_the_reserve_and_restores_the_payment(
    sessions: sessionmaker[Session], env: ActivityEnvironment, acts: DisputeActivities
) -> None:
    c, inp = opened(sessions, env, acts)
    payable = f"merchant_payable:{c.merchant_id}:usd"
    close = CloseDisputeInput(dispute_id=inp.dispute_id, outcome="won")
    first = env.run(acts.close_dispute, close)
    again = env.run(acts.close_dispute, close)
    assert first == again
    assert (first.transaction_key, first.chargeback_fee, first.payment_status) == (
        f"dispute:{inp.dispute_id}:release",
        0,
        "succeeded",
    )
    assert balance(sessions, payable) == -c.net  # as before the dispute
    assert balance(sessions, f"dispute_reserve:{c.merchant_id}:usd") == 0
    assert row(sessions, Dispute, inp.dispute_id).status == "won"
    assert row(sessions, Payment, c.payment.id).status == "succeeded"
    assert_balanced(sessions)


def test_won_after_a_partial_refund_returns_to_partially_refunded(
    sessions: sessionmaker[Session], env: ActivityEnvironment, acts: DisputeActivities
) -> None:
    c, inp = opened(sessions, env, acts)
    with sessions() as s, s.begin():
        s.add(
            Refund(
                id=new_id("re"),
                merchant_id=c.merchant_id,
                payment_id=c.payment.id,
                amount=2_000,
                currency="usd",
                status="succeeded",
                workflow_id="refund:x",
            )
        )
    res = env.run(acts.close_dispute, CloseDisputeInput(dispute_id=inp.dispute_id, outcome="won"))
    assert res.payment_status == "partially_refunded"


def test_lost_charges_back_and_takes_the_fee(
    sessions: sessionmaker[Session], env: ActivityEnvironment, acts: DisputeActivities
) -> None:
    c, inp = opened(sessions, env, acts)
    fees_before = balance(sessions, "platform_fees:usd")
    receivable_before = balance(sessions, "psp_receivable:sandbox:usd")
    close = CloseDisputeInput(dispute_id=inp.dispute_id, outcome="lost")
    first = env.run(acts.close_dispute, close)
    with sessions() as s, s.begin():  # the merchant's fee changes; a retry reports what was posted
        merchant = s.get(Merchant, c.merchant_id)
        assert merchant is not None
        merchant.chargeback_fee = 9_999
    again = env.run(acts.close_dispute, close)
    assert first == again
    assert (first.transaction_key, first.chargeback_fee, first.payment_status) == (
        f"dispute:{inp.dispute_id}:lost",
        FEE,
        "disputed",
    )
    assert balance(sessions, f"dispute_reserve:{c.merchant_id}:usd") == 0
    assert balance(sessions, "psp_receivable:sandbox:usd") == receivable_before - AMOUNT
    assert balance(sessions, "platform_fees:usd") == fees_before - FEE
    # the merchant keeps nothing of the payment and owes the fee on top
    assert balance(sessions, f"merchant_payable:{c.merchant_id}:usd") == -c.net + AMOUNT + FEE
    assert row(sessions, Dispute, inp.dispute_id).status == "lost"
    assert reasons(sessions, c.payment.id)[-1].endswith("charged back, chargeback fee 15.00 USD")
    assert_balanced(sessions)


def test_an_outcome_cannot_be_reversed(
    sessions: sessionmaker[Session], env: ActivityEnvironment, acts: DisputeActivities
) -> None:
    _, inp = opened(sessions, env, acts)
    env.run(acts.close_dispute, CloseDisputeInput(dispute_id=inp.dispute_id, outcome="won"))
    with pytest.raises(ApplicationError) as info:
        env.run(acts.close_dispute, CloseDisputeInput(dispute_id=inp.dispute_id, outcome="lost"))
    assert (info.value.type, info.value.non_retryable) == ("InvalidTransition", True)
    assert txn_count(sessions, f"dispute:{inp.dispute_id}:lost") == 0
    assert_balanced(sessions)


# ---- notices ----


def test_notices_are_recorded_once_per_kind(
    sessions: sessionmaker[Session], env: ActivityEnvironment, acts: DisputeActivities
) -> None:
    c, inp = opened(sessions, env, acts)
    env.run(acts.notify_dispute, DisputeNotice(dispute_id=inp.dispute_id, kind="dispute_opened"))
    env.run(acts.notify_dispute, DisputeNotice(dispute_id=inp.dispute_id, kind="dispute_opened"))
    env.run(acts.notify_dispute, DisputeNotice(dispute_id=inp.dispute_id, kind="dispute_lost"))
    with sessions() as s:
        rows = s.exec(
            select(Notification)
            .where(col(Notification.payment_id) == c.payment.id)
            .order_by(col(Notification.id))
        ).all()
    assert [(n.kind, n.channel, n.recipient) for n in rows] == [
        ("dispute_opened", "merchant", c.merchant_id),
        ("dispute_lost", "merchant", c.merchant_id),
    ]
    assert "evidence due" in rows[0].subject
    assert reasons(sessions, c.payment.id).count("merchant notified: dispute opened") == 1


# ---- PSP ----


async def test_evidence_goes_to_the_psp_with_a_stable_key(acts: DisputeActivities, psp: FakePSP) -> None:
    inp = SubmitEvidenceInput(
        dispute_id="dp_1", psp="sandbox", psp_dispute_id="dp_psp_1", evidence={"receipt": "r"}
    )
    res = await ActivityEnvironment().run(acts.submit_dispute_evidence, inp)
    await ActivityEnvironment().run(acts.submit_dispute_evidence, inp)
    assert (res.psp_dispute_id, res.status) == ("dp_psp_1", "under_review")
    assert psp.calls == [("submit", "dp_psp_1", {"receipt": "r"}, "dp_1:evidence")] * 2


@pytest.mark.parametrize(
    ("error", "type_", "non_retryable"),
    [
        (PSPRejected("closed", code="dispute_unexpected_state"), "PSPRejected", True),
        (PSPUnavailable("503"), "PSPUnavailable", False),
    ],
)
async def test_psp_errors_map_to_retry_decisions(
    acts: DisputeActivities, psp: FakePSP, error: Exception, type_: str, non_retryable: bool
) -> None:
    psp.fail = error
    with pytest.raises(ApplicationError) as info:
        await ActivityEnvironment().run(
            acts.lookup_psp_dispute, LookupDisputeInput(psp="sandbox", psp_dispute_id="dp_psp_1")
        )
    assert (info.value.type, info.value.non_retryable) == (type_, non_retryable)


async def test_unknown_psp_is_not_retried(acts: DisputeActivities) -> None:
    with pytest.raises(ApplicationError) as info:
        await ActivityEnvironment().run(
            acts.lookup_psp_dispute, LookupDisputeInput(psp="nope", psp_dispute_id="x")
        )
    assert (info.value.type, info.value.non_retryable) == ("UnknownPSP", True)
