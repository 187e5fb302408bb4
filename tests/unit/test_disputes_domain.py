"""domain.disputes: state machine, evidence rules, deadline, and the three ledger postings."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.disputes import (
    DEFAULT_EVIDENCE_WINDOW,
    EVIDENCE_VALUE_MAX,
    DisputeError,
    DisputeStatus,
    can_transition,
    clean_evidence,
    evidence_deadline,
    has_evidence,
    lost_txn,
    refund_status,
    release_txn,
    reserve_txn,
    transition,
)
from domain.ledger import LedgerError, balances
from domain.money import Money

D = DisputeStatus
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


# ---- state machine ----


@pytest.mark.parametrize(
    ("current", "new", "ok"),
    [
        (D.NEEDS_RESPONSE, D.UNDER_REVIEW, True),
        (D.NEEDS_RESPONSE, D.WON, True),  # closed by the PSP before any evidence
        (D.NEEDS_RESPONSE, D.LOST, True),
        (D.UNDER_REVIEW, D.WON, True),
        (D.UNDER_REVIEW, D.LOST, True),
        (D.UNDER_REVIEW, D.NEEDS_RESPONSE, False),
        (D.WON, D.LOST, False),
        (D.LOST, D.WON, False),
        (D.WON, D.UNDER_REVIEW, False),
        (D.LOST, D.LOST, True),  # a retry
    ],
)
def test_transitions(current: DisputeStatus, new: DisputeStatus, ok: bool) -> None:
    assert can_transition(current, new) is ok
    if ok:
        assert transition(current, new) is new
    else:
        with pytest.raises(DisputeError):
            transition(current, new)


# ---- evidence ----


def test_clean_evidence_strips_and_drops_blanks() -> None:
    assert clean_evidence({"receipt": "  rcpt-1 ", "customer_name": "   ", "shipping_carrier": "UPS"}) == {
        "receipt": "rcpt-1",
        "shipping_carrier": "UPS",
    }


@pytest.mark.parametrize(
    "evidence",
    [
        {"reciept": "typo in the field name"},
        {"receipt": 42},
        {"receipt": "x" * (EVIDENCE_VALUE_MAX + 1)},
    ],
)
def test_clean_evidence_refuses(evidence: dict[str, object]) -> None:
    with pytest.raises(DisputeError):
        clean_evidence(evidence)


def test_has_evidence() -> None:
    assert has_evidence({"receipt": "r"})
    assert not has_evidence({})
    assert not has_evidence({"receipt": "  "})


# ---- deadline ----


def test_deadline_is_the_psps_due_date() -> None:
    due = T0 + timedelta(days=3)
    assert evidence_deadline(T0, due) == due


def test_deadline_defaults_to_seven_days() -> None:
    assert DEFAULT_EVIDENCE_WINDOW == timedelta(days=7)
    assert evidence_deadline(T0, None) == T0 + timedelta(days=7)


def test_deadline_refuses_naive_datetimes() -> None:
    with pytest.raises(DisputeError):
        evidence_deadline(datetime(2026, 3, 1), None)  # noqa: DTZ001


# ---- payment status after a won dispute ----


@pytest.mark.parametrize(
    ("received", "refunded", "status"),
    [(1000, 0, "succeeded"), (1000, 300, "partially_refunded"), (1000, 1000, "refunded")],
)
def test_refund_status(received: int, refunded: int, status: str) -> None:
    assert refund_status(received, refunded) == status


# ---- postings ----

USD = "usd"


def test_reserve_moves_payable_to_reserve() -> None:
    txn = reserve_txn("dp_1", "acct_1", Money(2500, USD))
    assert (txn.key, txn.kind, txn.ref) == ("dispute:dp_1:reserve", "dispute_reserve", "dp_1")
    assert balances(txn.postings) == {
        "merchant_payable:acct_1:usd": 2500,
        "dispute_reserve:acct_1:usd": -2500,
    }


def test_release_is_the_mirror_of_reserve() -> None:
    reserve = reserve_txn("dp_1", "acct_1", Money(2500, USD))
    release = release_txn("dp_1", "acct_1", Money(2500, USD))
    assert release.key == "dispute:dp_1:release"
    both = balances([*reserve.postings, *release.postings])
    assert set(both.values()) == {0}


def test_lost_hands_the_reserve_to_the_psp_and_charges_the_fee() -> None:
    txn = lost_txn("dp_1", "acct_1", "sandbox", Money(2500, USD), Money(1500, USD))
    assert (txn.key, txn.kind) == ("dispute:dp_1:lost", "dispute_lost")
    assert balances(txn.postings) == {
        "dispute_reserve:acct_1:usd": 2500,
        "psp_receivable:sandbox:usd": -2500,
        "merchant_payable:acct_1:usd": 1500,
        "platform_fees:usd": -1500,
    }


def test_lost_without_a_fee_has_no_fee_lines() -> None:
    txn = lost_txn("dp_1", "acct_1", "sandbox", Money(2500, USD), Money(0, USD))
    assert {p.account for p in txn.postings} == {"dispute_reserve:acct_1:usd", "psp_receivable:sandbox:usd"}


@pytest.mark.parametrize(
    "call",
    [
        lambda: reserve_txn("dp_1", "acct_1", Money(0, USD)),
        lambda: reserve_txn("dp:1", "acct_1", Money(10, USD)),  # ':' would forge another key
        lambda: release_txn("", "acct_1", Money(10, USD)),
        lambda: lost_txn("dp_1", "acct_1", "sandbox", Money(10, USD), Money(-1, USD)),
        lambda: lost_txn("dp_1", "acct_1", "sandbox", Money(10, USD), Money(5, "eur")),
    ],
)
def test_postings_refuse_bad_input(call: object) -> None:
    with pytest.raises(LedgerError):
        call()  # type: ignore[operator]


@given(
    amount=st.integers(min_value=1, max_value=10**12),
    fee=st.integers(min_value=0, max_value=10**6),
    won=st.booleans(),
)
def test_a_whole_dispute_leaves_the_reserve_empty(amount: int, fee: int, won: bool) -> None:
    """Reserve then outcome: the reserve nets to zero, and the merchant ends with -amount-fee (lost)
    or unchanged (won)."""
    money = Money(amount, "jpy")
    postings = list(reserve_txn("dp_1", "m", money).postings)
    outcome = (
        release_txn("dp_1", "m", money) if won else lost_txn("dp_1", "m", "sandbox", money, Money(fee, "jpy"))
    )
    postings += outcome.postings
    total = balances(postings)
    assert total["dispute_reserve:m:jpy"] == 0
    assert total["merchant_payable:m:jpy"] == (0 if won else amount + fee)
    assert sum(total.values()) == 0
