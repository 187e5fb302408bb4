from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.ledger import LedgerError, balances
from domain.refunds import (
    OrderLine,
    RefundError,
    ReturnLine,
    decide_refund_amount,
    fee_returned,
    plan_return,
    refund_fee_share,
    refund_txn,
    refundable,
    returnable_quantities,
    status_after_refunds,
)
from domain.states import PaymentStatus

# ---- refundable / amount ----


@pytest.mark.parametrize(
    ("captured", "refunded", "pending", "left"),
    [
        (10_000, 0, 0, 10_000),
        (10_000, 2_500, 0, 7_500),
        (10_000, 2_500, 7_000, 500),
        (10_000, 4_000, 6_000, 0),
    ],
)
def test_refundable(captured: int, refunded: int, pending: int, left: int) -> None:
    assert refundable(captured, refunded, pending) == left


def test_refundable_refuses_a_broken_invariant() -> None:
    with pytest.raises(ValueError, match="exceed"):
        refundable(1_000, 600, 500)
    with pytest.raises(ValueError):
        refundable(1_000, -1, 0)


def test_amount_defaults_to_everything_left() -> None:
    assert decide_refund_amount(10_000, 3_000, 2_000, None) == 5_000


def test_amount_up_to_refundable_is_accepted() -> None:
    assert decide_refund_amount(10_000, 3_000, 2_000, 5_000) == 5_000
    assert decide_refund_amount(10_000, 0, 0, 1) == 1


@pytest.mark.parametrize(
    ("refunded", "pending", "requested"),
    [(0, 0, 10_001), (3_000, 2_000, 5_001), (0, 10_000, 1), (0, 10_000, None)],
)
def test_over_refund_is_amount_too_large(refunded: int, pending: int, requested: int | None) -> None:
    with pytest.raises(RefundError) as err:
        decide_refund_amount(10_000, refunded, pending, requested)
    assert err.value.code == "amount_too_large"


def test_fully_refunded_payment() -> None:
    for requested in (None, 1):
        with pytest.raises(RefundError) as err:
            decide_refund_amount(10_000, 10_000, 0, requested)
        assert err.value.code == "charge_already_refunded"


@pytest.mark.parametrize("requested", [0, -5, True])
def test_non_positive_amount_is_invalid(requested: int) -> None:
    with pytest.raises(RefundError) as err:
        decide_refund_amount(10_000, 0, 0, requested)
    assert err.value.code == "amount_invalid"


@given(
    captured=st.integers(1, 10**9),
    requests=st.lists(st.one_of(st.none(), st.integers(1, 10**9)), max_size=30),
)
def test_accepted_refunds_never_exceed_the_capture(captured: int, requests: list[int | None]) -> None:
    """Serialized decisions (what the row lock gives us) never accept more than was captured."""
    accepted = 0
    for req in requests:
        try:
            accepted += decide_refund_amount(captured, 0, accepted, req)
        except RefundError:
            pass
        assert accepted <= captured


# ---- payment status ----


def test_status_after_refunds() -> None:
    assert status_after_refunds(10_000, 1) is PaymentStatus.PARTIALLY_REFUNDED
    assert status_after_refunds(10_000, 9_999) is PaymentStatus.PARTIALLY_REFUNDED
    assert status_after_refunds(10_000, 10_000) is PaymentStatus.REFUNDED
    for bad in (0, 10_001):
        with pytest.raises(ValueError):
            status_after_refunds(10_000, bad)


# ---- fee share ----


def test_fee_share_is_proportional_rounded_half_up() -> None:
    # fee 320 on 10_000: a 2_500 refund is exactly a quarter
    assert refund_fee_share(320, 10_000, 0, 2_500) == 80
    # fee 59 on 999: 1/3 -> 19.67 -> 20, then 2/3 cumulative 39.33 -> 39 (so 19), then the rest
    shares = [refund_fee_share(59, 999, before, 333) for before in (0, 333, 666)]
    assert shares == [20, 19, 20]
    assert sum(shares) == 59
    # exactly half a cent rounds up: fee 1 on 2 refunded 1 -> 0.5 -> 1
    assert refund_fee_share(1, 2, 0, 1) == 1
    assert refund_fee_share(1, 2, 1, 1) == 0


