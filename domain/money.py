"""Money as integer minor units of an ISO 4217 currency. No floats, ever."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import MAX_EMAX, MIN_EMIN, ROUND_HALF_UP, Decimal, Inexact, InvalidOperation, localcontext

# ISO 4217 minor-unit exponents for the currencies we accept. A currency not listed here is
# rejected at the edge rather than guessed (guessing an exponent mis-prices by 10^n).
CURRENCY_EXPONENTS: dict[str, int] = {
    "usd": 2,
    "eur": 2,
    "gbp": 2,
    "chf": 2,
    "cad": 2,
    "aud": 2,
    "nzd": 2,
    "sgd": 2,
    "hkd": 2,
    "sek": 2,
    "nok": 2,
    "dkk": 2,
    "pln": 2,
    "czk": 2,
    "mxn": 2,
    "brl": 2,
    "inr": 2,
    "cny": 2,
    "zar": 2,
    "ils": 2,
    "aed": 2,
    "try": 2,
    "thb": 2,
    "php": 2,
    "myr": 2,
    "jpy": 0,
    "krw": 0,
    "vnd": 0,
    "clp": 0,
    "isk": 0,
    "huf": 2,
    "kwd": 3,
    "bhd": 3,
    "omr": 3,
    "jod": 3,
    "tnd": 3,
}

# Largest amount we accept in one payment, in minor units (Stripe's limit is 8 digits for most
# currencies; we allow more headroom but stay far inside a signed 64-bit integer).
MAX_AMOUNT_MINOR = 10**12


class MoneyError(ValueError):
    """An amount or currency that cannot be money."""


def normalize_currency(currency: str) -> str:
    """Lower-case ISO 4217 code, or MoneyError if we do not know it."""
    if not isinstance(currency, str):
        raise MoneyError("currency must be a string")
    code = currency.strip().lower()
    if code not in CURRENCY_EXPONENTS:
        raise MoneyError(f"unsupported currency: {currency!r}")
    return code


def exponent(currency: str) -> int:
    return CURRENCY_EXPONENTS[normalize_currency(currency)]


@dataclass(frozen=True, slots=True)
class Money:
    minor: int
    currency: str

    def __post_init__(self) -> None:
        # bool is an int subclass; True is not one cent.
        if not isinstance(self.minor, int) or isinstance(self.minor, bool):
            raise MoneyError("amount must be an integer number of minor units")
        object.__setattr__(self, "currency", normalize_currency(self.currency))

    @classmethod
    def of(cls, minor: int, currency: str) -> Money:
        return cls(minor, currency)

    @classmethod
    def parse(cls, major: str, currency: str) -> Money:
        """'12.34' USD -> 1234. Rejects more decimals than the currency has."""
        exp = exponent(currency)
        # A bad string must be a MoneyError (a 400 at the edge), not InvalidOperation/OverflowError.
        if not isinstance(major, str):
            raise MoneyError("amount must be given as a decimal string")
        try:
            value = Decimal(major)
        except InvalidOperation:
            raise MoneyError(f"not a decimal amount: {major!r}") from None
        if not value.is_finite():
            raise MoneyError(f"not a finite amount: {major!r}")
        # Checked before scaling: '1e999999999' would overflow the context or build a huge int.
        if value.copy_abs() > Decimal(MAX_AMOUNT_MINOR).scaleb(-exp):
            raise MoneyError("amount is too large")
        # Scaling must be exact: no rounding away a digit ('0.0100...01' USD is not 1 cent) and no
        # underflow to zero ('1e-999999999' is not 0).
        with localcontext() as ctx:
            ctx.prec = max(ctx.prec, len(value.as_tuple().digits))
            ctx.Emin, ctx.Emax = MIN_EMIN, MAX_EMAX
            ctx.traps[Inexact] = True
            scaled = value.scaleb(exp)
        if scaled != scaled.to_integral_value():
            raise MoneyError(f"{major} has more than {exp} decimals for {currency}")
        return cls(int(scaled), currency)

    def _same(self, other: Money) -> None:
        if not isinstance(other, Money) or other.currency != self.currency:
            raise MoneyError("cannot combine different currencies")

    def __add__(self, other: Money) -> Money:
        self._same(other)
        return Money(self.minor + other.minor, self.currency)

    def __sub__(self, other: Money) -> Money:
        self._same(other)
        return Money(self.minor - other.minor, self.currency)

    def __neg__(self) -> Money:
        return Money(-self.minor, self.currency)

    def __lt__(self, other: Money) -> bool:
        self._same(other)
        return self.minor < other.minor

    def __le__(self, other: Money) -> bool:
        self._same(other)
        return self.minor <= other.minor

    def is_zero(self) -> bool:
        return self.minor == 0

    def format(self) -> str:
        """Human form for receipts: '12.34 USD', '1000 JPY', '1.500 KWD'."""
        exp = exponent(self.currency)
        sign = "-" if self.minor < 0 else ""
        whole, frac = divmod(abs(self.minor), 10**exp) if exp else (abs(self.minor), 0)
        body = f"{whole}.{frac:0{exp}d}" if exp else f"{whole}"
        return f"{sign}{body} {self.currency.upper()}"


def validate_amount(minor: object, currency: str, *, allow_zero: bool = False) -> Money:
    """Edge validation for an API amount: a positive integer within limits."""
    if not isinstance(minor, int) or isinstance(minor, bool):
        raise MoneyError("amount must be an integer number of minor units")
    if minor < 0 or (minor == 0 and not allow_zero):
        raise MoneyError("amount must be positive")
    if minor > MAX_AMOUNT_MINOR:
        raise MoneyError("amount is too large")
    return Money(minor, currency)


@dataclass(frozen=True, slots=True)
class FeeSchedule:
    """Per-merchant processing fee: basis points of the amount plus a fixed part, in minor units."""

    bps: int = 290
    fixed_minor: int = 30

    def __post_init__(self) -> None:
        # A negative fee would pay the merchant more than the customer paid.
        for name in ("bps", "fixed_minor"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise MoneyError(f"fee schedule {name} must be a non-negative integer")


@dataclass(frozen=True, slots=True)
class FeeSplit:
    gross: Money
    fee: Money
    net: Money


def allocate_fee(gross: Money, schedule: FeeSchedule) -> FeeSplit:
    """Split a captured amount into platform fee and merchant net.

    The percentage part is rounded half-up to the minor unit; the fee never exceeds the gross
    (a tiny payment pays at most itself), so net is never negative and fee + net == gross.
    """
    if gross.minor < 0:
        raise MoneyError("cannot take a fee from a negative amount")
    pct = (Decimal(gross.minor) * Decimal(schedule.bps) / Decimal(10_000)).quantize(
        Decimal(1), rounding=ROUND_HALF_UP
    )
    fee_minor = min(gross.minor, int(pct) + schedule.fixed_minor)
    fee = Money(fee_minor, gross.currency)
    return FeeSplit(gross=gross, fee=fee, net=gross - fee)
