"""Payment rows and their timeline. Sync activities: they run in the worker's thread pool.

Both activities are idempotent: Temporal retries an attempt whose worker died after the commit
but before reporting, so a retry must find its work done and change nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col, select
from temporalio import activity
from temporalio.exceptions import ApplicationError

from core.ledger_store import write_transaction
from core.refunds import lock_payment
from core.tables import Payment, PaymentEvent, utcnow
from domain.states import InvalidTransition, PaymentStatus, transition
from workflows.contracts import Act, CreatePaymentInput, NextAction, PaymentUpdate


def not_found(what: str, type: str = "NotFound") -> ApplicationError:
    # A missing row will still be missing on the next attempt: do not retry.
    return ApplicationError(f"{what} not found", type=type, non_retryable=True)


def append_event(session: Session, payment_id: str, status: str, reason: str | None) -> bool:
    """Add a timeline row unless the latest one already says the same (a retried activity)."""
    latest = session.exec(
        select(PaymentEvent)
        .where(col(PaymentEvent.payment_id) == payment_id)
        .order_by(col(PaymentEvent.id).desc())
        .limit(1)
    ).first()
    if latest is not None and latest.status == status and latest.reason == reason:
        return False
    session.add(PaymentEvent(payment_id=payment_id, status=status, reason=reason))
    return True


def checked_transition(current: str, new: str, error_type: str = "InvalidTransition") -> PaymentStatus:
    try:
        return transition(PaymentStatus(current), PaymentStatus(new))
    except (InvalidTransition, ValueError) as exc:  # ValueError: not a status at all
        raise ApplicationError(str(exc), type=error_type, non_retryable=True) from exc


def _next_action_json(value: NextAction | dict[str, Any]) -> dict[str, Any]:
    # The data converter hands us a NextAction; accept a plain dict too.
    return dict(value) if isinstance(value, dict) else dataclasses.asdict(value)


class PaymentActivities:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def activities(self) -> list[Any]:
        return [self.create_payment, self.update_payment]

    @activity.defn(name=Act.CREATE_PAYMENT)
    def create_payment(self, inp: CreatePaymentInput) -> None:
        """Insert the payment (processing) and its first event; a retry finds it and does nothing."""
        try:
            with write_transaction(self.sessions) as session:
                if session.get(Payment, inp.payment_id) is not None:
                    return
                session.add(
                    Payment(
                        id=inp.payment_id,
                        merchant_id=inp.merchant_id,
                        customer_id=inp.customer_id,
                        payment_method_id=inp.payment_method_id,
                        order_id=inp.order_id,
                        amount=inp.amount,
                        currency=inp.currency,
                        status=PaymentStatus.PROCESSING.value,
                        capture_method=inp.capture_method,
                        psp=inp.psp,
                        description=inp.description,
                        metadata_=dict(inp.metadata),
                        workflow_id=inp.workflow_id,
                        idempotency_key=inp.idempotency_key,
                    )
                )
                # flush the payment first: the event's foreign key points at it
                session.flush()
                session.add(
                    PaymentEvent(
                        payment_id=inp.payment_id, status=PaymentStatus.PROCESSING.value, reason="created"
                    )
                )
        except IntegrityError:
            # A concurrent attempt inserted it first (PostgreSQL); anything else is a real error.
            with self.sessions() as session:
                if session.get(Payment, inp.payment_id) is None:
                    raise

    @activity.defn(name=Act.UPDATE_PAYMENT)
    def update_payment(self, upd: PaymentUpdate) -> None:
        """Apply a status change (same status allowed: a note or a retry) and record it."""
        with write_transaction(self.sessions) as session:
            payment = lock_payment(session, upd.payment_id)
            if payment is None:
                raise not_found(f"payment {upd.payment_id}")
            new = checked_transition(payment.status, upd.status)
            payment.status = new.value
            for name in (
                "psp",  # routing moved the payment to another PSP before authorizing there
                "psp_payment_id",
                "failure_code",
                "decline_code",
                "failure_message",
                "amount_capturable",
                "amount_received",
            ):
                value = getattr(upd, name)
                if value is not None:
                    setattr(payment, name, value)
            if new is PaymentStatus.REQUIRES_ACTION:
                if upd.next_action is not None:
                    payment.next_action = _next_action_json(upd.next_action)
            else:
                payment.next_action = None  # the action is over once the status moved on
            payment.updated = utcnow()
            append_event(session, payment.id, new.value, upd.reason)
