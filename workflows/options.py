"""Named activity timeout/retry presets and the saga timers.

Every activity call in a workflow spreads one preset: `workflow.execute_activity(..., **options.DB)`.
Non-retryable error types are the `ApplicationError.type` strings the activities raise for business
rejections; retrying those cannot succeed, so they surface to the workflow at once.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Final, TypedDict

from temporalio.common import RetryPolicy


class ActivityOptions(TypedDict):
    """The keyword arguments of `workflow.execute_activity` a preset fixes."""

    start_to_close_timeout: timedelta
    retry_policy: RetryPolicy


# Our own database (payments, stock, ledger, fraud rules): transient trouble is retried for as long
# as it takes (maximum_attempts=0 = unlimited); only business rejections stop the retries.
DB: Final[ActivityOptions] = {
    "start_to_close_timeout": timedelta(seconds=10),
    "retry_policy": RetryPolicy(
        initial_interval=timedelta(milliseconds=200),
        backoff_coefficient=2.0,
        maximum_interval=timedelta(seconds=10),
        maximum_attempts=0,
        non_retryable_error_types=["NotFound", "InvalidTransition", "OutOfStock", "LedgerPostingFailed"],
    ),
}

# Forward PSP calls (authorize, authenticate, capture): bounded, so a PSP outage fails the payment
# (psp_unavailable) in about 1.5 minutes instead of leaving the customer waiting. Every call carries
# a stable idempotency key, so a retry never charges twice.
PSP: Final[ActivityOptions] = {
    "start_to_close_timeout": timedelta(seconds=15),
    "retry_policy": RetryPolicy(
        initial_interval=timedelta(seconds=1),
        backoff_coefficient=2.0,
        maximum_interval=timedelta(seconds=30),
        maximum_attempts=8,
        non_retryable_error_types=["PSPRejected"],
    ),
}

# Undo steps (void, refund, stock release): an undo must eventually happen, so nothing is
# non-retryable and there is no attempt limit. A stuck undo shows up in the UI as a pending activity
# with a growing attempt count, which is what an operator needs to see and fix.
COMPENSATION: Final[ActivityOptions] = {
    "start_to_close_timeout": timedelta(seconds=30),
    "retry_policy": RetryPolicy(
        initial_interval=timedelta(seconds=1),
        backoff_coefficient=2.0,
        maximum_interval=timedelta(seconds=60),
        maximum_attempts=0,
    ),
}

# Receipts and other notifications: best effort, a failure never fails a payment.
NOTIFY: Final[ActivityOptions] = {
    "start_to_close_timeout": timedelta(seconds=30),
    "retry_policy": RetryPolicy(
        initial_interval=timedelta(seconds=1),
        backoff_coefficient=2.0,
        maximum_interval=timedelta(seconds=30),
        maximum_attempts=5,
    ),
}

# Saga timers.
ACTION_TIMEOUT: Final = timedelta(minutes=10)  # customer's time to enter the OTP / finish the redirect
CAPTURE_WINDOW: Final = timedelta(days=7)  # how long a manual-capture authorization is held
REVIEW_TIMEOUT: Final = timedelta(hours=24)  # manual fraud review; no verdict in time = decline

# Learning what the PSP holds when no answer came (a redirect still open, an ambiguous failure):
# the workflow wakes on a webhook, a return-URL nudge or the next poll, and looks the payment up.
# Each look-up is short (a few attempts); the waiting loop is what retries, with this backoff.
LOOKUP: Final[ActivityOptions] = {
    "start_to_close_timeout": timedelta(seconds=15),
    "retry_policy": RetryPolicy(
        initial_interval=timedelta(seconds=1),
        backoff_coefficient=2.0,
        maximum_interval=timedelta(seconds=4),
        maximum_attempts=3,
    ),
}
POLL_FIRST: Final = timedelta(seconds=5)  # first poll; doubles after each poll that learned nothing
POLL_MAX: Final = timedelta(seconds=60)
# How long an ambiguous PSP failure (authorize or capture) is investigated before the payment fails.
AMBIGUITY_TIMEOUT: Final = timedelta(minutes=10)
# "No payment at the PSP" after an ambiguous authorize counts only this long after the failure: a
# request still in flight at the PSP could otherwise land after we declared nothing was charged.
AMBIGUITY_SETTLE: Final = timedelta(seconds=30)
