from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain import ledger
from domain.ledger import (
    ACCOUNT_KINDS,
    Account,
    LedgerError,
    LedgerTxn,
    Posting,
    UnbalancedTransaction,
    balances,
    build_txn,
    capture_reversal_txn,
    capture_txn,
    posting,
    unbalanced_currencies,
)
from domain.money import FeeSchedule, FeeSplit, Money, allocate_fee


def split_of(gross: int, ccy: str = "usd", schedule: FeeSchedule | None = None) -> FeeSplit:
    return allocate_fee(Money(gross, ccy), schedule or FeeSchedule())


# ---- accounts ----

OWNED = [
    (ledger.psp_receivable, "psp_receivable"),
    (ledger.merchant_payable, "merchant_payable"),
    (ledger.customer_wallet, "customer_wallet"),
    (ledger.dispute_reserve, "dispute_reserve"),
    (ledger.payouts_in_transit, "payouts_in_transit"),
]
PLATFORM = [
    (ledger.platform_fees, "platform_fees"),
    (ledger.fx_position, "fx_position"),
    (ledger.bank, "bank"),
]


def test_every_kind_has_a_helper() -> None:
    assert {kind for _, kind in OWNED + PLATFORM} == set(ACCOUNT_KINDS)


@pytest.mark.parametrize(("helper", "kind"), OWNED)
def test_owned_account_names_round_trip(helper, kind: str) -> None:  # type: ignore[no-untyped-def]
    acct = helper("mer_01abc", "USD")
    assert acct == Account(kind, "mer_01abc", "usd")
    assert acct.name == f"{kind}:mer_01abc:usd"
    assert Account.parse(acct.name) == acct


@pytest.mark.parametrize(("helper", "kind"), PLATFORM)
def test_platform_account_names_round_trip(helper, kind: str) -> None:  # type: ignore[no-untyped-def]
    acct = helper("jpy")
    assert acct == Account(kind, None, "jpy")
    assert acct.name == f"{kind}:jpy"
    assert Account.parse(acct.name) == acct


@given(
    kind=st.sampled_from(sorted(ACCOUNT_KINDS)),
    owner=st.text(alphabet="abcdefghjkmnpqrstvwxyz0123456789_-", min_size=1, max_size=30),
    ccy=st.sampled_from(["usd", "eur", "jpy", "kwd"]),
)
def test_parse_round_trip_property(kind: str, owner: str, ccy: str) -> None:
    acct = Account(kind, owner if ACCOUNT_KINDS[kind] else None, ccy)
    assert Account.parse(acct.name) == acct
    assert Account.parse(acct.name).name == acct.name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "usd",
        "savings:usd",  # unknown kind
        "psp_receivable:usd",  # owner missing
        "psp_receivable:sandbox:extra:usd",  # too many parts
        "platform_fees:mer_1:usd",  # platform account with an owner
        "platform_fees",  # no currency
        "merchant_payable::usd",  # empty owner
        "merchant_payable:mer_1:xyz",  # unknown currency
        "merchant_payable:mer_1:USD",  # not canonical: would split one balance in two
        "bank:USD",
        "bank:",
        "merchant_payable: mer_1:usd",  # padded owner
        "merchant_payable:   :usd",
    ],
)
def test_parse_rejects(name: str) -> None:
    with pytest.raises(LedgerError):
        Account.parse(name)


@pytest.mark.parametrize(
    "args",
    [
        ("savings", "x", "usd"),
        ("merchant_payable", None, "usd"),
        ("merchant_payable", "", "usd"),
        ("merchant_payable", "a:b", "usd"),
        ("bank", "x", "usd"),
        ("bank", None, "xyz"),
    ],
)
def test_account_constructor_rejects(args: tuple[str, str | None, str]) -> None:
    with pytest.raises(LedgerError):
        Account(*args)


# ---- build_txn ----


def p(account: str, amount: int, currency: str | None = None) -> Posting:
    return Posting(account, amount, currency if currency is not None else account.rsplit(":", 1)[1])


def test_build_txn_accepts_balanced() -> None:
    txn = build_txn("k1", "manual", "ref", [p("bank:usd", 100), p("merchant_payable:m1:usd", -100)])
    assert isinstance(txn, LedgerTxn)
    assert txn.postings == (p("bank:usd", 100), p("merchant_payable:m1:usd", -100))


