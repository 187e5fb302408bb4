"""Refunds and returns in the database: settling a refund (ledger reversal + statuses, one
transaction) and the return steps (receive + restock, the return's refund, expiry).

Reserving a refund, and the payment row lock that serialises every write changing what is
refundable, live in core/refunds.py: the API reserves refunds too. Settling follows the same rule:
lock the payment row first.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, update
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col, select
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.ledger import capture_key
from activities.payments import append_event, checked_transition, not_found
from core.ids import new_id
from core.ledger_store import post_txn, write_transaction
from core.refunds import (
    FAILED,
    PENDING,
    SUCCEEDED,
    RefundRejected,
    lock_payment,
    refund_totals,
    reserve_refund,
    workflow_input,
)
from core.tables import (
    LedgerEntry,
    LedgerTransaction,
    Merchant,
    Order,
    Payment,
    Product,
    Refund,
    Return,
    utcnow,
)
from domain.ledger import LedgerError
from domain.money import Money
from domain.refunds import (
    FEE_POLICIES,
    REFUNDABLE_STATUSES,
    fee_returned,
    refund_key,
    refund_txn,
    refundable,
    status_after_refunds,
)
from domain.states import PaymentStatus
from workflows.contracts import (
    CompleteRefundInput,
    CompleteRefundResult,
    FailRefundInput,
    FinishReturnInput,
    RefundAct,
    ReturnRefundResult,
    ReturnStepInput,
)

# non-retryable in options.DB: a state that another attempt cannot change
INVALID = "InvalidTransition"
LEDGER_FAILED = "LedgerPostingFailed"


def _invalid(message: str) -> ApplicationError:
    return ApplicationError(message, type=INVALID, non_retryable=True)


def _capture_fee(session: Session, payment_id: str) -> int:
    """The platform fee the capture posted (from the stored entries, not today's fee schedule)."""
    key = capture_key(payment_id)
    if session.get(LedgerTransaction, key) is None:
        raise ApplicationError(
            f"payment {payment_id} has no posted capture to reverse", type=LEDGER_FAILED, non_retryable=True
        )
    total = session.exec(
        select(func.coalesce(func.sum(col(LedgerEntry.amount)), 0)).where(
            col(LedgerEntry.transaction_key) == key, col(LedgerEntry.account).startswith("platform_fees:")
        )
    ).one()
    return -int(total)


def _posted_fee_back(session: Session, key: str) -> int:
    total = session.exec(
        select(func.coalesce(func.sum(col(LedgerEntry.amount)), 0)).where(
            col(LedgerEntry.transaction_key) == key, col(LedgerEntry.account).startswith("platform_fees:")
        )
    ).one()
    return int(total)


def _lock_refund(session: Session, refund_id: str) -> tuple[Refund, Payment]:
    """The refund and its payment, the payment row locked first (the lock every refund write takes)."""
    payment_id = session.exec(select(Refund.payment_id).where(col(Refund.id) == refund_id)).first()
    if payment_id is None:
        raise not_found(f"refund {refund_id}")
    payment = lock_payment(session, payment_id)
    if payment is None:
        raise not_found(f"payment {payment_id}")
    # read after the lock: whatever another transaction committed before is visible now
    refund = session.exec(
        select(Refund).where(col(Refund.id) == refund_id).execution_options(populate_existing=True)
    ).one()
    return refund, payment


def _lock_return(session: Session, return_id: str) -> Return:
    row = session.exec(select(Return).where(col(Return.id) == return_id).with_for_update()).first()
    if row is None:
        raise not_found(f"return {return_id}")
    return row


class RefundActivities:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def activities(self) -> list[Any]:
        return [
            self.complete_refund,
            self.fail_refund,
            self.receive_return,
            self.create_return_refund,
            self.finish_return,
            self.expire_return,
        ]

    # ---- refunds

    @activity.defn(name=RefundAct.COMPLETE_REFUND)
    def complete_refund(self, inp: CompleteRefundInput) -> CompleteRefundResult:
        """The PSP refunded: post the reversal, mark the refund succeeded and move the payment to
        partially_refunded / refunded, in one transaction. A retry finds it done and changes nothing."""
        key = refund_key(inp.refund_id)
        with write_transaction(self.sessions) as session:
            refund, payment = _lock_refund(session, inp.refund_id)
            if refund.status == SUCCEEDED:
                return CompleteRefundResult(key, _posted_fee_back(session, key), payment.status)
            if refund.status != PENDING:
                raise _invalid(f"refund {refund.id} is {refund.status}, it cannot succeed")
            merchant = session.get(Merchant, payment.merchant_id)
            if merchant is None:
                raise not_found(f"merchant {payment.merchant_id}")
            policy = merchant.refund_fee_policy
            if policy not in FEE_POLICIES:
                # retryable on purpose: the money is back with the customer, so the posting must
                # happen; it waits (visible as a retrying activity) until an operator fixes the setting
                raise ApplicationError(
                    f"merchant {merchant.id} has refund_fee_policy {policy!r}; expected keep or return",
                    type="InvalidFeePolicy",
                )
            succeeded_before, _pending = refund_totals(session, payment.id)
            captured = payment.amount_received
            try:
                fee = _capture_fee(session, payment.id) if policy == "return" else 0
                back = fee_returned(policy, fee, captured, succeeded_before, refund.amount)
                txn = refund_txn(
                    refund.id,
                    payment.id,
                    payment.merchant_id,
                    payment.psp,
                    refund.currency,
                    refund.amount,
                    back,
                )
                post_txn(session, txn)  # idempotent by key; raises if a different posting holds it
                new = status_after_refunds(captured, succeeded_before + refund.amount)
            except (LedgerError, ValueError) as exc:
                raise ApplicationError(
                    f"cannot post refund {refund.id}: {exc}", type=LEDGER_FAILED, non_retryable=True
                ) from exc

            refund.status = SUCCEEDED
            refund.updated = utcnow()
            what = f"refund {refund.id} of {Money(refund.amount, refund.currency).format()} succeeded"
            if PaymentStatus(payment.status) is PaymentStatus.DISPUTED:
                # a dispute opened while the refund was in flight: the dispute owns the status now
                reason = f"{what} (payment stays disputed)"
            else:
                payment.status = checked_transition(payment.status, new, error_type=INVALID).value
                reason = what
            payment.updated = utcnow()
            append_event(session, payment.id, payment.status, reason)
            return CompleteRefundResult(key, back, payment.status)

    @activity.defn(name=RefundAct.FAIL_REFUND)
    def fail_refund(self, inp: FailRefundInput) -> None:
        """The PSP refused the refund: failed, its pending amount refundable again, ledger untouched."""
        with write_transaction(self.sessions) as session:
            refund, payment = _lock_refund(session, inp.refund_id)
            if refund.status == FAILED:
                return
            if refund.status != PENDING:
                raise _invalid(f"refund {refund.id} is {refund.status}, it cannot fail")
            refund.status = FAILED
            refund.failure_reason = inp.reason
            refund.updated = utcnow()
            amount = Money(refund.amount, refund.currency).format()
            reason = f"refund {refund.id} of {amount} failed: {inp.reason}"
            if inp.message:
                reason += f" ({inp.message})"
            append_event(session, payment.id, payment.status, reason)

    # ---- returns

    @activity.defn(name=RefundAct.RECEIVE_RETURN)
    def receive_return(self, inp: ReturnStepInput) -> None:
        """authorized -> received and the items back in stock, once (the status flip guards the restock)."""
        with write_transaction(self.sessions) as session:
            ret = _lock_return(session, inp.return_id)
            if ret.status in ("received", "refunded"):
                return  # an earlier attempt did it
            if ret.status != "authorized":
                raise _invalid(f"return {ret.id} is {ret.status}, it cannot be received")
            # sorted: two restocks lock product rows in the same order (no deadlock)
            for item in sorted(ret.items, key=lambda i: str(i["product"])):
                session.exec(
                    update(Product)
                    .where(col(Product.id) == str(item["product"]))
                    .values(stock=col(Product.stock) + int(item["quantity"]))
                )
            ret.status = "received"
            ret.updated = utcnow()

    @activity.defn(name=RefundAct.CREATE_RETURN_REFUND)
    def create_return_refund(self, inp: ReturnStepInput) -> ReturnRefundResult:
        """The pending refund of the returned items, created under the same payment row lock as
        POST /v1/refunds. Refunds at most what is still refundable (the merchant may have refunded
        part of the payment by hand meanwhile). Idempotent: the return remembers its refund."""
        with write_transaction(self.sessions) as session:
            ret = _lock_return(session, inp.return_id)
            if ret.refund_id is not None:
                existing = session.get(Refund, ret.refund_id)
                payment = session.get(Payment, existing.payment_id) if existing else None
                if existing is None or payment is None:
                    raise not_found(f"refund {ret.refund_id} of return {ret.id}")
                return ReturnRefundResult(refund=workflow_input(existing, payment))
            order = session.get(Order, ret.order_id)
            if order is None:
                raise not_found(f"order {ret.order_id}")
            payment = lock_payment(session, order.payment_id)
            if payment is None:
                raise not_found(f"payment {order.payment_id}")
            if PaymentStatus(payment.status) not in REFUNDABLE_STATUSES:
                return ReturnRefundResult(
                    reason=f"payment {payment.id} is {payment.status}; nothing refunded"
                )
            succeeded, pending = refund_totals(session, payment.id)
            left = refundable(payment.amount_received, succeeded, pending)
            amount = min(ret.amount, left)
            if amount <= 0:
                return ReturnRefundResult(reason=f"payment {payment.id} has nothing left to refund")
            try:
                refund = reserve_refund(
                    session,
                    refund_id=new_id("re"),
                    merchant_id=payment.merchant_id,
                    payment_id=payment.id,
                    amount=amount,
                    reason="requested_by_customer",
                    metadata={"return": ret.id},
                    return_id=ret.id,
                )
            except RefundRejected as exc:
                return ReturnRefundResult(reason=exc.message)
            ret.refund_id = refund.refund_id
            ret.updated = utcnow()
            return ReturnRefundResult(refund=refund)

    @activity.defn(name=RefundAct.FINISH_RETURN)
    def finish_return(self, inp: FinishReturnInput) -> None:
        """received -> refunded once its refund succeeded; without a refund it stays received."""
        with write_transaction(self.sessions) as session:
            ret = _lock_return(session, inp.return_id)
            if ret.status == "refunded" or not inp.refunded:
                return
            if ret.status != "received":
                raise _invalid(f"return {ret.id} is {ret.status}, it cannot be refunded")
            ret.status = "refunded"
            ret.updated = utcnow()

    @activity.defn(name=RefundAct.EXPIRE_RETURN)
    def expire_return(self, inp: ReturnStepInput) -> str:
        """authorized -> expired (the window closed without the items). Answers the status after."""
        with write_transaction(self.sessions) as session:
            ret = _lock_return(session, inp.return_id)
            if ret.status == "authorized":
                ret.status = "expired"
                ret.updated = utcnow()
            return ret.status
