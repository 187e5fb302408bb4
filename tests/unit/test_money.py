from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from domain.money import (
    MAX_AMOUNT_MINOR,
    FeeSchedule,
    Money,
    MoneyError,
    allocate_fee,
    exponent,
    normalize_currency,
    validate_amount,
)


@pytest.mark.parametrize(("ccy", "exp"), [("jpy", 0), ("usd", 2), ("kwd", 3), ("USD", 2), (" Jpy ", 0)])
def test_exponents(ccy: str, exp: int) -> None:
    assert exponent(ccy) == exp


@pytest.mark.parametrize(
    ("major", "ccy", "minor"),
    [
        ("1.234", "kwd", 1234),
        ("12.34", "usd", 1234),
        ("12.3", "usd", 1230),
        ("12", "usd", 1200),
        ("1000", "jpy", 1000),
        ("1.000", "jpy", 1),  # trailing zeros are not extra precision
        ("-1.50", "usd", -150),
        ("0.001", "KWD", 1),
    ],
)
def test_parse(major: str, ccy: str, minor: int) -> None:
    m = Money.parse(major, ccy)
    assert m.minor == minor
    assert m.currency == ccy.lower()


@pytest.mark.parametrize(
    ("major", "ccy"),
    [
        ("1.5", "jpy"),
        ("1.234", "usd"),
        ("1.2345", "kwd"),
        ("abc", "usd"),
        ("", "usd"),
        ("NaN", "usd"),
        ("Infinity", "usd"),
        ("1e999999999", "usd"),  # would overflow the decimal context / build a huge int
        ("1e-999999999", "usd"),  # must not underflow to zero
        ("0.0100000000000000000000000000000000001", "usd"),  # more digits than the default precision
        ("10000000000.01", "usd"),  # one minor unit over the maximum
        ("1.00", "xyz"),
    ],
)
def test_parse_rejects(major: str, ccy: str) -> None:
    with pytest.raises(MoneyError):
        Money.parse(major, ccy)


def test_parse_rejects_float_input() -> None:
    with pytest.raises(MoneyError):
        Money.parse(1.5, "usd")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("minor", "ccy", "text"),
    [
        (1234, "usd", "12.34 USD"),
        (5, "usd", "0.05 USD"),
        (-5, "usd", "-0.05 USD"),
        (1000, "jpy", "1000 JPY"),
        (1500, "kwd", "1.500 KWD"),
        (1, "kwd", "0.001 KWD"),
        (0, "eur", "0.00 EUR"),
    ],
)
def test_format(minor: int, ccy: str, text: str) -> None:
    assert Money(minor, ccy).format() == text


@given(st.integers(-(10**15), 10**15), st.sampled_from(["usd", "jpy", "kwd"]))
def test_format_parse_round_trip(minor: int, ccy: str) -> None:
    m = Money(minor, ccy)
    number, code = m.format().split(" ")
    assert code == ccy.upper()
    if abs(minor) <= MAX_AMOUNT_MINOR:
        assert Money.parse(number, code) == m


@pytest.mark.parametrize("bad", [1.0, 0.5, True, False, "100", None])
def test_no_floats_or_bools(bad: object) -> None:
    with pytest.raises(MoneyError):
        Money(bad, "usd")  # type: ignore[arg-type]


@pytest.mark.parametrize("ccy", ["xyz", "", "us", "dollars"])
def test_unknown_currency(ccy: str) -> None:
    with pytest.raises(MoneyError):
        Money(100, ccy)
    with pytest.raises(MoneyError):
        normalize_currency(ccy)


def test_currency_is_normalised() -> None:
    assert Money(1, "USD") == Money(1, "usd")


def test_same_currency_arithmetic() -> None:
    a, b = Money(150, "usd"), Money(50, "usd")
    assert a + b == Money(200, "usd")
    assert a - b == Money(100, "usd")
    assert -a == Money(-150, "usd")
    assert b < a and b <= a and not a < b
    assert Money(0, "usd").is_zero() and not a.is_zero()


