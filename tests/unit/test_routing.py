"""PSP routing: rules, the default order, the circuit breaker (domain/routing.py), the API's route
for a card (api/routes/payment_methods.plan_route) and the CLI that stores a merchant's rules."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from api.routes.payment_methods import card_tokens, plan_route
from cli import build_parser, create_merchant, merchant_routing
from core.config import Settings
from core.tables import PaymentMethod
from domain.routing import (
    CircuitBreaker,
    CircuitState,
    RoutingRule,
    RoutingRuleError,
    candidates,
    parse_rules,
    route,
)
from psp.registry import KNOWN_PSPS, configured_psps, default_order

DEFAULT = ("sandbox", "sandbox_b")
EUR_TO_B = RoutingRule("eur", None, None, None, ("sandbox_b", "sandbox"))
BIG_TO_STRIPE = RoutingRule(None, "card", 100_000, None, ("stripe",))
SMALL_USD = RoutingRule("usd", None, None, 999, ("sandbox",))


# ---------------------------------------------------------------- rules


@pytest.mark.parametrize(
    ("currency", "method", "amount", "expected"),
    [
        ("eur", "card", 500, ("sandbox_b", "sandbox")),  # first rule
        ("EUR", "card", 500_000, ("sandbox_b", "sandbox")),  # currency case-insensitive; first match wins
        ("usd", "card", 100_000, ("stripe",)),  # min_amount is inclusive
        ("usd", "card", 99_999, DEFAULT),  # below rule 2's min, above rule 3's max
        ("usd", "card", 999, ("sandbox",)),  # max_amount is inclusive
        ("usd", "card", 1000, DEFAULT),  # nothing matches: the default order
        ("usd", "wallet", 200_000, DEFAULT),  # the method condition
        ("gbp", "card", 5, DEFAULT),
    ],
)
def test_route_first_matching_rule_else_default(
    currency: str, method: str, amount: int, expected: Any
) -> None:
    rules = (EUR_TO_B, BIG_TO_STRIPE, SMALL_USD)
    assert route(rules, DEFAULT, currency, method, amount) == expected


def test_no_rules_is_the_default_order() -> None:
    assert route((), ["sandbox"], "usd", "card", 1) == ("sandbox",)


def test_candidates_keep_the_order_and_drop_what_is_not_usable() -> None:
    assert candidates(
        ["stripe", "sandbox_b", "sandbox", "sandbox_b"], {"sandbox": "t1", "sandbox_b": "t2"}
    ) == [
        "sandbox_b",
        "sandbox",
    ]
    assert candidates(["stripe"], ["sandbox"]) == []


def test_rules_round_trip_through_json() -> None:
    raw = [
        {"currency": "EUR", "psps": ["sandbox_b", "sandbox"]},
        {"method": "card", "min_amount": 100_000, "psps": ["stripe"]},
        {"currency": "usd", "max_amount": 999, "psps": ["sandbox"]},
    ]
    rules = parse_rules(raw, KNOWN_PSPS)
    assert rules == (EUR_TO_B, BIG_TO_STRIPE, SMALL_USD)
    stored = json.loads(json.dumps([r.to_json() for r in rules]))
    assert stored[0] == {"currency": "eur", "psps": ["sandbox_b", "sandbox"]}
    assert parse_rules(stored, KNOWN_PSPS) == rules


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"psps": ["sandbox"]}, "rules must be a list"),
        (["sandbox"], r"rules\[0\] must be an object"),
        ([{"psps": []}], r"rules\[0\]\.psps must be a non-empty list"),
        ([{"currency": "eur"}], r"rules\[0\]\.psps must be a non-empty list"),
        ([{"psps": ["sandbox"]}, {"psps": "sandbox"}], r"rules\[1\]\.psps must be a non-empty list"),
        ([{"psps": ["paypal"]}], "unknown PSP 'paypal'"),
        ([{"psps": ["Sandbox"]}], "is not a PSP name"),
        ([{"psps": ["sandbox", "sandbox"]}], "lists a PSP twice"),
        ([{"currency": "euro", "psps": ["sandbox"]}], "currency must be a 3-letter"),
        ([{"currency": 978, "psps": ["sandbox"]}], "currency must be a 3-letter"),
        ([{"method": "Card!", "psps": ["sandbox"]}], "method must be"),
        ([{"min_amount": -1, "psps": ["sandbox"]}], "min_amount must be a non-negative integer"),
        ([{"max_amount": 1.5, "psps": ["sandbox"]}], "max_amount must be a non-negative integer"),
        ([{"max_amount": True, "psps": ["sandbox"]}], "max_amount must be a non-negative integer"),
        ([{"min_amount": 10, "max_amount": 9, "psps": ["sandbox"]}], "min_amount is greater than max_amount"),
        ([{"amount": 10, "psps": ["sandbox"]}], "unknown field"),
        ([{"psps": ["sandbox"]}] * 51, "at most 50 rules"),
    ],
)
def test_invalid_rules_are_refused_with_the_place(raw: Any, message: str) -> None:
    with pytest.raises(RoutingRuleError, match=message):
        parse_rules(raw, KNOWN_PSPS)


def test_unknown_psps_pass_without_a_known_list() -> None:
    assert parse_rules([{"psps": ["adyen"]}])[0].psps == ("adyen",)


@given(
    amount=st.integers(min_value=0, max_value=10**9),
    low=st.one_of(st.none(), st.integers(min_value=0, max_value=10**9)),
    high=st.one_of(st.none(), st.integers(min_value=0, max_value=10**9)),
)
def test_amount_bounds_are_inclusive(amount: int, low: int | None, high: int | None) -> None:
    rule = RoutingRule(None, None, low, high, ("sandbox",))
    inside = (low is None or amount >= low) and (high is None or amount <= high)
    assert rule.matches("usd", "card", amount) is inside


# ---------------------------------------------------------------- default order / registry


def test_default_order_puts_psp_default_first() -> None:
    s = Settings(_env_file=None, psp_default="sandbox")  # type: ignore[call-arg]
    assert default_order(s, ["stripe", "sandbox_b", "sandbox"]) == ("sandbox", "sandbox_b", "stripe")
    s = Settings(_env_file=None, psp_default="stripe")  # type: ignore[call-arg]
    assert default_order(s, ["sandbox", "stripe", "sandbox_b"]) == ("stripe", "sandbox", "sandbox_b")
    assert default_order(s, ["sandbox_b", "sandbox"]) == ("sandbox", "sandbox_b")  # the default is not there


def test_second_sandbox_is_configured_by_port_or_url(tmp_path: Path) -> None:
    none = Settings(_env_file=None, data_dir=tmp_path)  # type: ignore[call-arg]
    assert none.sandbox_b_url == "" and configured_psps(none) == ["sandbox"]
    by_port = Settings(_env_file=None, data_dir=tmp_path, sandbox_b_port=8101)  # type: ignore[call-arg]
    assert by_port.sandbox_b_url == "http://127.0.0.1:8101"
    assert by_port.sandbox_b_db == str(tmp_path / "sandbox_b.db") != by_port.sandbox_db
    assert configured_psps(by_port) == ["sandbox", "sandbox_b"]
    by_url = Settings(_env_file=None, sandbox_b_url="http://psp-b:8100")  # type: ignore[call-arg]
    assert by_url.sandbox_b_port == 0 and configured_psps(by_url) == ["sandbox", "sandbox_b"]


# ---------------------------------------------------------------- the API's route for a card


def _card(tokens: dict[str, str] | None = None, psp: str = "sandbox") -> PaymentMethod:
    return PaymentMethod(
        id="pm_1",
        merchant_id="mer_1",
        customer_id="cus_1",
        type="card",
        psp=psp,
        psp_token="tok_a",
        psp_tokens=tokens if tokens is not None else {},
        brand="visa",
        funding="credit",
        last4="4242",
        exp_month=12,
        exp_year=2034,
        country="US",
        fingerprint="f" * 32,
    )


SETTINGS = Settings(_env_file=None)  # type: ignore[call-arg]


def test_default_route_uses_every_psp_holding_a_token() -> None:
    pm = _card({"sandbox": "tok_a", "sandbox_b": "tok_b"})
    r = plan_route(pm, [], SETTINGS, ["sandbox", "sandbox_b"], "usd", 2000)
    assert (r.psp, r.psp_token, r.route) == ("sandbox", "tok_a", ["sandbox", "sandbox_b"])
    assert r.psp_tokens == {"sandbox": "tok_a", "sandbox_b": "tok_b"}


def test_rule_order_wins_and_picks_that_psps_token() -> None:
    pm = _card({"sandbox": "tok_a", "sandbox_b": "tok_b"})
    rules = [{"currency": "eur", "psps": ["sandbox_b", "sandbox"]}]
    r = plan_route(pm, rules, SETTINGS, ["sandbox", "sandbox_b"], "eur", 2000)
    assert (r.psp, r.psp_token, r.route) == ("sandbox_b", "tok_b", ["sandbox_b", "sandbox"])
    usd = plan_route(pm, rules, SETTINGS, ["sandbox", "sandbox_b"], "usd", 2000)
    assert usd.route == ["sandbox", "sandbox_b"]


def test_psps_without_a_token_or_not_configured_are_left_out() -> None:
    # tokenized only at the primary (the second PSP was down when the card was saved)
    old = _card({})
    assert card_tokens(old) == {"sandbox": "tok_a"}
    r = plan_route(old, [], SETTINGS, ["sandbox", "sandbox_b"], "usd", 2000)
    assert r.route == ["sandbox"] and r.psp_tokens == {"sandbox": "tok_a"}
    # a token at a PSP this API no longer has
    pm = _card({"sandbox": "tok_a", "sandbox_b": "tok_b"})
    assert plan_route(pm, [], SETTINGS, ["sandbox"], "usd", 1).route == ["sandbox"]


def test_a_rule_naming_no_usable_psp_falls_back_to_the_cards_own() -> None:
    pm = _card({"sandbox": "tok_a"})
    r = plan_route(pm, [{"psps": ["stripe"]}], SETTINGS, ["sandbox", "stripe"], "usd", 1)
    assert (r.psp, r.psp_token, r.route) == ("sandbox", "tok_a", ["sandbox"])


def test_broken_stored_rules_do_not_stop_payments() -> None:
    pm = _card({"sandbox": "tok_a", "sandbox_b": "tok_b"})
    r = plan_route(pm, [{"psps": "nope"}], SETTINGS, ["sandbox", "sandbox_b"], "usd", 1)
    assert r.route == ["sandbox", "sandbox_b"]


# ---------------------------------------------------------------- circuit breaker


def test_opens_after_n_consecutive_unavailable() -> None:
    cb = CircuitBreaker(failure_threshold=3, cooldown=30)
    for t in range(2):
        assert cb.allow(t) and cb.record("unavailable", t) is CircuitState.CLOSED
    assert cb.record("unavailable", 2) is CircuitState.OPEN
    assert not cb.allow(3) and not cb.can_route(3)
    assert cb.retry_in(12) == pytest.approx(20)


def test_a_success_or_a_refusal_resets_the_count() -> None:
    cb = CircuitBreaker(failure_threshold=3, cooldown=30)
    cb.record("unavailable", 0)
    cb.record("unavailable", 1)
    cb.record("success", 2)  # e.g. a 4xx: the PSP answered
    cb.record("unavailable", 3)
    cb.record("unavailable", 4)
    assert cb.current(5) is CircuitState.CLOSED and cb.failures == 2


def test_ambiguous_outcomes_neither_count_nor_reset() -> None:
    cb = CircuitBreaker(failure_threshold=2, cooldown=30)
    cb.record("unavailable", 0)
    cb.record("neutral", 1)
    assert cb.failures == 1 and cb.state is CircuitState.CLOSED
    assert cb.record("unavailable", 2) is CircuitState.OPEN


def test_half_open_lets_one_trial_through_and_its_success_closes() -> None:
    cb = CircuitBreaker(failure_threshold=1, cooldown=10)
    cb.record("unavailable", 0)
    assert cb.current(9.9) is CircuitState.OPEN and not cb.allow(9.9)
    assert cb.current(10) is CircuitState.HALF_OPEN and cb.can_route(10)
    assert cb.allow(10)  # the trial
    assert not cb.allow(11)  # a second caller waits for the trial's outcome
    assert cb.can_route(11)  # routing may still pick it: authorize then refuses fast
    assert cb.record("success", 12) is CircuitState.CLOSED
    assert cb.allow(12) and cb.failures == 0


def test_a_failed_trial_reopens_for_a_full_cooldown() -> None:
    cb = CircuitBreaker(failure_threshold=5, cooldown=10)
    for t in range(5):
        cb.record("unavailable", t)
    assert cb.allow(14)  # trial
    assert cb.record("unavailable", 15) is CircuitState.OPEN
    assert not cb.allow(24.9) and cb.retry_in(20) == pytest.approx(5)
    assert cb.allow(25)


def test_a_neutral_trial_frees_the_slot() -> None:
    cb = CircuitBreaker(failure_threshold=1, cooldown=10)
    cb.record("unavailable", 0)
    assert cb.allow(10) and not cb.allow(10.5)
    cb.record("neutral", 11)
    assert cb.state is CircuitState.HALF_OPEN and cb.allow(11)


def test_a_lost_trial_stops_blocking_after_another_cooldown() -> None:
    cb = CircuitBreaker(failure_threshold=1, cooldown=10)
    cb.record("unavailable", 0)
    assert cb.allow(10)
    assert not cb.allow(19.9)  # no outcome ever came back for the trial
    assert cb.allow(20)


def test_late_failures_while_open_restart_the_cooldown() -> None:
    # calls that do not ask the breaker (captures, lookups) keep finding the PSP down
    cb = CircuitBreaker(failure_threshold=1, cooldown=10)
    cb.record("unavailable", 0)
    cb.record("unavailable", 8)
    assert not cb.allow(12) and cb.allow(18)


def test_breaker_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(failure_threshold=0)
    with pytest.raises(ValueError):
        CircuitBreaker(cooldown=-1)


@given(st.lists(st.sampled_from(["success", "unavailable", "neutral"]), max_size=60))
def test_open_exactly_when_the_last_outcomes_are_threshold_failures(outcomes: list[Any]) -> None:
    # with an endless cool-down, the circuit is open iff some run of consecutive failures (neutral
    # outcomes ignored) since the last success reached the threshold
    cb = CircuitBreaker(failure_threshold=3, cooldown=1e9)
    run = 0
    tripped = False
    for t, outcome in enumerate(outcomes):
        cb.record(outcome, float(t))
        if outcome == "success":
            run, tripped = 0, False
        elif outcome == "unavailable":
            run += 1
            tripped = tripped or run >= 3
    assert (cb.current(float(len(outcomes))) is CircuitState.OPEN) is tripped


# ---------------------------------------------------------------- CLI: paysaga merchant routing


def test_cli_sets_validates_and_shows_rules(tmp_path: Path) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path)  # type: ignore[call-arg]
    merchant = create_merchant(settings, "Acme")
    assert merchant_routing(settings, merchant["id"], None) == {"id": merchant["id"], "routing_rules": []}

    out = merchant_routing(
        settings, merchant["id"], '[{"currency": "EUR", "psps": ["sandbox_b", "sandbox"]}]'
    )
    assert out["routing_rules"] == [{"currency": "eur", "psps": ["sandbox_b", "sandbox"]}]
    assert merchant_routing(settings, merchant["id"], None) == out  # stored

    with pytest.raises(ValueError, match="unknown PSP 'paypal'"):
        merchant_routing(settings, merchant["id"], '[{"psps": ["paypal"]}]')
    with pytest.raises(ValueError, match="not JSON"):
        merchant_routing(settings, merchant["id"], "[{")
    with pytest.raises(LookupError):
        merchant_routing(settings, "mer_nope", "[]")
    assert merchant_routing(settings, merchant["id"], None) == out  # refused changes changed nothing
    assert merchant_routing(settings, merchant["id"], "[]")["routing_rules"] == []


def test_cli_parser_has_the_routing_and_second_sandbox_options() -> None:
    args = build_parser().parse_args(["merchant", "routing", "--id", "mer_1", "--rules", "[]"])
    assert (args.id, args.rules) == ("mer_1", "[]")
    assert build_parser().parse_args(["psp", "--name", "sandbox_b"]).name == "sandbox_b"
    assert build_parser().parse_args(["psp"]).name == "sandbox"