def test_build_txn_accepts_multi_currency_balanced() -> None:
    # an FX conversion: each currency balances on its own
    postings = [
        p("customer_wallet:c1:usd", 1_000),
        p("fx_position:usd", -1_000),
        p("fx_position:jpy", 150_000),
        p("customer_wallet:c1:jpy", -150_000),
    ]
    txn = build_txn("fx:1", "fx", "c1", postings)
    assert len(txn.postings) == 4
    assert unbalanced_currencies(txn.postings) == {}


def test_build_txn_rejects_unbalanced_and_names_the_sum() -> None:
    with pytest.raises(UnbalancedTransaction) as info:
        build_txn("k", "manual", "r", [p("bank:usd", 100), p("merchant_payable:m1:usd", -99)])
    assert info.value.sums == {"usd": 1}
    assert "usd" in str(info.value) and "+1" in str(info.value)


def test_build_txn_rejects_mixed_currency_unbalanced() -> None:
    # the raw numbers sum to zero, but 100 USD is not 100 EUR
    with pytest.raises(UnbalancedTransaction) as info:
        build_txn("k", "manual", "r", [p("bank:usd", 100), p("bank:eur", -100)])
    assert info.value.sums == {"usd": 100, "eur": -100}
    assert "usd=+100" in str(info.value) and "eur=-100" in str(info.value)


def test_build_txn_rejects_one_line() -> None:
    with pytest.raises(LedgerError, match="two postings"):
        build_txn("k", "manual", "r", [p("bank:usd", 100)])


def test_build_txn_rejects_empty() -> None:
    with pytest.raises(LedgerError):
        build_txn("k", "manual", "r", [])


def test_build_txn_rejects_currency_mismatch_with_account() -> None:
    with pytest.raises(LedgerError, match="does not match"):
        build_txn("k", "manual", "r", [p("bank:usd", 100, "eur"), p("bank:eur", -100, "eur")])


def test_build_txn_rejects_zero_amount_line() -> None:
    with pytest.raises(LedgerError, match="zero-amount"):
        build_txn("k", "manual", "r", [p("bank:usd", 100), p("bank:usd", -100), p("fx_position:usd", 0)])


@pytest.mark.parametrize("key", ["", "   "])
def test_build_txn_rejects_empty_key(key: str) -> None:
    with pytest.raises(LedgerError):
        build_txn(key, "manual", "r", [p("bank:usd", 1), p("fx_position:usd", -1)])


def test_build_txn_rejects_bad_account() -> None:
    with pytest.raises(LedgerError):
        build_txn("k", "manual", "r", [p("cash:usd", 1), p("bank:usd", -1)])


@pytest.mark.parametrize("amount", [1.0, True])
def test_posting_rejects_non_integer(amount: object) -> None:
    with pytest.raises(LedgerError):
        Posting("bank:usd", amount, "usd")  # type: ignore[arg-type]


def test_ledger_txn_constructor_validates_too() -> None:
    with pytest.raises(UnbalancedTransaction):
        LedgerTxn("k", "manual", "r", (p("bank:usd", 1), p("fx_position:usd", 1)))


def test_unbalanced_currencies() -> None:
    lines = [p("bank:usd", 5), p("bank:usd", -5), p("bank:eur", 3), p("bank:jpy", -7)]
    assert unbalanced_currencies(lines) == {"eur": 3, "jpy": -7}


def test_posting_helper_uses_account_currency() -> None:
    assert posting(ledger.bank("KWD"), 7) == Posting("bank:kwd", 7, "kwd")


# ---- capture / reversal ----


def test_capture_txn_exact_postings() -> None:
    txn = capture_txn("pay_1", "mer_1", "sandbox", split_of(10_000))
    assert txn.key == "payment:pay_1:capture"
    assert txn.kind == "capture"
    assert txn.ref == "pay_1"
    assert txn.postings == (
        Posting("psp_receivable:sandbox:usd", 10_000, "usd"),
        Posting("merchant_payable:mer_1:usd", -9_680, "usd"),
        Posting("platform_fees:usd", -320, "usd"),
    )
    assert unbalanced_currencies(txn.postings) == {}


