"""Payment state machine: which status may follow which. Pure."""

from __future__ import annotations

from enum import StrEnum


class PaymentStatus(StrEnum):
    PROCESSING = "processing"
    REQUIRES_ACTION = "requires_action"
    REQUIRES_CAPTURE = "requires_capture"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    PARTIALLY_REFUNDED = "partially_refunded"
    REFUNDED = "refunded"
    DISPUTED = "disputed"


S = PaymentStatus

# First statuses at which POST /v1/payments answers (Update-with-Start early return).
STABLE: frozenset[PaymentStatus] = frozenset(
    {S.REQUIRES_ACTION, S.REQUIRES_CAPTURE, S.SUCCEEDED, S.FAILED, S.CANCELED}
)

# Statuses after which the checkout saga has nothing left to do.
TERMINAL: frozenset[PaymentStatus] = frozenset(
    {S.SUCCEEDED, S.FAILED, S.CANCELED, S.REFUNDED, S.PARTIALLY_REFUNDED, S.DISPUTED}
)

TRANSITIONS: dict[PaymentStatus, frozenset[PaymentStatus]] = {
    S.PROCESSING: frozenset({S.REQUIRES_ACTION, S.REQUIRES_CAPTURE, S.SUCCEEDED, S.FAILED, S.CANCELED}),
    S.REQUIRES_ACTION: frozenset({S.PROCESSING, S.REQUIRES_CAPTURE, S.SUCCEEDED, S.FAILED, S.CANCELED}),
    S.REQUIRES_CAPTURE: frozenset({S.PROCESSING, S.SUCCEEDED, S.CANCELED, S.FAILED}),
    S.SUCCEEDED: frozenset({S.PARTIALLY_REFUNDED, S.REFUNDED, S.DISPUTED}),
    S.PARTIALLY_REFUNDED: frozenset({S.PARTIALLY_REFUNDED, S.REFUNDED, S.DISPUTED}),
    S.DISPUTED: frozenset({S.SUCCEEDED, S.PARTIALLY_REFUNDED, S.REFUNDED}),
    S.FAILED: frozenset(),
    S.CANCELED: frozenset(),
    S.REFUNDED: frozenset(),
}


class InvalidTransition(ValueError):
    pass


def can_transition(current: PaymentStatus, new: PaymentStatus) -> bool:
    return new == current or new in TRANSITIONS[current]


def transition(current: PaymentStatus, new: PaymentStatus) -> PaymentStatus:
    """Return the new status, or raise InvalidTransition. Same-status is a no-op (idempotent)."""
    if not can_transition(current, new):
        raise InvalidTransition(f"payment cannot go from {current} to {new}")
    return new
