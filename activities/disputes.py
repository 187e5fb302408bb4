"""DisputeWorkflow activities: the dispute row, its ledger postings and the payment's status (each
change one DB transaction), the merchant notice, and the PSP calls (evidence, look-up).

Every activity is idempotent: Temporal retries an attempt whose answer was lost after the commit.
The ledger postings are idempotent by key, and each one commits together with the dispute and
payment statuses it explains, so "dispute lost in the database" <=> "loss posted in the ledger".
Rows are locked payment first, then dispute, in every activity (no lock-order deadlock).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col, select
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.payments import append_event, checked_transition, not_found
from activities.psp import to_application_error
from core.ledger_store import post_txn, write_transaction
from core.refunds import lock_payment
from core.tables import (
    Dispute,
    LedgerEntry,
    LedgerTransaction,
    Merchant,
    Notification,
    Payment,
    Refund,
    utcnow,
)
from domain.disputes import (
    DEFAULT_EVIDENCE_WINDOW,
    OUTCOMES,
    DisputeError,
    DisputeStatus,
    lost_key,
    lost_txn,
    refund_status,
    release_key,
    release_txn,
    reserve_key,
    reserve_txn,
    transition,
)
from domain.ledger import LedgerError
from domain.money import Money, MoneyError
from domain.states import PaymentStatus
from psp.base import PSP, PSPDispute, PSPError
from workflows.contracts import (
    CloseDisputeInput,
    CloseDisputeResult,
    DisputeAct,
    DisputeInput,
    DisputeNotice,
    DisputeStatusUpdate,
    LookupDisputeInput,
    OpenDisputeResult,
    PSPDisputeResult,
    SubmitEvidenceInput,
    dispute_workflow_id,
)

log = logging.getLogger("paysaga.disputes")

REJECTED = "DisputeRejected"  # non-retryable: the input contradicts the database
NOT_SETTLED = "PaymentNotSettled"  # retryable: the capture is not posted yet
S = PaymentStatus
DISPUTABLE = {S.SUCCEEDED, S.PARTIALLY_REFUNDED, S.DISPUTED}
NOT_SETTLED_YET = {S.PROCESSING, S.REQUIRES_ACTION, S.REQUIRES_CAPTURE}
OPEN = (DisputeStatus.NEEDS_RESPONSE.value, DisputeStatus.UNDER_REVIEW.value)

_NOTICE_LABEL = {
    "dispute_opened": "dispute opened",
    "dispute_won": "dispute won",
    "dispute_lost": "dispute lost",
}


def _reject(message: str, type: str = REJECTED) -> ApplicationError:
    return ApplicationError(message, type=type, non_retryable=True)


def _lock_dispute(session: Session, dispute_id: str) -> Dispute | None:
    return session.exec(select(Dispute).where(col(Dispute.id) == dispute_id).with_for_update()).first()


def _lock_payment_of(session: Session, dispute_id: str) -> tuple[Payment, Dispute]:
    """Payment then dispute, both locked (the dispute row names its payment)."""
    found = session.get(Dispute, dispute_id)
    if found is None:
        raise not_found(f"dispute {dispute_id}")
    payment = lock_payment(session, found.payment_id)
    dispute = _lock_dispute(session, dispute_id)
    if payment is None or dispute is None:
        raise not_found(f"payment of dispute {dispute_id}")
    return payment, dispute


def _amount(dispute: Dispute) -> Money:
    try:
        return Money(dispute.amount, dispute.currency)
    except MoneyError as exc:
        raise _reject(f"dispute {dispute.id}: {exc}") from exc


def _due_by(inp: DisputeInput, now: datetime) -> datetime:
    if inp.evidence_due_by > 0:
        return datetime.fromtimestamp(inp.evidence_due_by, UTC)
    return now + DEFAULT_EVIDENCE_WINDOW


def new_dispute_row(inp: DisputeInput) -> Dispute:
    """The disputes row for a workflow input (the webhook receiver inserts the same one)."""
    now = utcnow()
    return Dispute(
        id=inp.dispute_id,
        merchant_id=inp.merchant_id,
        payment_id=inp.payment_id,
        psp=inp.psp,
        psp_dispute_id=inp.psp_dispute_id,
        amount=inp.amount,
        currency=inp.currency,
        reason=inp.reason,
        status=DisputeStatus.NEEDS_RESPONSE.value,
        evidence={},
        evidence_due_by=_due_by(inp, now),
        workflow_id=dispute_workflow_id(inp.dispute_id),
        created=now,
        updated=now,
    )


def _refunded(session: Session, payment_id: str) -> int:
    total = session.exec(
        select(func.coalesce(func.sum(col(Refund.amount)), 0)).where(
            col(Refund.payment_id) == payment_id, col(Refund.status) == "succeeded"
        )
    ).one()
    return int(total)


def _other_open_disputes(session: Session, payment_id: str, dispute_id: str) -> bool:
    row = session.exec(
        select(Dispute.id).where(
            col(Dispute.payment_id) == payment_id,
            col(Dispute.id) != dispute_id,
            col(Dispute.status).in_(OPEN),
        )
    ).first()
    return row is not None


def _posted_fee(session: Session, key: str) -> int:
    entries = session.exec(select(LedgerEntry).where(col(LedgerEntry.transaction_key) == key)).all()
    return -sum(e.amount for e in entries if e.account.startswith("platform_fees:"))


def _psp_result(d: PSPDispute) -> PSPDisputeResult:
    return PSPDisputeResult(psp_dispute_id=d.id, status=d.status, amount=d.amount)


class DisputeActivities:
    def __init__(self, sessions: sessionmaker[Session], psps: Mapping[str, PSP]) -> None:
        self.sessions = sessions
        self._psps = psps

    def activities(self) -> list[Any]:
        return [
            self.open_dispute,
            self.update_dispute,
            self.close_dispute,
            self.notify_dispute,
            self.submit_dispute_evidence,
            self.lookup_psp_dispute,
        ]

    # ---- database ----

    @activity.defn(name=DisputeAct.OPEN_DISPUTE)
    def open_dispute(self, inp: DisputeInput) -> OpenDisputeResult:
        """Dispute row (created if the webhook receiver has not committed it), reserve posting and
        payment -> disputed, in one transaction."""
        key = reserve_key(inp.dispute_id)
        try:
            with write_transaction(self.sessions) as session:
                payment = lock_payment(session, inp.payment_id)
                if payment is None:
                    raise not_found(f"payment {inp.payment_id}")
                if payment.merchant_id != inp.merchant_id or payment.currency != inp.currency:
                    raise _reject(f"payment {payment.id} is not {inp.merchant_id}'s in {inp.currency}")
                dispute = _lock_dispute(session, inp.dispute_id)
                if dispute is None:
                    dispute = new_dispute_row(inp)
                    session.add(dispute)
                    session.flush()
                if dispute.payment_id != payment.id or dispute.amount != inp.amount:
                    raise _reject(f"dispute {dispute.id} does not match its workflow input")

                if session.get(LedgerTransaction, key) is not None:
                    return OpenDisputeResult(reserve_key=key, payment_status=payment.status)  # a retry
                status = S(payment.status)
                if status in NOT_SETTLED_YET:
                    # The capture's posting has not committed yet; it will (or the payment fails,
                    # and then the next attempt says so).
                    raise ApplicationError(f"payment {payment.id} is still {status}", type=NOT_SETTLED)
                if status not in DISPUTABLE:
                    raise _reject(f"payment {payment.id} is {status}; it cannot be disputed")
                if not 0 < inp.amount <= payment.amount_received:
                    raise _reject(f"disputed amount {inp.amount} outside 1..{payment.amount_received}")
                amount = _amount(dispute)
                try:
                    post_txn(session, reserve_txn(dispute.id, payment.merchant_id, amount))
                except LedgerError as exc:
                    raise _reject(f"cannot post the reserve of {dispute.id}: {exc}") from exc
                new = checked_transition(payment.status, S.DISPUTED)
                payment.status = new.value
                payment.updated = utcnow()
                append_event(
                    session,
                    payment.id,
                    new.value,
                    f"dispute {dispute.id} opened ({dispute.reason or 'no reason given'}): "
                    f"{amount.format()} held",
                )
                return OpenDisputeResult(reserve_key=key, payment_status=new.value)
        except IntegrityError as exc:
            # The webhook receiver inserted the same dispute row at the same moment: retry, the
            # next attempt finds it.
            raise ApplicationError(f"dispute {inp.dispute_id}: concurrent insert", type="Conflict") from exc

    @activity.defn(name=DisputeAct.UPDATE_DISPUTE)
    def update_dispute(self, upd: DisputeStatusUpdate) -> None:
        """A status change that moves no money (evidence submitted -> under_review)."""
        new = DisputeStatus(upd.status)
        if new in OUTCOMES:
            raise _reject("an outcome is recorded by close_dispute, with its posting")
        with write_transaction(self.sessions) as session:
            payment, dispute = _lock_payment_of(session, upd.dispute_id)
            current = DisputeStatus(dispute.status)
            if current in OUTCOMES:
                return  # closed meanwhile (a late retry): the outcome stands
            try:
                transition(current, new)
            except DisputeError as exc:
                raise _reject(str(exc), "InvalidTransition") from exc
            if upd.evidence is not None:
                dispute.evidence = dict(upd.evidence)
            dispute.status = new.value
            dispute.updated = utcnow()
            if upd.note:
                append_event(session, payment.id, payment.status, upd.note)

    @activity.defn(name=DisputeAct.CLOSE_DISPUTE)
    def close_dispute(self, inp: CloseDisputeInput) -> CloseDisputeResult:
        """The outcome: won -> reserve released, payment back to its status before the dispute;
        lost -> the PSP keeps the amount and the merchant pays the chargeback fee. One transaction
        with the dispute and payment statuses."""
        outcome = DisputeStatus(inp.outcome)
        if outcome not in OUTCOMES:
            raise _reject(f"{inp.outcome} is not an outcome")
        key = release_key(inp.dispute_id) if outcome is DisputeStatus.WON else lost_key(inp.dispute_id)
        with write_transaction(self.sessions) as session:
            payment, dispute = _lock_payment_of(session, inp.dispute_id)
            if dispute.status == outcome.value and session.get(LedgerTransaction, key) is not None:
                # a retry: report what was posted
                return CloseDisputeResult(
                    transaction_key=key,
                    chargeback_fee=_posted_fee(session, key),
                    payment_status=payment.status,
                )
            try:
                transition(DisputeStatus(dispute.status), outcome)
            except DisputeError as exc:
                raise _reject(str(exc), "InvalidTransition") from exc
            if session.get(LedgerTransaction, reserve_key(dispute.id)) is None:
                raise _reject(f"dispute {dispute.id} has no reserve to settle")
            amount = _amount(dispute)
            fee = 0
            try:
                if outcome is DisputeStatus.WON:
                    txn = release_txn(dispute.id, dispute.merchant_id, amount)
                else:
                    merchant = session.get(Merchant, dispute.merchant_id)
                    if merchant is None:
                        raise not_found(f"merchant {dispute.merchant_id}")
                    fee = merchant.chargeback_fee
                    txn = lost_txn(
                        dispute.id, dispute.merchant_id, dispute.psp, amount, Money(fee, amount.currency)
                    )
                post_txn(session, txn)
            except (LedgerError, MoneyError) as exc:
                raise _reject(f"cannot post the outcome of {dispute.id}: {exc}") from exc

            dispute.status = outcome.value
            dispute.updated = utcnow()
            status = payment.status
            if (
                outcome is DisputeStatus.WON
                and payment.status == S.DISPUTED
                and not _other_open_disputes(session, payment.id, dispute.id)
            ):
                status = refund_status(payment.amount_received, _refunded(session, payment.id))
            new = checked_transition(payment.status, status)
            payment.status = new.value
            payment.updated = utcnow()
            if outcome is DisputeStatus.WON:
                reason = f"dispute {dispute.id} won: {amount.format()} released"
            else:
                reason = f"dispute {dispute.id} lost: {amount.format()} charged back"
                if fee:
                    reason += f", chargeback fee {Money(fee, amount.currency).format()}"
            append_event(session, payment.id, new.value, reason)
            return CloseDisputeResult(transaction_key=key, chargeback_fee=fee, payment_status=new.value)

    @activity.defn(name=DisputeAct.NOTIFY_DISPUTE)
    def notify_dispute(self, inp: DisputeNotice) -> None:
        """Tell the merchant. There are no merchant webhooks yet: the notice is a notifications row
        (channel "merchant") plus a timeline entry, once per (payment, kind)."""
        label = _NOTICE_LABEL.get(inp.kind)
        if label is None:
            raise _reject(f"unknown dispute notice {inp.kind!r}", "InvalidInput")
        try:
            with write_transaction(self.sessions) as session:
                dispute = session.get(Dispute, inp.dispute_id)
                if dispute is None:
                    raise not_found(f"dispute {inp.dispute_id}")
                if self._noticed(session, dispute.payment_id, inp.kind):
                    return
                amount = _amount(dispute).format()
                if inp.kind == "dispute_opened":
                    due = dispute.evidence_due_by.date().isoformat()
                    subject = f"Dispute {dispute.id}: {amount} on {dispute.payment_id}, evidence due {due}"
                else:
                    subject = f"Dispute {dispute.id} {inp.kind.removeprefix('dispute_')}: {amount}"
                session.add(
                    Notification(
                        payment_id=dispute.payment_id,
                        kind=inp.kind,
                        channel="merchant",
                        recipient=dispute.merchant_id,
                        subject=subject[:200],
                        status="logged",
                    )
                )
                payment = session.get(Payment, dispute.payment_id)
                if payment is not None:
                    append_event(session, payment.id, payment.status, f"merchant notified: {label}")
            log.info("dispute notice %s for %s recorded", inp.kind, inp.dispute_id)
        except IntegrityError:
            # a concurrent attempt recorded it first: the unique (payment_id, kind) says it is done
            with self.sessions() as session:
                found = session.get(Dispute, inp.dispute_id)
                if found is None or not self._noticed(session, found.payment_id, inp.kind):
                    raise

    @staticmethod
    def _noticed(session: Session, payment_id: str, kind: str) -> bool:
        row = session.exec(
            select(Notification.id).where(
                col(Notification.payment_id) == payment_id, col(Notification.kind) == kind
            )
        ).first()
        return row is not None

    # ---- PSP ----

    def _psp(self, name: str) -> PSP:
        try:
            return self._psps[name]
        except KeyError:
            raise _reject(f"unknown PSP {name!r}", "UnknownPSP") from None

    @activity.defn(name=DisputeAct.SUBMIT_DISPUTE_EVIDENCE)
    async def submit_dispute_evidence(self, inp: SubmitEvidenceInput) -> PSPDisputeResult:
        psp = self._psp(inp.psp)
        try:
            # One key per dispute: a retry after a lost answer is the same submission to the PSP.
            found = await psp.submit_dispute_evidence(
                inp.psp_dispute_id, dict(inp.evidence), idempotency_key=f"{inp.dispute_id}:evidence"
            )
        except PSPError as e:
            raise to_application_error(e) from e
        return _psp_result(found)

    @activity.defn(name=DisputeAct.LOOKUP_PSP_DISPUTE)
    async def lookup_psp_dispute(self, inp: LookupDisputeInput) -> PSPDisputeResult:
        psp = self._psp(inp.psp)
        try:
            found = await psp.get_dispute(inp.psp_dispute_id)
        except PSPError as e:
            raise to_application_error(e) from e
        return _psp_result(found)