def test_capture_txn_omits_zero_fee() -> None:
    txn = capture_txn("pay_1", "mer_1", "sandbox", split_of(5_000, "jpy", FeeSchedule(bps=0, fixed_minor=0)))
    assert txn.postings == (
        Posting("psp_receivable:sandbox:jpy", 5_000, "jpy"),
        Posting("merchant_payable:mer_1:jpy", -5_000, "jpy"),
    )


def test_capture_txn_omits_zero_net() -> None:
    # a 20-cent payment is all fee
    txn = capture_txn("pay_1", "mer_1", "sandbox", split_of(20))
    assert txn.postings == (
        Posting("psp_receivable:sandbox:usd", 20, "usd"),
        Posting("platform_fees:usd", -20, "usd"),
    )


@pytest.mark.parametrize(
    "split",
    [
        FeeSplit(Money(0, "usd"), Money(0, "usd"), Money(0, "usd")),  # nothing captured
        FeeSplit(Money(100, "usd"), Money(10, "usd"), Money(80, "usd")),  # fee + net != gross
        FeeSplit(Money(100, "usd"), Money(-10, "usd"), Money(110, "usd")),  # negative fee
        FeeSplit(Money(100, "usd"), Money(10, "eur"), Money(90, "usd")),  # mixed currencies
    ],
)
def test_capture_txn_rejects_bad_split(split: FeeSplit) -> None:
    with pytest.raises(LedgerError):
        capture_txn("pay_1", "mer_1", "sandbox", split)


@pytest.mark.parametrize("payment_id", ["", "pay:1"])
def test_capture_txn_rejects_bad_payment_id(payment_id: str) -> None:
    with pytest.raises(LedgerError):
        capture_txn(payment_id, "mer_1", "sandbox", split_of(100))


def test_capture_reversal_is_exact_mirror() -> None:
    split = split_of(10_000)
    cap = capture_txn("pay_1", "mer_1", "sandbox", split)
    rev = capture_reversal_txn("pay_1", "mer_1", "sandbox", split)
    assert rev.key == "payment:pay_1:reversal"
    assert rev.kind == "capture_reversal"
    assert rev.ref == "pay_1"
    assert rev.postings == tuple(Posting(x.account, -x.amount, x.currency) for x in cap.postings)


def test_capture_reversal_key_suffix() -> None:
    rev = capture_reversal_txn("pay_1", "mer_1", "sandbox", split_of(100), key_suffix="refund:re_9")
    assert rev.key == "payment:pay_1:refund:re_9"


def test_idempotent_keys_are_deterministic() -> None:
    a = capture_txn("pay_1", "mer_1", "sandbox", split_of(1_234))
    b = capture_txn("pay_1", "mer_1", "sandbox", split_of(1_234))
    assert a == b and a.key == b.key
    assert capture_txn("pay_2", "mer_1", "sandbox", split_of(1_234)).key != a.key
    assert capture_reversal_txn("pay_1", "mer_1", "sandbox", split_of(1_234)).key != a.key


def test_balances() -> None:
    entries = [p("bank:usd", 5), p("bank:usd", 7), p("fx_position:usd", -12), p("bank:eur", 0)]
    assert balances(entries) == {"bank:usd": 12, "fx_position:usd": -12, "bank:eur": 0}
    assert balances([]) == {}


@given(
    gross=st.integers(1, 10**12),
    bps=st.integers(0, 10_000),
    fixed=st.integers(0, 1_000),
    ccy=st.sampled_from(["usd", "jpy", "kwd", "eur"]),
)
def test_capture_then_reversal_nets_every_account_to_zero(gross: int, bps: int, fixed: int, ccy: str) -> None:
    split = split_of(gross, ccy, FeeSchedule(bps=bps, fixed_minor=fixed))
    cap = capture_txn("pay_x", "mer_x", "sandbox", split)
    rev = capture_reversal_txn("pay_x", "mer_x", "sandbox", split)
    after_capture = balances(cap.postings)
    assert after_capture[f"psp_receivable:sandbox:{ccy}"] == gross
    assert after_capture.get(f"merchant_payable:mer_x:{ccy}", 0) == -split.net.minor
    assert after_capture.get(f"platform_fees:{ccy}", 0) == -split.fee.minor
    assert sum(after_capture.values()) == 0
    both = balances(cap.postings + rev.postings)
    assert both and all(v == 0 for v in both.values())
