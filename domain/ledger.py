"""Double-entry posting rules. Pure: builds and checks transactions, never writes them.

Sign convention: debit positive, credit negative. A transaction balances when, per currency,
its postings sum to zero. Account names are strings (they are what ledger_entries stores):
`{kind}:{owner}:{ccy}` for owned accounts, `{kind}:{ccy}` for platform-wide ones, currency in
lower-case ISO 4217. Names are checked strictly (no case folding) so that one account can never
be spelled two ways and split its balance.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

from domain.money import CURRENCY_EXPONENTS, FeeSplit, MoneyError, normalize_currency


class LedgerError(ValueError):
    """A transaction or account name that the ledger must not accept."""


class UnbalancedTransaction(LedgerError):
    def __init__(self, key: str, sums: dict[str, int]) -> None:
        self.key = key
        self.sums = dict(sums)
        detail = ", ".join(f"{ccy}={total:+d}" for ccy, total in sorted(sums.items()))
        super().__init__(f"transaction {key!r} does not balance: {detail}")


# kind -> whether the account has an owner (psp, merchant or customer id) in its name
ACCOUNT_KINDS: dict[str, bool] = {
    "psp_receivable": True,
    "merchant_payable": True,
    "platform_fees": False,
    "customer_wallet": True,
    "fx_position": False,
    "dispute_reserve": True,
    "payouts_in_transit": True,
    "bank": False,
}


@dataclass(frozen=True)
class Account:
    kind: str
    owner: str | None
    currency: str

    def __post_init__(self) -> None:
        if self.kind not in ACCOUNT_KINDS:
            raise LedgerError(f"unknown account kind: {self.kind!r}")
        if ACCOUNT_KINDS[self.kind]:
            if not isinstance(self.owner, str) or not self.owner.strip():
                raise LedgerError(f"{self.kind} account needs an owner")
            # ':' separates name parts; whitespace would make two spellings of one owner
            if ":" in self.owner or self.owner != self.owner.strip():
                raise LedgerError(f"invalid account owner: {self.owner!r}")
        elif self.owner is not None:
            raise LedgerError(f"{self.kind} account has no owner")
        try:
            object.__setattr__(self, "currency", normalize_currency(self.currency))
        except MoneyError as exc:
            raise LedgerError(str(exc)) from None

    @property
    def name(self) -> str:
        if self.owner is None:
            return f"{self.kind}:{self.currency}"
        return f"{self.kind}:{self.owner}:{self.currency}"

    @classmethod
    def parse(cls, name: str) -> Account:
        if not isinstance(name, str):
            raise LedgerError("account name must be a string")
        parts = name.split(":")
        kind = parts[0]
        if kind not in ACCOUNT_KINDS:
            raise LedgerError(f"unknown account kind in {name!r}")
        has_owner = ACCOUNT_KINDS[kind]
        if len(parts) != (3 if has_owner else 2):
            raise LedgerError(f"wrong number of parts in account name {name!r}")
        currency = parts[-1]
        if currency not in CURRENCY_EXPONENTS:  # exact match: 'USD' is not a valid spelling
            raise LedgerError(f"unknown currency {currency!r} in account name {name!r}")
        owner = parts[1] if has_owner else None
        if has_owner and not owner:
            raise LedgerError(f"empty owner in account name {name!r}")
        account = cls(kind, owner, currency)
        if account.name != name:
            raise LedgerError(f"account name {name!r} is not in canonical form")
        return account


def psp_receivable(psp: str, ccy: str) -> Account:
    return Account("psp_receivable", psp, ccy)


def merchant_payable(merchant: str, ccy: str) -> Account:
    return Account("merchant_payable", merchant, ccy)


def platform_fees(ccy: str) -> Account:
    return Account("platform_fees", None, ccy)


def customer_wallet(customer: str, ccy: str) -> Account:
    return Account("customer_wallet", customer, ccy)


def fx_position(ccy: str) -> Account:
    return Account("fx_position", None, ccy)


def dispute_reserve(merchant: str, ccy: str) -> Account:
    return Account("dispute_reserve", merchant, ccy)


def payouts_in_transit(merchant: str, ccy: str) -> Account:
    return Account("payouts_in_transit", merchant, ccy)


def bank(ccy: str) -> Account:
    return Account("bank", None, ccy)


@dataclass(frozen=True)
class Posting:
    """One ledger line: signed minor units (debit +, credit -) on one account."""

    account: str
    amount: int
    currency: str

    def __post_init__(self) -> None:
        # bool is an int subclass; floats are never money
        if not isinstance(self.amount, int) or isinstance(self.amount, bool):
            raise LedgerError("posting amount must be an integer number of minor units")


def posting(account: Account, amount: int) -> Posting:
    """A posting on `account` in the account's own currency."""
    return Posting(account.name, amount, account.currency)


