"""Refund and return rules. Pure: how much may be refunded, which fee share goes back, what the
payment's status becomes, which ledger transaction a refund posts, what may be returned.

Amounts are integer minor units of the payment's currency throughout.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from domain.ledger import (
    LedgerError,
    LedgerTxn,
    build_txn,
    merchant_payable,
    platform_fees,
    posting,
    psp_receivable,
)
from domain.states import PaymentStatus

RefundFeePolicy = Literal["keep", "return"]
FEE_POLICIES: frozenset[str] = frozenset({"keep", "return"})

# Refund row statuses that hold part of the captured amount: a pending refund reserves its amount
# until it succeeds (then it is refunded) or fails (then it is released).
HOLDING_STATUSES: frozenset[str] = frozenset({"pending", "succeeded"})

# Payment statuses a refund may start from (captured money, no dispute open).
REFUNDABLE_STATUSES: frozenset[PaymentStatus] = frozenset(
    {PaymentStatus.SUCCEEDED, PaymentStatus.PARTIALLY_REFUNDED}
)
# Authorized but not captured: a "refund" releases the hold, i.e. cancels the payment.
UNCAPTURED_STATUSES: frozenset[PaymentStatus] = frozenset(
    {PaymentStatus.REQUIRES_CAPTURE, PaymentStatus.REQUIRES_ACTION}
)


class RefundError(ValueError):
    """A refund the rules refuse; `code` is the API error code (Stripe's where one exists)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _non_negative(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def refundable(captured: int, refunded: int, pending: int) -> int:
    """captured - refunded - pending. Negative would mean more was refunded than captured: that is a
    broken invariant, not a business case, so it raises."""
    _non_negative(captured=captured, refunded=refunded, pending=pending)
    left = captured - refunded - pending
    if left < 0:
        raise ValueError(f"refunds ({refunded} done + {pending} pending) exceed the captured {captured}")
    return left


def decide_refund_amount(captured: int, refunded: int, pending: int, requested: int | None) -> int:
    """The amount to refund: `requested`, or everything still refundable when None.

    Raises RefundError charge_already_refunded (nothing left at all) or amount_too_large (more than
    what is left once pending refunds are counted)."""
    left = refundable(captured, refunded, pending)
    if captured > 0 and refunded >= captured:
        raise RefundError("charge_already_refunded", "This payment has already been refunded in full.")
    if requested is None:
        if left == 0:
            raise RefundError(
                "amount_too_large",
                f"Nothing is left to refund: {pending} of the captured {captured} is in pending refunds.",
            )
        return left
    if not isinstance(requested, int) or isinstance(requested, bool) or requested <= 0:
        raise RefundError("amount_invalid", "The refund amount must be a positive integer.")
    if requested > left:
        raise RefundError(
            "amount_too_large",
            f"Refund amount ({requested}) is greater than the unrefunded amount on the payment ({left}).",
        )
    return requested


def status_after_refunds(captured: int, refunded_total: int) -> PaymentStatus:
    """refunded once everything captured went back, partially_refunded before that."""
    _non_negative(captured=captured, refunded_total=refunded_total)
    if not 0 < refunded_total <= captured:
        raise ValueError(f"refunded total {refunded_total} outside 1..{captured}")
    return PaymentStatus.REFUNDED if refunded_total == captured else PaymentStatus.PARTIALLY_REFUNDED


def _fee_upto(fee: int, captured: int, refunded: int) -> int:
    """round_half_up(fee * refunded / captured), in integers (no floats, no Decimal needed)."""
    return (2 * fee * refunded + captured) // (2 * captured)


def refund_fee_share(fee: int, captured: int, refunded_before: int, amount: int) -> int:
    """The part of the capture's processing fee that a refund of `amount` gives back.

    Proportional, with CUMULATIVE rounding (half up): the share is the rounded fee for everything
    refunded after this refund minus the rounded fee for everything refunded before it. So any
    sequence of partial refunds that adds up to the captured amount gives back exactly `fee`,
    never a cent more or less, and each share lies in 0..amount.
    """
    _non_negative(fee=fee, captured=captured, refunded_before=refunded_before, amount=amount)
    if captured == 0:
        raise ValueError("captured must be positive")
    if fee > captured:
        raise ValueError(f"fee {fee} exceeds the captured {captured}")
    if amount == 0 or refunded_before + amount > captured:
        raise ValueError(f"refund {amount} after {refunded_before} outside 1..{captured - refunded_before}")
    return _fee_upto(fee, captured, refunded_before + amount) - _fee_upto(fee, captured, refunded_before)


def fee_returned(policy: str, fee: int, captured: int, refunded_before: int, amount: int) -> int:
    """What the platform gives back of its fee under the merchant's policy ("keep" by default)."""
    if policy not in FEE_POLICIES:
        raise ValueError(f"unknown refund fee policy {policy!r} (keep | return)")
    if policy == "keep":
        _non_negative(fee=fee, captured=captured, refunded_before=refunded_before, amount=amount)
        return 0
    return refund_fee_share(fee, captured, refunded_before, amount)


def refund_key(refund_id: str) -> str:
    return f"refund:{refund_id}"


def refund_txn(
    refund_id: str,
    payment_id: str,
    merchant_id: str,
    psp: str,
    currency: str,
    amount: int,
    fee_back: int = 0,
) -> LedgerTxn:
    """The reversal of (part of) a capture: the PSP owes us `amount` less (it paid the customer
    back); the merchant bears amount - fee_back, the platform gives back fee_back of its fee."""
    if not isinstance(refund_id, str) or not refund_id or ":" in refund_id:
        raise LedgerError(f"invalid refund id for a ledger key: {refund_id!r}")
    if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
        raise LedgerError("a refund needs a positive amount")
    if not isinstance(fee_back, int) or isinstance(fee_back, bool) or not 0 <= fee_back <= amount:
        raise LedgerError(f"fee share {fee_back!r} outside 0..{amount}")
    lines = [
        posting(psp_receivable(psp, currency), -amount),
        posting(merchant_payable(merchant_id, currency), amount - fee_back),
        posting(platform_fees(currency), fee_back),
    ]
    # a zero line (all fee, or no fee share) is left out rather than posted as 0
    return build_txn(refund_key(refund_id), "refund", payment_id, [p for p in lines if p.amount != 0])


# ---- returns ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OrderLine:
    product_id: str
    quantity: int
    unit_price: int


@dataclass(frozen=True)
class ReturnLine:
    product_id: str
    quantity: int
    unit_price: int

    @property
    def amount(self) -> int:
        return self.quantity * self.unit_price


def returnable_quantities(ordered: Iterable[OrderLine], returned: Mapping[str, int]) -> dict[str, int]:
    """product -> units that may still be returned (ordered minus already returned, never below 0)."""
    left: dict[str, int] = {}
    for line in ordered:
        left[line.product_id] = left.get(line.product_id, 0) + line.quantity
    return {pid: max(0, qty - returned.get(pid, 0)) for pid, qty in left.items()}


def plan_return(
    ordered: Iterable[OrderLine], returned: Mapping[str, int], requested: Iterable[tuple[str, int]]
) -> list[ReturnLine]:
    """The lines of a return (a product asked twice is one line), priced at the order's unit price.

    Raises RefundError: return_items_invalid (empty, non-positive quantity, product not in the
    order) or return_quantity_exceeded (more than ordered minus already returned)."""
    ordered = list(ordered)
    prices = {line.product_id: line.unit_price for line in ordered}
    left = returnable_quantities(ordered, returned)
    wanted: dict[str, int] = {}
    for product_id, quantity in requested:
        if not isinstance(quantity, int) or isinstance(quantity, bool) or quantity <= 0:
            raise RefundError("return_items_invalid", "Every returned quantity must be a positive integer.")
        if product_id not in prices:
            raise RefundError("return_items_invalid", f"Product {product_id} is not part of this order.")
        wanted[product_id] = wanted.get(product_id, 0) + quantity
    if not wanted:
        raise RefundError("return_items_invalid", "A return needs at least one item.")
    for product_id, quantity in wanted.items():
        if quantity > left[product_id]:
            raise RefundError(
                "return_quantity_exceeded",
                f"Product {product_id}: {quantity} to return, but only {left[product_id]} "
                "of the ordered units are not returned yet.",
            )
    return [ReturnLine(pid, qty, prices[pid]) for pid, qty in sorted(wanted.items())]
