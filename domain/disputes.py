"""Disputes (chargebacks): their state machine, evidence rules and ledger postings. Pure.

Money flow, per dispute (keys make each posting idempotent):
- opened  `dispute:{id}:reserve`: the disputed amount leaves what we owe the merchant and is held
  (debit merchant_payable, credit dispute_reserve);
- won     `dispute:{id}:release`: the hold goes back to the merchant (the mirror of the reserve);
- lost    `dispute:{id}:lost`: the PSP keeps the money (debit dispute_reserve, credit
  psp_receivable) and the merchant pays the chargeback fee to the platform (debit merchant_payable,
  credit platform_fees), in one transaction.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Final

from domain.ledger import (
    LedgerError,
    LedgerTxn,
    Posting,
    build_txn,
    dispute_reserve,
    merchant_payable,
    platform_fees,
    posting,
    psp_receivable,
)
from domain.money import Money

# How long the merchant has to answer when the PSP gives no due date.
DEFAULT_EVIDENCE_WINDOW: Final = timedelta(days=7)

# Stripe's dispute evidence fields that are text; our API accepts these keys only, so a typo in a
# field name is a 400 instead of evidence silently dropped on the way to the card network.
EVIDENCE_FIELDS: Final = frozenset(
    {
        "access_activity_log",
        "billing_address",
        "cancellation_policy_disclosure",
        "cancellation_rebuttal",
        "customer_communication",
        "customer_email_address",
        "customer_name",
        "duplicate_charge_explanation",
        "product_description",
        "receipt",
        "refund_policy_disclosure",
        "refund_refusal_explanation",
        "service_date",
        "service_documentation",
        "shipping_address",
        "shipping_carrier",
        "shipping_date",
        "shipping_documentation",
        "shipping_tracking_number",
        "uncategorized_text",
    }
)
EVIDENCE_VALUE_MAX: Final = 20_000

DISPUTE_REASONS: Final = frozenset(
    {
        "fraudulent",
        "product_not_received",
        "product_unacceptable",
        "duplicate",
        "subscription_canceled",
        "credit_not_processed",
        "unrecognized",
        "general",
    }
)


class DisputeStatus(StrEnum):
    NEEDS_RESPONSE = "needs_response"
    UNDER_REVIEW = "under_review"
    WON = "won"
    LOST = "lost"


D = DisputeStatus
OUTCOMES: Final = frozenset({D.WON, D.LOST})

_TRANSITIONS: dict[DisputeStatus, frozenset[DisputeStatus]] = {
    # an outcome can arrive before any evidence (the PSP or the issuer closed it early)
    D.NEEDS_RESPONSE: frozenset({D.UNDER_REVIEW, D.WON, D.LOST}),
    D.UNDER_REVIEW: frozenset({D.WON, D.LOST}),
    D.WON: frozenset(),
    D.LOST: frozenset(),
}


class DisputeError(ValueError):
    """A dispute change or input the rules refuse."""


def can_transition(current: DisputeStatus, new: DisputeStatus) -> bool:
    return new == current or new in _TRANSITIONS[current]


def transition(current: DisputeStatus, new: DisputeStatus) -> DisputeStatus:
    """The new status, or DisputeError. Same status is allowed (a retry changes nothing)."""
    if not can_transition(current, new):
        raise DisputeError(f"dispute cannot go from {current} to {new}")
    return new


def evidence_deadline(opened_at: datetime, due_by: datetime | None) -> datetime:
    """When evidence stops being accepted: the PSP's due date, else the default window."""
    if opened_at.tzinfo is None or (due_by is not None and due_by.tzinfo is None):
        raise DisputeError("naive datetime")
    return due_by if due_by is not None else opened_at + DEFAULT_EVIDENCE_WINDOW


def clean_evidence(evidence: Mapping[str, object]) -> dict[str, str]:
    """Known text fields only, stripped, blanks dropped. Raises DisputeError on anything else."""
    out: dict[str, str] = {}
    for key, value in evidence.items():
        if key not in EVIDENCE_FIELDS:
            raise DisputeError(f"unknown evidence field: {key}")
        if not isinstance(value, str):
            raise DisputeError(f"evidence field {key} must be text")
        text = value.strip()
        if len(text) > EVIDENCE_VALUE_MAX:
            raise DisputeError(f"evidence field {key} is longer than {EVIDENCE_VALUE_MAX} characters")
        if text:
            out[key] = text
    return out


def has_evidence(evidence: Mapping[str, object]) -> bool:
    """True when at least one field carries text: what separates a defended dispute from a
    conceded one."""
    return any(isinstance(v, str) and v.strip() for v in evidence.values())


def refund_status(amount_received: int, refunded: int) -> str:
    """The payment status a dispute that was won returns to, from what was refunded meanwhile."""
    if refunded <= 0:
        return "succeeded"
    if refunded >= amount_received:
        return "refunded"
    return "partially_refunded"


# ---- ledger postings ----


def _key(dispute_id: str, step: str) -> str:
    if not isinstance(dispute_id, str) or not dispute_id or ":" in dispute_id:
        raise LedgerError(f"invalid dispute id for a ledger key: {dispute_id!r}")
    return f"dispute:{dispute_id}:{step}"


def _positive(amount: Money, what: str) -> None:
    if amount.minor <= 0:
        raise LedgerError(f"{what} must be positive")


def reserve_key(dispute_id: str) -> str:
    return _key(dispute_id, "reserve")


def release_key(dispute_id: str) -> str:
    return _key(dispute_id, "release")


def lost_key(dispute_id: str) -> str:
    return _key(dispute_id, "lost")


def reserve_txn(dispute_id: str, merchant_id: str, amount: Money) -> LedgerTxn:
    """Hold the disputed amount out of the merchant's balance."""
    _positive(amount, "a disputed amount")
    ccy = amount.currency
    return build_txn(
        reserve_key(dispute_id),
        "dispute_reserve",
        dispute_id,
        [
            posting(merchant_payable(merchant_id, ccy), amount.minor),
            posting(dispute_reserve(merchant_id, ccy), -amount.minor),
        ],
    )


def release_txn(dispute_id: str, merchant_id: str, amount: Money) -> LedgerTxn:
    """Dispute won: the held amount is the merchant's again."""
    _positive(amount, "a disputed amount")
    ccy = amount.currency
    return build_txn(
        release_key(dispute_id),
        "dispute_release",
        dispute_id,
        [
            posting(dispute_reserve(merchant_id, ccy), amount.minor),
            posting(merchant_payable(merchant_id, ccy), -amount.minor),
        ],
    )


def lost_txn(dispute_id: str, merchant_id: str, psp: str, amount: Money, fee: Money) -> LedgerTxn:
    """Dispute lost: the PSP keeps the held amount and the merchant pays the chargeback fee.

    A zero fee (a merchant without one) has no lines rather than zero lines."""
    _positive(amount, "a disputed amount")
    if fee.minor < 0:
        raise LedgerError("a chargeback fee cannot be negative")
    if fee.currency != amount.currency:
        raise LedgerError("the chargeback fee must be in the dispute's currency")
    ccy = amount.currency
    lines: list[Posting] = [
        posting(dispute_reserve(merchant_id, ccy), amount.minor),
        posting(psp_receivable(psp, ccy), -amount.minor),
    ]
    if fee.minor:
        lines += [
            posting(merchant_payable(merchant_id, ccy), fee.minor),
            posting(platform_fees(ccy), -fee.minor),
        ]
    return build_txn(lost_key(dispute_id), "dispute_lost", dispute_id, lines)