def unbalanced_currencies(postings: Iterable[Posting]) -> dict[str, int]:
    """currency -> sum, for each currency whose postings do not sum to zero."""
    sums: dict[str, int] = defaultdict(int)
    for p in postings:
        sums[p.currency] += p.amount
    return {ccy: total for ccy, total in sums.items() if total != 0}


@dataclass(frozen=True)
class LedgerTxn:
    """A balanced set of postings, posted idempotently by `key`. Constructing one validates it."""

    key: str
    kind: str
    ref: str
    postings: tuple[Posting, ...]

    def __post_init__(self) -> None:
        # Validated here, not only in build_txn, so an unbalanced LedgerTxn cannot exist at all.
        if not isinstance(self.key, str) or not self.key.strip():
            raise LedgerError("transaction key must be non-empty")
        if not isinstance(self.kind, str) or not self.kind.strip():
            raise LedgerError("transaction kind must be non-empty")
        if not isinstance(self.ref, str):
            raise LedgerError("transaction ref must be a string")
        object.__setattr__(self, "postings", tuple(self.postings))
        if len(self.postings) < 2:
            raise LedgerError(f"transaction {self.key!r} needs at least two postings")
        for p in self.postings:
            if not isinstance(p, Posting):
                raise LedgerError(f"transaction {self.key!r}: not a Posting: {p!r}")
            account = Account.parse(p.account)
            if p.currency != account.currency:
                raise LedgerError(
                    f"transaction {self.key!r}: posting currency {p.currency!r} "
                    f"does not match account {p.account!r}"
                )
            if p.amount == 0:
                raise LedgerError(f"transaction {self.key!r}: zero-amount posting on {p.account!r}")
        unbalanced = unbalanced_currencies(self.postings)
        if unbalanced:
            raise UnbalancedTransaction(self.key, unbalanced)


def build_txn(key: str, kind: str, ref: str, postings: Iterable[Posting]) -> LedgerTxn:
    """Validated transaction: see LedgerTxn; raises LedgerError / UnbalancedTransaction."""
    return LedgerTxn(key=key, kind=kind, ref=ref, postings=tuple(postings))


def _check_split(split: FeeSplit) -> None:
    if split.gross.minor <= 0:
        raise LedgerError("a capture needs a positive gross amount")
    if split.fee.minor < 0 or split.net.minor < 0:
        raise LedgerError("fee and net cannot be negative")
    if split.fee.currency != split.gross.currency or split.net.currency != split.gross.currency:
        raise LedgerError("fee split mixes currencies")
    if split.fee.minor + split.net.minor != split.gross.minor:
        raise LedgerError("fee + net must equal gross")


def _capture_postings(payment_id: str, merchant_id: str, psp: str, split: FeeSplit) -> list[Posting]:
    if not isinstance(payment_id, str) or not payment_id or ":" in payment_id:
        raise LedgerError(f"invalid payment id for a ledger key: {payment_id!r}")
    _check_split(split)
    ccy = split.gross.currency
    lines = [
        posting(psp_receivable(psp, ccy), split.gross.minor),
        posting(merchant_payable(merchant_id, ccy), -split.net.minor),
        posting(platform_fees(ccy), -split.fee.minor),
    ]
    # a zero fee (or a tiny payment that is all fee) has no line rather than a zero line
    return [p for p in lines if p.amount != 0]


def capture_txn(payment_id: str, merchant_id: str, psp: str, split: FeeSplit) -> LedgerTxn:
    """Captured funds: the PSP owes us gross; we owe the merchant net and keep the fee."""
    lines = _capture_postings(payment_id, merchant_id, psp, split)
    return build_txn(f"payment:{payment_id}:capture", "capture", payment_id, lines)


def capture_reversal_txn(
    payment_id: str, merchant_id: str, psp: str, split: FeeSplit, key_suffix: str = "reversal"
) -> LedgerTxn:
    """The exact mirror of capture_txn (a refund of the whole capture, fee included)."""
    if not key_suffix:
        raise LedgerError("key_suffix must be non-empty")
    lines = _capture_postings(payment_id, merchant_id, psp, split)
    mirrored = [Posting(p.account, -p.amount, p.currency) for p in lines]
    return build_txn(f"payment:{payment_id}:{key_suffix}", "capture_reversal", payment_id, mirrored)


def balances(entries: Iterable[Posting]) -> dict[str, int]:
    """account -> balance (sum of its signed amounts). Accounts that net to zero stay, as 0."""
    out: dict[str, int] = defaultdict(int)
    for p in entries:
        out[p.account] += p.amount
    return dict(out)
