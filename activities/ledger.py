"""Ledger posting for a captured payment, in the same DB transaction as the payment's status.

So "succeeded in the database" <=> "capture posted in the ledger": either both commit or neither.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col, select
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.payments import append_event, checked_transition
from core.ledger_store import post_txn, write_transaction
from core.refunds import lock_payment
from core.tables import LedgerEntry, LedgerTransaction, Merchant, utcnow
from domain.ledger import LedgerError, capture_txn
from domain.money import FeeSchedule, Money, MoneyError, allocate_fee
from domain.states import PaymentStatus
from workflows.contracts import Act, PostCaptureInput, PostCaptureResult

FAILED = "LedgerPostingFailed"
CAPTURED_REASON = "captured and posted to ledger"
# Statuses that can only be reached after the capture was posted: a late retry changes nothing.
AFTER_CAPTURE = {
    PaymentStatus.SUCCEEDED,
    PaymentStatus.PARTIALLY_REFUNDED,
    PaymentStatus.REFUNDED,
    PaymentStatus.DISPUTED,
}


def _fail(message: str) -> ApplicationError:
    return ApplicationError(message, type=FAILED, non_retryable=True)


def capture_key(payment_id: str) -> str:
    return f"payment:{payment_id}:capture"


def _posted_split(session: Session, key: str) -> tuple[int, int] | None:
    """(fee, net) of an already posted capture, from the stored entries: a retry reports what was
    posted even if the merchant's fee schedule changed in between."""
    if session.get(LedgerTransaction, key) is None:
        return None
    entries = session.exec(select(LedgerEntry).where(col(LedgerEntry.transaction_key) == key)).all()
    fee = -sum(e.amount for e in entries if e.account.startswith("platform_fees:"))
    net = -sum(e.amount for e in entries if e.account.startswith("merchant_payable:"))
    return fee, net


class LedgerActivities:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def activities(self) -> list[Any]:
        return [self.post_capture]

    @activity.defn(name=Act.POST_CAPTURE)
    def post_capture(self, inp: PostCaptureInput) -> PostCaptureResult:
        key = capture_key(inp.payment_id)
        with write_transaction(self.sessions) as session:
            payment = lock_payment(session, inp.payment_id)
            if payment is None:
                raise _fail(f"payment {inp.payment_id} not found")
            if payment.merchant_id != inp.merchant_id or payment.currency != inp.currency:
                raise _fail(f"payment {payment.id} does not belong to {inp.merchant_id} in {inp.currency}")
            if not 0 < inp.amount <= payment.amount:
                raise _fail(f"captured amount {inp.amount} outside 1..{payment.amount}")

            posted = _posted_split(session, key)
            if posted is not None and PaymentStatus(payment.status) in AFTER_CAPTURE:
                return PostCaptureResult(transaction_key=key, fee=posted[0], net=posted[1])
            new = checked_transition(payment.status, PaymentStatus.SUCCEEDED, error_type=FAILED)

            if posted is None:
                merchant = session.get(Merchant, inp.merchant_id)
                if merchant is None:
                    raise _fail(f"merchant {inp.merchant_id} not found")
                try:
                    split = allocate_fee(
                        Money(inp.amount, inp.currency), FeeSchedule(merchant.fee_bps, merchant.fee_fixed)
                    )
                    txn = capture_txn(payment.id, merchant.id, inp.psp, split)
                    post_txn(session, txn)  # idempotent by key; raises if a different one is there
                except (LedgerError, MoneyError) as exc:
                    raise _fail(f"cannot post capture of {payment.id}: {exc}") from exc
                fee, net = split.fee.minor, split.net.minor
            else:
                fee, net = posted

            payment.status = new.value
            payment.amount_received = inp.amount
            if inp.psp_payment_id:
                payment.psp_payment_id = inp.psp_payment_id
            payment.amount_capturable = 0
            payment.updated = utcnow()
            append_event(session, payment.id, new.value, CAPTURED_REASON)
        return PostCaptureResult(transaction_key=key, fee=fee, net=net)