@pytest.mark.parametrize(
    "op",
    [
        lambda a, b: a + b,
        lambda a, b: a - b,
        lambda a, b: a < b,
        lambda a, b: a <= b,
    ],
)
def test_different_currency_arithmetic_raises(op) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(MoneyError):
        op(Money(100, "usd"), Money(100, "eur"))


def test_money_never_equals_other_currency() -> None:
    assert Money(100, "usd") != Money(100, "eur")


@pytest.mark.parametrize(
    ("minor", "allow_zero"),
    [(-1, False), (0, False), (-1, True), (1.0, False), (100.5, False), (True, False), ("100", False)]
    + [(MAX_AMOUNT_MINOR + 1, False)],
)
def test_validate_amount_rejects(minor: object, allow_zero: bool) -> None:
    with pytest.raises(MoneyError):
        validate_amount(minor, "usd", allow_zero=allow_zero)


@pytest.mark.parametrize(("minor", "allow_zero"), [(1, False), (0, True), (MAX_AMOUNT_MINOR, False)])
def test_validate_amount_accepts(minor: int, allow_zero: bool) -> None:
    assert validate_amount(minor, "USD", allow_zero=allow_zero) == Money(minor, "usd")


def test_validate_amount_unknown_currency() -> None:
    with pytest.raises(MoneyError):
        validate_amount(100, "xyz")


@pytest.mark.parametrize(
    ("gross", "fee"),
    [
        (10_000, 320),  # 290 + 30
        (500, 45),  # 14.5 rounds half-up to 15 (half-even would give 14), + 30
        (2_500, 103),  # 72.5 -> 73 (half-even would give 72), + 30
        (1_500, 74),  # 43.5 -> 44, + 30
        (50, 31),  # 1.45 -> 1, + 30
        (100, 33),  # 2.9 -> 3, + 30
        (31, 31),  # 0.899 -> 1, + 30 = 31: exactly the gross
        (20, 20),  # tiny payment: fee capped at the gross
        (1, 1),
        (0, 0),
    ],
)
def test_allocate_fee_default_schedule(gross: int, fee: int) -> None:
    split = allocate_fee(Money(gross, "usd"), FeeSchedule())
    assert split.gross == Money(gross, "usd")
    assert split.fee == Money(fee, "usd")
    assert split.net == Money(gross - fee, "usd")


def test_allocate_fee_custom_schedule_and_currency() -> None:
    split = allocate_fee(Money(10_000, "jpy"), FeeSchedule(bps=150, fixed_minor=0))
    assert (split.fee, split.net) == (Money(150, "jpy"), Money(9_850, "jpy"))


def test_allocate_fee_rejects_negative_gross() -> None:
    with pytest.raises(MoneyError):
        allocate_fee(Money(-100, "usd"), FeeSchedule())


@pytest.mark.parametrize("kwargs", [{"bps": -1}, {"fixed_minor": -1}, {"bps": 2.9}, {"fixed_minor": True}])
def test_fee_schedule_rejects_negative_or_non_int(kwargs: dict[str, object]) -> None:
    with pytest.raises(MoneyError):
        FeeSchedule(**kwargs)  # type: ignore[arg-type]


@given(
    gross=st.integers(0, MAX_AMOUNT_MINOR * 10),
    bps=st.integers(0, 20_000),
    fixed=st.integers(0, 10_000),
    ccy=st.sampled_from(["usd", "jpy", "kwd"]),
)
def test_allocate_fee_invariants(gross: int, bps: int, fixed: int, ccy: str) -> None:
    split = allocate_fee(Money(gross, ccy), FeeSchedule(bps=bps, fixed_minor=fixed))
    assert split.fee + split.net == split.gross
    assert 0 <= split.fee.minor <= gross
    assert split.fee.currency == split.net.currency == ccy
    # the fee is the rounded percentage plus the fixed part, unless capped at the gross
    exact_pct_times_10k = gross * bps
    pct = (exact_pct_times_10k + 5_000) // 10_000  # half-up on a non-negative number
    assert split.fee.minor == min(gross, pct + fixed)
