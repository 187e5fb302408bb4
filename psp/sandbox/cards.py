"""Card rules of the sandbox PSP: Luhn, brand from the BIN, and the behaviour of Stripe's test cards.

The sandbox turns a card number into a behaviour profile at tokenization and keeps only that
profile (plus brand, funding, country, last4, exp): the number itself is never stored.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Literal

Behavior = Literal["succeed", "decline", "otp", "processing_error"]

VALID_OTP = "123456"
# How many authorization attempts (per idempotency key) of the processing_error card fail first.
PROCESSING_ERROR_ATTEMPTS = 2


@dataclass(frozen=True)
class CardProfile:
    behavior: Behavior
    funding: str = "credit"
    decline_code: str | None = None
    country: str = "US"


# Stripe's test cards (https://docs.stripe.com/testing), keyed by number.
TEST_CARDS: dict[str, CardProfile] = {
    "4242424242424242": CardProfile("succeed"),
    "5555555555554444": CardProfile("succeed"),
    "4000056655665556": CardProfile("succeed", funding="debit"),
    "4000000000000002": CardProfile("decline", decline_code="generic_decline"),
    "4000000000009995": CardProfile("decline", decline_code="insufficient_funds"),
    "4000000000000069": CardProfile("decline", decline_code="expired_card"),
    "4000002760003184": CardProfile("otp"),
    "4000000000000119": CardProfile("processing_error"),
}
DEFAULT_PROFILE = CardProfile("succeed")

DECLINE_MESSAGES: dict[str, str] = {
    "generic_decline": "Your card was declined.",
    "insufficient_funds": "Your card has insufficient funds.",
    "expired_card": "Your card has expired.",
    "authentication_failed": "The card holder failed the authentication.",
}


class CardError(ValueError):
    """A card the sandbox refuses to tokenize. The message never contains the number."""

    def __init__(self, code: str, message: str, param: str) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


def luhn_ok(number: str) -> bool:
    if not (number.isascii() and number.isdigit()) or not 12 <= len(number) <= 19:
        return False
    total = 0
    for i, ch in enumerate(reversed(number)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def brand_of(number: str) -> str:
    if number.startswith(("34", "37")):
        return "amex"
    if number.startswith("4"):
        return "visa"
    if len(number) >= 4 and (51 <= int(number[:2]) <= 55 or 2221 <= int(number[:4]) <= 2720):
        return "mastercard"
    return "unknown"


def profile_for(number: str) -> CardProfile:
    return TEST_CARDS.get(number, DEFAULT_PROFILE)


def normalize_number(number: str) -> str:
    # People paste numbers with spaces or dashes; those are formatting, not digits.
    return number.replace(" ", "").replace("-", "")


def validate_card(number: str, exp_month: int, exp_year: int, cvc: str, *, today: date) -> tuple[str, int]:
    """Check a card for tokenization; returns (normalized number, 4-digit expiry year)."""
    digits = normalize_number(number)
    if not luhn_ok(digits):
        raise CardError("invalid_number", "The card number is not a valid credit card number.", "number")
    if not 1 <= exp_month <= 12:
        raise CardError("invalid_expiry_month", "The card's expiration month is invalid.", "exp_month")
    year = exp_year + 2000 if 0 <= exp_year < 100 else exp_year
    if year < today.year or year > today.year + 50:
        raise CardError("invalid_expiry_year", "The card's expiration year is invalid.", "exp_year")
    if (year, exp_month) < (today.year, today.month):
        raise CardError("invalid_expiry_month", "The card's expiration month is in the past.", "exp_month")
    if not (cvc.isascii() and cvc.isdigit() and 3 <= len(cvc) <= 4):
        raise CardError("invalid_cvc", "The card's security code is invalid.", "cvc")
    return digits, year
