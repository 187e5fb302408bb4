"""Customer emails about a payment: receipt, failure, action required, refund (or refund failed).

With SMTP_URL set the message goes to that relay; without it (dev) only a one-line summary is
logged, never the body. Each (payment, kind) -- (refund, kind) for refund notices, stored in the
same payment_id column -- is sent once: the notifications row is the record,
and a retry that finds it does not send again. Card data never appears: brand and last4 only.
"""

from __future__ import annotations

import logging
import smtplib
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col, select
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.payments import append_event, not_found
from core.config import Settings
from core.ledger_store import write_transaction
from core.tables import Customer, Merchant, Notification, Payment, PaymentMethod, Refund
from domain.money import Money
from workflows.contracts import Act, ReceiptInput, RefundAct, RefundNoticeInput

log = logging.getLogger("paysaga.notify")

SMTP_TIMEOUT = 10.0

_KIND_LABEL = {
    "receipt": "receipt",
    "payment_failed": "payment failed notice",
    "action_required": "action required notice",
    "refund_succeeded": "refund notice",
    "refund_failed": "refund failed notice",
}


@dataclass
class Email:
    recipient: str
    subject: str
    body: str


def _mask(email: str) -> str:
    """j***@example.com: enough to tell mailboxes apart in a log, not to harvest them."""
    local, _, domain = email.partition("@")
    return f"{local[:1]}***@{domain}" if domain else "***"


def _method_label(method: PaymentMethod | None) -> str:
    if method is None:
        return "your payment method"
    if method.type == "wallet":
        return f"wallet ({method.brand})"
    if method.type == "netbanking":
        return f"net banking ({method.brand})"
    return f"{method.brand} ending in {method.last4}"


def compose(
    kind: str, payment: Payment, customer: Customer, merchant: Merchant, method: PaymentMethod | None
) -> Email:
    amount = Money(payment.amount, payment.currency).format()
    card = _method_label(method)
    if kind == "receipt":
        subject = f"Your receipt from {merchant.name}: {amount}"
        opening = f"Thank you for your payment of {amount} to {merchant.name}."
    elif kind == "payment_failed":
        subject = f"Your payment of {amount} to {merchant.name} failed"
        opening = f"Your payment of {amount} to {merchant.name} could not be completed."
    elif kind == "action_required":
        subject = f"Action required for your payment of {amount} to {merchant.name}"
        opening = f"Your payment of {amount} to {merchant.name} needs you to confirm it."
    else:
        raise ApplicationError(f"unknown notification kind {kind!r}", type="InvalidInput", non_retryable=True)
    greeting = f"Hello {customer.name}," if customer.name else "Hello,"
    lines = [
        greeting,
        "",
        opening,
        "",
        f"Amount:   {amount}",
        f"Payment:  {payment.id}",
        f"Status:   {payment.status}",
        f"Card:     {card}",
    ]
    if payment.description:
        lines.append(f"For:      {payment.description}")
    lines += ["", f"-- {merchant.name}, via paysaga"]
    return Email(recipient=customer.email, subject=subject, body="\n".join(lines) + "\n")


def compose_refund(
    kind: str,
    refund: Refund,
    payment: Payment,
    customer: Customer,
    merchant: Merchant,
    method: PaymentMethod | None,
) -> Email:
    amount = Money(refund.amount, refund.currency).format()
    card = _method_label(method)
    if kind == "refund_succeeded":
        subject = f"Your refund of {amount} from {merchant.name}"
        opening = (
            f"{merchant.name} refunded {amount} to your {card}. Depending on your bank it can take "
            "5 to 10 business days to appear on your statement."
        )
    elif kind == "refund_failed":
        subject = f"Your refund of {amount} from {merchant.name} could not be completed"
        opening = (
            f"We could not send the refund of {amount} back to your {card}. "
            f"Please contact {merchant.name} to arrange the refund another way."
        )
    else:
        raise ApplicationError(f"unknown notification kind {kind!r}", type="InvalidInput", non_retryable=True)
    greeting = f"Hello {customer.name}," if customer.name else "Hello,"
    lines = [
        greeting,
        "",
        opening,
        "",
        f"Amount:   {amount}",
        f"Refund:   {refund.id}",
        f"Payment:  {payment.id}",
        "",
        f"-- {merchant.name}, via paysaga",
    ]
    return Email(recipient=customer.email, subject=subject, body="\n".join(lines) + "\n")


