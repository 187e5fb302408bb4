"""Fraud rules: signals about one payment in, approve / review / decline out. Pure.

The activity gathers the signals (blocklists, the customer's recent payments, card country);
this module only decides, so every rule is testable without a database.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Decision = Literal["approve", "review", "decline"]


@dataclass(frozen=True)
class FraudPolicy:
    """Per-merchant thresholds; amounts in minor units of the payment currency."""

    review_amount_limit: int = 100_000
    max_payments_per_hour: int = 20
    country_mismatch_threshold: int = 50_000

    def __post_init__(self) -> None:
        for name in ("review_amount_limit", "max_payments_per_hour", "country_mismatch_threshold"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer")
        # 0 would decline every payment (0 other payments >= 0): a misconfiguration, not a policy
        if self.max_payments_per_hour < 1:
            raise ValueError("max_payments_per_hour must be at least 1")


@dataclass(frozen=True)
class FraudSignals:
    amount: int  # minor units
    payments_last_hour: int  # the customer's OTHER payments created in the last hour
    email_blocklisted: bool
    fingerprint_blocklisted: bool
    card_country: str | None
    shipping_country: str | None


@dataclass(frozen=True)
class FraudVerdict:
    decision: Decision
    reasons: tuple[str, ...]


def _country(value: str | None) -> str | None:
    """Normalised country code; blank counts as unknown (no evidence of a mismatch)."""
    if value is None or not value.strip():
        return None
    return value.strip().upper()


def evaluate(policy: FraudPolicy, signals: FraudSignals) -> FraudVerdict:
    """Every matching rule is reported, declines first; any decline beats any review."""
    declines: list[str] = []
    if signals.email_blocklisted:
        declines.append("email_blocklisted")
    if signals.fingerprint_blocklisted:
        declines.append("card_blocklisted")
    if signals.payments_last_hour >= policy.max_payments_per_hour:
        declines.append("velocity")

    reviews: list[str] = []
    if signals.amount > policy.review_amount_limit:
        reviews.append("amount_over_limit")
    card, shipping = _country(signals.card_country), _country(signals.shipping_country)
    if (
        card is not None
        and shipping is not None
        and card != shipping
        and signals.amount > policy.country_mismatch_threshold
    ):
        reviews.append("country_mismatch")

    reasons = tuple(declines + reviews)
    if declines:
        return FraudVerdict("decline", reasons)
    if reviews:
        return FraudVerdict("review", reasons)
    return FraudVerdict("approve", ())
