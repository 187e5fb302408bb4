"""Reserving a refund: the one rule that keeps refunds within what was captured.

Every write that changes what is refundable on a payment -- a new pending refund, a refund
succeeding or failing -- first locks the payment row (SELECT ... FOR UPDATE on PostgreSQL; on
SQLite write_transaction's BEGIN IMMEDIATE takes the database write lock). So "refundable =
captured - refunded - pending" is computed and acted on by one transaction at a time, and
concurrent refunds of one payment can never add up to more than was captured.

Both the API (POST /v1/refunds) and the return activities reserve refunds, inside their own write
transaction, so this lives in core. It names one workflow contract: the input of the
RefundWorkflow that a reserved refund starts.
"""

from __future__ import annotations

from sqlalchemy import func
from sqlmodel import Session, col, select

from core.tables import Payment, Refund
from domain.refunds import REFUNDABLE_STATUSES, RefundError, decide_refund_amount
from domain.states import PaymentStatus
from workflows.contracts import RefundWorkflowInput, refund_workflow_id

PENDING, SUCCEEDED, FAILED = "pending", "succeeded", "failed"


def lock_payment(session: Session, payment_id: str) -> Payment | None:
    """The payment row, locked for this transaction on PostgreSQL (SQLite: BEGIN IMMEDIATE)."""
    return session.exec(select(Payment).where(col(Payment.id) == payment_id).with_for_update()).first()


class RefundRejected(Exception):
    """A refund that must not be created; carries the HTTP status and error code for the API."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param


def refund_totals(session: Session, payment_id: str) -> tuple[int, int]:
    """(succeeded, pending) refund sums of the payment. Call it holding the payment's lock."""
    rows = session.exec(
        select(col(Refund.status), func.coalesce(func.sum(col(Refund.amount)), 0))
        .where(col(Refund.payment_id) == payment_id, col(Refund.status).in_([PENDING, SUCCEEDED]))
        .group_by(col(Refund.status))
    ).all()
    sums = {status: int(total) for status, total in rows}
    return sums.get(SUCCEEDED, 0), sums.get(PENDING, 0)


def workflow_input(refund: Refund, payment: Payment) -> RefundWorkflowInput:
    return RefundWorkflowInput(
        refund_id=refund.id,
        payment_id=payment.id,
        merchant_id=payment.merchant_id,
        psp=payment.psp,
        psp_payment_id=payment.psp_payment_id,
        amount=refund.amount,
        currency=refund.currency,
        return_id=refund.return_id,
    )


def reserve_refund(
    session: Session,
    *,
    refund_id: str,
    merchant_id: str,
    payment_id: str,
    amount: int | None,
    reason: str | None = None,
    metadata: dict[str, str] | None = None,
    return_id: str | None = None,
) -> RefundWorkflowInput:
    """Insert the refund `refund_id` as pending if the payment still has that much refundable.

    Runs inside the caller's write transaction (core.ledger_store.write_transaction) and locks the
    payment row first; the refund row becomes visible to other refunds of the payment only with
    the commit, and they wait for the lock until then. A refund id that already exists (a retried
    request) is answered as it is, without checking again. Raises RefundRejected; nothing is
    written then.
    """
    payment = lock_payment(session, payment_id)
    if payment is None or payment.merchant_id != merchant_id:
        raise RefundRejected(404, "resource_missing", f"No such payment: '{payment_id}'", "payment")
    existing = session.get(Refund, refund_id)
    if existing is not None:
        if existing.payment_id != payment.id:
            raise RefundRejected(409, "idempotency_key_reused", "This refund belongs to another payment.")
        return workflow_input(existing, payment)

    status = PaymentStatus(payment.status)
    if status is PaymentStatus.REFUNDED:
        raise RefundRejected(
            400, "charge_already_refunded", "This payment has already been refunded in full."
        )
    if status is PaymentStatus.DISPUTED:
        raise RefundRejected(
            400,
            "charge_disputed",
            "This payment is disputed; it cannot be refunded while the dispute is open.",
        )
    if status not in REFUNDABLE_STATUSES:
        raise RefundRejected(
            409,
            "payment_unexpected_state",
            f"This payment is {payment.status}; it cannot be refunded.",
        )
    succeeded, pending = refund_totals(session, payment.id)
    try:
        value = decide_refund_amount(payment.amount_received, succeeded, pending, amount)
    except RefundError as exc:
        raise RefundRejected(400, exc.code, exc.message, "amount") from None
    except ValueError as exc:  # refunds beyond the captured amount: a broken invariant
        raise RuntimeError(f"payment {payment.id}: {exc}") from exc

    refund = Refund(
        id=refund_id,
        merchant_id=payment.merchant_id,
        payment_id=payment.id,
        amount=value,
        currency=payment.currency,
        reason=reason,
        status=PENDING,
        return_id=return_id,
        workflow_id=refund_workflow_id(refund_id),
        metadata_=dict(metadata or {}),
    )
    session.add(refund)
    session.flush()
    return workflow_input(refund, payment)