@given(
    captured=st.integers(1, 10**7),
    fee_ratio=st.floats(0, 1),
    cuts=st.lists(st.integers(1, 10**7), max_size=25),
)
def test_fee_shares_of_refunds_adding_up_to_the_capture_return_exactly_the_fee(
    captured: int, fee_ratio: float, cuts: list[int]
) -> None:
    fee = int(captured * fee_ratio)  # the test picks a fee; the code under test never sees floats
    refunded = 0
    returned = 0
    amounts = [c for c in cuts if c <= captured]
    for amount in amounts:
        amount = min(amount, captured - refunded)
        if amount == 0:
            break
        share = refund_fee_share(fee, captured, refunded, amount)
        assert 0 <= share <= amount
        refunded += amount
        returned += share
    if refunded < captured:
        returned += refund_fee_share(fee, captured, refunded, captured - refunded)
    assert returned == fee


def test_fee_share_rejects_nonsense() -> None:
    for args in [(10, 0, 0, 1), (200, 100, 0, 10), (10, 100, 95, 10), (10, 100, 0, 0)]:
        with pytest.raises(ValueError):
            refund_fee_share(*args)


def test_fee_policy() -> None:
    assert fee_returned("keep", 320, 10_000, 0, 2_500) == 0
    assert fee_returned("return", 320, 10_000, 0, 2_500) == 80
    with pytest.raises(ValueError, match="policy"):
        fee_returned("half", 320, 10_000, 0, 2_500)


# ---- ledger transaction ----


def test_refund_txn_keep_policy_debits_the_merchant_the_gross() -> None:
    txn = refund_txn("re_1", "pay_1", "acct_1", "sandbox", "usd", 2_500)
    assert txn.key == "refund:re_1" and txn.kind == "refund" and txn.ref == "pay_1"
    assert balances(txn.postings) == {
        "psp_receivable:sandbox:usd": -2_500,
        "merchant_payable:acct_1:usd": 2_500,
    }


def test_refund_txn_return_policy_splits_between_merchant_and_platform() -> None:
    txn = refund_txn("re_1", "pay_1", "acct_1", "sandbox", "usd", 2_500, fee_back=80)
    assert balances(txn.postings) == {
        "psp_receivable:sandbox:usd": -2_500,
        "merchant_payable:acct_1:usd": 2_420,
        "platform_fees:usd": 80,
    }
    assert sum(p.amount for p in txn.postings) == 0


def test_refund_txn_that_is_all_fee_has_no_merchant_line() -> None:
    txn = refund_txn("re_1", "pay_1", "acct_1", "sandbox", "usd", 30, fee_back=30)
    assert balances(txn.postings) == {"psp_receivable:sandbox:usd": -30, "platform_fees:usd": 30}


@pytest.mark.parametrize(
    ("refund_id", "amount", "fee_back"),
    [("re:1", 10, 0), ("", 10, 0), ("re_1", 0, 0), ("re_1", 10, 11), ("re_1", 10, -1)],
)
def test_refund_txn_rejects_bad_input(refund_id: str, amount: int, fee_back: int) -> None:
    with pytest.raises(LedgerError):
        refund_txn(refund_id, "pay_1", "acct_1", "sandbox", "usd", amount, fee_back)


# ---- returns ----

ORDER = [OrderLine("prod_a", 2, 1_500), OrderLine("prod_b", 1, 250)]


def test_returnable_quantities() -> None:
    assert returnable_quantities(ORDER, {}) == {"prod_a": 2, "prod_b": 1}
    assert returnable_quantities(ORDER, {"prod_a": 1, "prod_b": 1}) == {"prod_a": 1, "prod_b": 0}


def test_plan_return_prices_at_the_order_price_and_merges_lines() -> None:
    lines = plan_return(ORDER, {}, [("prod_a", 1), ("prod_b", 1), ("prod_a", 1)])
    assert lines == [ReturnLine("prod_a", 2, 1_500), ReturnLine("prod_b", 1, 250)]
    assert sum(line.amount for line in lines) == 3_250


def test_plan_return_counts_earlier_returns() -> None:
    assert plan_return(ORDER, {"prod_a": 1}, [("prod_a", 1)]) == [ReturnLine("prod_a", 1, 1_500)]
    with pytest.raises(RefundError) as err:
        plan_return(ORDER, {"prod_a": 1}, [("prod_a", 2)])
    assert err.value.code == "return_quantity_exceeded"


@pytest.mark.parametrize("items", [[], [("prod_x", 1)], [("prod_a", 0)], [("prod_a", -1)]])
def test_plan_return_rejects_invalid_items(items: list[tuple[str, int]]) -> None:
    with pytest.raises(RefundError) as err:
        plan_return(ORDER, {}, items)
    assert err.value.code == "return_items_invalid"
