from __future__ import annotations

import pytest

from domain.states import (
    STABLE,
    TERMINAL,
    TRANSITIONS,
    InvalidTransition,
    PaymentStatus,
    can_transition,
    transition,
)

S = PaymentStatus
ALL = list(PaymentStatus)
POST_SUCCESS = {S.PARTIALLY_REFUNDED, S.REFUNDED, S.DISPUTED}

ALLOWED = [
    (S.PROCESSING, S.REQUIRES_ACTION),
    (S.PROCESSING, S.REQUIRES_CAPTURE),
    (S.PROCESSING, S.SUCCEEDED),
    (S.PROCESSING, S.FAILED),
    (S.PROCESSING, S.CANCELED),
    (S.REQUIRES_ACTION, S.PROCESSING),
    (S.REQUIRES_ACTION, S.REQUIRES_CAPTURE),
    (S.REQUIRES_ACTION, S.SUCCEEDED),
    (S.REQUIRES_ACTION, S.FAILED),
    (S.REQUIRES_ACTION, S.CANCELED),
    (S.REQUIRES_CAPTURE, S.SUCCEEDED),
    (S.REQUIRES_CAPTURE, S.CANCELED),
    (S.REQUIRES_CAPTURE, S.FAILED),
    (S.SUCCEEDED, S.PARTIALLY_REFUNDED),
    (S.SUCCEEDED, S.REFUNDED),
    (S.SUCCEEDED, S.DISPUTED),
    (S.PARTIALLY_REFUNDED, S.REFUNDED),
    (S.PARTIALLY_REFUNDED, S.DISPUTED),
    (S.DISPUTED, S.SUCCEEDED),  # dispute won
    (S.DISPUTED, S.REFUNDED),
]

FORBIDDEN = [
    (S.SUCCEEDED, S.PROCESSING),
    (S.SUCCEEDED, S.FAILED),
    (S.SUCCEEDED, S.CANCELED),
    (S.SUCCEEDED, S.REQUIRES_CAPTURE),
    (S.FAILED, S.SUCCEEDED),
    (S.FAILED, S.PROCESSING),
    (S.CANCELED, S.SUCCEEDED),
    (S.CANCELED, S.REQUIRES_CAPTURE),
    (S.REFUNDED, S.SUCCEEDED),
    (S.REFUNDED, S.PARTIALLY_REFUNDED),
    (S.PARTIALLY_REFUNDED, S.SUCCEEDED),
    (S.REQUIRES_CAPTURE, S.REQUIRES_ACTION),
    (S.PROCESSING, S.REFUNDED),  # nothing captured yet
    (S.PROCESSING, S.DISPUTED),
    (S.REQUIRES_CAPTURE, S.REFUNDED),
    (S.DISPUTED, S.FAILED),
]


@pytest.mark.parametrize(("current", "new"), ALLOWED)
def test_allowed(current: PaymentStatus, new: PaymentStatus) -> None:
    assert can_transition(current, new)
    assert transition(current, new) is new


@pytest.mark.parametrize(("current", "new"), FORBIDDEN)
def test_forbidden(current: PaymentStatus, new: PaymentStatus) -> None:
    assert not can_transition(current, new)
    with pytest.raises(InvalidTransition):
        transition(current, new)


@pytest.mark.parametrize("status", ALL)
def test_same_status_is_a_no_op(status: PaymentStatus) -> None:
    assert can_transition(status, status)
    assert transition(status, status) == status


def test_every_status_has_a_transition_row() -> None:
    assert set(TRANSITIONS) == set(ALL)
    for targets in TRANSITIONS.values():
        assert targets <= set(ALL)


@pytest.mark.parametrize("status", sorted(TERMINAL))
def test_terminal_statuses_only_exit_through_refund_or_dispute(status: PaymentStatus) -> None:
    exits = TRANSITIONS[status] - {status}
    # the only way out of a terminal status is refund / dispute bookkeeping (and a won dispute
    # returning to succeeded): never back into the checkout flow, never failed or canceled
    assert exits <= POST_SUCCESS | {S.SUCCEEDED}
    if S.SUCCEEDED in exits:
        assert status == S.DISPUTED


@pytest.mark.parametrize("status", [S.FAILED, S.CANCELED, S.REFUNDED])
def test_dead_ends(status: PaymentStatus) -> None:
    assert TRANSITIONS[status] == frozenset()
    for other in ALL:
        assert can_transition(status, other) == (other == status)


def test_post_success_statuses_only_after_success() -> None:
    for status in ALL:
        if TRANSITIONS[status] & POST_SUCCESS:
            assert status in {S.SUCCEEDED} | POST_SUCCESS


def test_stable_is_a_subset_of_statuses() -> None:
    assert STABLE < set(ALL)
    assert STABLE <= set(TRANSITIONS)
    # processing is the one status the API never answers with (it waits for a stable one)
    assert S.PROCESSING not in STABLE
    assert {S.REQUIRES_ACTION, S.REQUIRES_CAPTURE, S.SUCCEEDED, S.FAILED, S.CANCELED} == STABLE


def test_terminal_excludes_in_flight_statuses() -> None:
    assert not {S.PROCESSING, S.REQUIRES_ACTION, S.REQUIRES_CAPTURE} & TERMINAL
    assert TERMINAL < set(ALL)


def test_status_values_are_the_api_strings() -> None:
    assert S("requires_capture") is S.REQUIRES_CAPTURE
    assert S.PARTIALLY_REFUNDED == "partially_refunded"
