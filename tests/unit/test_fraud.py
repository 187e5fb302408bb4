from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.fraud import FraudPolicy, FraudSignals, FraudVerdict, evaluate

POLICY = FraudPolicy()  # review over 100_000, 20 payments/hour, country mismatch over 50_000
CLEAN = FraudSignals(
    amount=1_000,
    payments_last_hour=0,
    email_blocklisted=False,
    fingerprint_blocklisted=False,
    card_country="US",
    shipping_country="US",
)


def test_defaults() -> None:
    assert POLICY == FraudPolicy(
        review_amount_limit=100_000, max_payments_per_hour=20, country_mismatch_threshold=50_000
    )


def test_clean_payment_is_approved() -> None:
    assert evaluate(POLICY, CLEAN) == FraudVerdict("approve", ())


@pytest.mark.parametrize(
    ("changes", "decision", "reasons"),
    [
        ({"email_blocklisted": True}, "decline", ("email_blocklisted",)),
        ({"fingerprint_blocklisted": True}, "decline", ("card_blocklisted",)),
        ({"payments_last_hour": 20}, "decline", ("velocity",)),
        ({"payments_last_hour": 19}, "approve", ()),
        ({"amount": 100_001}, "review", ("amount_over_limit",)),
        ({"amount": 100_000}, "approve", ()),
        ({"amount": 50_001, "shipping_country": "FR"}, "review", ("country_mismatch",)),
        ({"amount": 50_000, "shipping_country": "FR"}, "approve", ()),
        ({"amount": 50_001, "shipping_country": "us"}, "approve", ()),  # case-insensitive
        ({"amount": 50_001, "card_country": "fr", "shipping_country": "FR"}, "approve", ()),
        ({"amount": 90_000, "shipping_country": None}, "approve", ()),  # unknown: no evidence
        ({"amount": 90_000, "card_country": None, "shipping_country": "FR"}, "approve", ()),
        ({"amount": 90_000, "card_country": "", "shipping_country": "FR"}, "approve", ()),
    ],
)
def test_single_rules_and_boundaries(
    changes: dict[str, object], decision: str, reasons: tuple[str, ...]
) -> None:
    verdict = evaluate(POLICY, replace(CLEAN, **changes))  # type: ignore[arg-type]
    assert verdict.decision == decision
    assert verdict.reasons == reasons


def test_decline_wins_over_review_and_lists_all_reasons_declines_first() -> None:
    signals = replace(
        CLEAN,
        amount=200_000,
        shipping_country="DE",
        email_blocklisted=True,
        fingerprint_blocklisted=True,
        payments_last_hour=50,
    )
    verdict = evaluate(POLICY, signals)
    assert verdict.decision == "decline"
    assert verdict.reasons == (
        "email_blocklisted",
        "card_blocklisted",
        "velocity",
        "amount_over_limit",
        "country_mismatch",
    )


def test_one_decline_with_one_review() -> None:
    verdict = evaluate(POLICY, replace(CLEAN, amount=150_000, fingerprint_blocklisted=True))
    assert verdict == FraudVerdict("decline", ("card_blocklisted", "amount_over_limit"))


def test_two_reviews() -> None:
    verdict = evaluate(POLICY, replace(CLEAN, amount=150_000, shipping_country="GB"))
    assert verdict == FraudVerdict("review", ("amount_over_limit", "country_mismatch"))


def test_custom_policy_thresholds() -> None:
    policy = FraudPolicy(review_amount_limit=500, max_payments_per_hour=2, country_mismatch_threshold=100)
    assert evaluate(policy, replace(CLEAN, amount=500)).decision == "approve"
    assert evaluate(policy, replace(CLEAN, amount=501)).reasons == ("amount_over_limit",)
    assert evaluate(policy, replace(CLEAN, amount=101, shipping_country="CA")).reasons == (
        "country_mismatch",
    )
    assert evaluate(policy, replace(CLEAN, amount=100, payments_last_hour=1)).decision == "approve"
    assert evaluate(policy, replace(CLEAN, amount=100, payments_last_hour=2)).decision == "decline"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"review_amount_limit": -1},
        {"country_mismatch_threshold": -1},
        {"max_payments_per_hour": 0},
        {"max_payments_per_hour": 2.5},
    ],
)
def test_policy_rejects_nonsense(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        FraudPolicy(**kwargs)  # type: ignore[arg-type]


@given(
    amount=st.integers(1, 10**9),
    recent=st.integers(0, 100),
    email=st.booleans(),
    card=st.booleans(),
    card_country=st.sampled_from([None, "US", "us", "FR"]),
    shipping_country=st.sampled_from([None, "US", "FR", "fr"]),
)
def test_verdict_is_consistent_with_reasons(
    amount: int,
    recent: int,
    email: bool,
    card: bool,
    card_country: str | None,
    shipping_country: str | None,
) -> None:
    signals = FraudSignals(amount, recent, email, card, card_country, shipping_country)
    verdict = evaluate(POLICY, signals)
    declines = {"email_blocklisted", "card_blocklisted", "velocity"}
    has_decline = any(r in declines for r in verdict.reasons)
    assert verdict.decision == ("decline" if has_decline else "review" if verdict.reasons else "approve")
    # declines come before reviews
    kinds = [r in declines for r in verdict.reasons]
    assert kinds == sorted(kinds, reverse=True)
    assert ("email_blocklisted" in verdict.reasons) == email
    assert ("card_blocklisted" in verdict.reasons) == card
    assert ("velocity" in verdict.reasons) == (recent >= POLICY.max_payments_per_hour)
    assert ("amount_over_limit" in verdict.reasons) == (amount > POLICY.review_amount_limit)