def send_smtp(smtp_url: str, mail_from: str, email: Email) -> None:
    parts = urlsplit(smtp_url)
    if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
        raise ApplicationError(f"SMTP_URL must be smtp://host:port, got {parts.scheme}://", type="BadConfig")
    msg = EmailMessage()
    msg["From"] = mail_from
    msg["To"] = email.recipient
    msg["Subject"] = email.subject
    msg.set_content(email.body)
    smtp_cls = smtplib.SMTP_SSL if parts.scheme == "smtps" else smtplib.SMTP
    port = parts.port or (465 if parts.scheme == "smtps" else 25)
    try:
        with smtp_cls(parts.hostname, port, timeout=SMTP_TIMEOUT) as smtp:
            smtp.send_message(msg)
    except smtplib.SMTPRecipientsRefused as exc:
        # the relay will refuse this address on every retry too
        raise ApplicationError(
            "recipient refused by the SMTP relay", type="InvalidRecipient", non_retryable=True
        ) from exc


class NotifyActivities:
    def __init__(self, sessions: sessionmaker[Session], settings: Settings) -> None:
        self.sessions = sessions
        self.settings = settings

    def activities(self) -> list[Any]:
        return [self.send_receipt, self.send_refund_notice]

    def _already_sent(self, session: Session, payment_id: str, kind: str) -> bool:
        row = session.exec(
            select(Notification.id).where(
                col(Notification.payment_id) == payment_id, col(Notification.kind) == kind
            )
        ).first()
        return row is not None

    @activity.defn(name=Act.SEND_RECEIPT)
    def send_receipt(self, inp: ReceiptInput) -> None:
        with self.sessions() as session:
            if self._already_sent(session, inp.payment_id, inp.kind):
                return
            payment = session.get(Payment, inp.payment_id)
            if payment is None:
                raise not_found(f"payment {inp.payment_id}")
            customer = session.get(Customer, payment.customer_id)
            merchant = session.get(Merchant, payment.merchant_id)
            if customer is None or merchant is None:
                raise not_found(f"customer or merchant of payment {payment.id}")
            method = session.get(PaymentMethod, payment.payment_method_id)
            email = compose(inp.kind, payment, customer, merchant, method)

        self._deliver_once(inp.payment_id, inp.kind, email, inp.payment_id)

    def _deliver_once(self, record_id: str, kind: str, email: Email, payment_id: str) -> None:
        """Send (or log) `email`, then record it as notification (record_id, kind) with a note on
        the payment's timeline. record_id is the object the notice is about: the payment for
        receipts, the refund for refund notices (a payment can have many refunds)."""
        # Sent outside any DB transaction (no lock held while talking to a slow relay). If the
        # worker dies between sending and recording, the retry sends again: at-least-once.
        if self.settings.smtp_url:
            send_smtp(self.settings.smtp_url, self.settings.mail_from, email)
            status, verb = "sent", "emailed"
        else:
            log.info(
                "%s for %s logged (SMTP not configured): to=%s subject=%r",
                kind,
                record_id,
                _mask(email.recipient),
                email.subject,
            )
            status, verb = "logged", "logged"

        try:
            with write_transaction(self.sessions) as session:
                if self._already_sent(session, record_id, kind):
                    return
                session.add(
                    Notification(
                        payment_id=record_id,
                        kind=kind,
                        recipient=email.recipient,
                        subject=email.subject[:200],
                        status=status,
                    )
                )
                current = session.get(Payment, payment_id)
                if current is None:
                    raise not_found(f"payment {payment_id}")
                # the timeline keeps the payment's status; the reason says what happened
                label = _KIND_LABEL[kind]
                if record_id != payment_id:
                    label = f"{label} for {record_id}"
                append_event(session, current.id, current.status, f"{label} {verb}")
        except IntegrityError:
            # a concurrent attempt recorded it first: the unique (payment_id, kind) says it is done
            with self.sessions() as session:
                if not self._already_sent(session, record_id, kind):
                    raise

    @activity.defn(name=RefundAct.SEND_REFUND_NOTICE)
    def send_refund_notice(self, inp: RefundNoticeInput) -> None:
        """Tell the customer a refund went back to their card (or could not). Once per refund."""
        with self.sessions() as session:
            if self._already_sent(session, inp.refund_id, inp.kind):
                return
            refund = session.get(Refund, inp.refund_id)
            if refund is None:
                raise not_found(f"refund {inp.refund_id}")
            payment = session.get(Payment, refund.payment_id)
            if payment is None:
                raise not_found(f"payment {refund.payment_id}")
            customer = session.get(Customer, payment.customer_id)
            merchant = session.get(Merchant, payment.merchant_id)
            if customer is None or merchant is None:
                raise not_found(f"customer or merchant of payment {payment.id}")
            method = session.get(PaymentMethod, payment.payment_method_id)
            email = compose_refund(inp.kind, refund, payment, customer, merchant, method)
        self._deliver_once(refund.id, inp.kind, email, payment.id)
