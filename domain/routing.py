"""PSP routing: which PSPs a payment may go to, in which order, and the circuit breaker that says
whether a PSP is worth calling right now. Pure: no I/O, no clock (every time is an explicit `now`,
in seconds of any monotonic clock).

Rules are per merchant. The first rule whose conditions all match (a None condition matches
anything) gives the PSP order; no match gives the platform's default order. The order is a
preference list: the payment goes to the first PSP whose circuit is not open, and fails over to the
next one only when an attempt is known not to have charged (see workflows/failover.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

# PSP names as stored in payments.psp (String(20)).
_PSP_NAME = re.compile(r"^[a-z][a-z0-9_]{0,19}$")
_CURRENCY = re.compile(r"^[a-z]{3}$")
_METHOD = re.compile(r"^[a-z][a-z0-9_]{0,19}$")
_RULE_KEYS = frozenset({"currency", "method", "min_amount", "max_amount", "psps"})
MAX_RULES = 50


class RoutingRuleError(ValueError):
    """A rule set that cannot be stored; the message names the rule and the field."""


@dataclass(frozen=True)
class RoutingRule:
    currency: str | None  # lower-case ISO 4217; None = any
    method: str | None  # payment method type ("card", ...); None = any
    min_amount: int | None  # minor units, inclusive; None = no lower bound
    max_amount: int | None  # minor units, inclusive; None = no upper bound
    psps: tuple[str, ...]  # preference order

    def matches(self, currency: str, method: str, amount: int) -> bool:
        return (
            (self.currency is None or self.currency == currency.lower())
            and (self.method is None or self.method == method)
            and (self.min_amount is None or amount >= self.min_amount)
            and (self.max_amount is None or amount <= self.max_amount)
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in ("currency", "method", "min_amount", "max_amount"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        out["psps"] = list(self.psps)
        return out


def route(
    rules: Iterable[RoutingRule], default: Sequence[str], currency: str, method: str, amount: int
) -> tuple[str, ...]:
    """The PSP order for a payment: the first matching rule's, else the default order."""
    for rule in rules:
        if rule.matches(currency, method, amount):
            return rule.psps
    return tuple(default)


def candidates(order: Sequence[str], usable: Iterable[str]) -> list[str]:
    """`order` restricted to the PSPs in `usable` (e.g. those holding a token for the card),
    without duplicates, order kept."""
    allowed = set(usable)
    out: list[str] = []
    for name in order:
        if name in allowed and name not in out:
            out.append(name)
    return out


def _optional_int(raw: Mapping[str, Any], key: str, where: str) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RoutingRuleError(f"{where}.{key} must be a non-negative integer (minor units)")
    return value


def parse_rule(raw: Any, index: int = 0, known_psps: Iterable[str] | None = None) -> RoutingRule:
    where = f"rules[{index}]"
    if not isinstance(raw, Mapping):
        raise RoutingRuleError(f"{where} must be an object")
    unknown = sorted(set(raw) - _RULE_KEYS)
    if unknown:
        raise RoutingRuleError(f"{where}: unknown field(s) {', '.join(unknown)}")
    currency = raw.get("currency")
    if currency is not None:
        if not isinstance(currency, str) or not _CURRENCY.match(currency.lower()):
            raise RoutingRuleError(f"{where}.currency must be a 3-letter ISO 4217 code")
        currency = currency.lower()
    method = raw.get("method")
    if method is not None and (not isinstance(method, str) or not _METHOD.match(method)):
        raise RoutingRuleError(f"{where}.method must be a payment method type such as 'card'")
    min_amount = _optional_int(raw, "min_amount", where)
    max_amount = _optional_int(raw, "max_amount", where)
    if min_amount is not None and max_amount is not None and min_amount > max_amount:
        raise RoutingRuleError(f"{where}: min_amount is greater than max_amount")
    psps = raw.get("psps")
    if not isinstance(psps, list | tuple) or not psps:
        raise RoutingRuleError(f"{where}.psps must be a non-empty list of PSP names")
    known = set(known_psps) if known_psps is not None else None
    for name in psps:
        if not isinstance(name, str) or not _PSP_NAME.match(name):
            raise RoutingRuleError(f"{where}.psps: {name!r} is not a PSP name")
        if known is not None and name not in known:
            raise RoutingRuleError(f"{where}.psps: unknown PSP {name!r} (known: {', '.join(sorted(known))})")
    if len(set(psps)) != len(psps):
        raise RoutingRuleError(f"{where}.psps lists a PSP twice")
    return RoutingRule(currency, method, min_amount, max_amount, tuple(psps))


def parse_rules(raw: Any, known_psps: Iterable[str] | None = None) -> tuple[RoutingRule, ...]:
    """Validate a merchant's rules as stored (a JSON list of objects); raises RoutingRuleError."""
    if not isinstance(raw, list | tuple):
        raise RoutingRuleError("rules must be a list")
    if len(raw) > MAX_RULES:
        raise RoutingRuleError(f"at most {MAX_RULES} rules")
    known = tuple(known_psps) if known_psps is not None else None
    return tuple(parse_rule(item, i, known) for i, item in enumerate(raw))


# ---------------------------------------------------------------- circuit breaker


class CircuitState(StrEnum):
    CLOSED = "closed"  # calls go through; consecutive failures are counted
    OPEN = "open"  # calls are refused until the cool-down has passed
    HALF_OPEN = "half_open"  # one trial call goes through; its outcome closes or re-opens


Outcome = Literal["success", "unavailable", "neutral"]


@dataclass
class CircuitBreaker:
    """Per-PSP health as seen by one process. Only "unavailable" outcomes (connection refused,
    5xx, 429: the PSP certainly did not act) count as failures; any answer from the PSP, a
    refusal included, is a success; an ambiguous outcome (timeout after sending) is neutral: it
    says nothing certain about the PSP's health. Not thread-safe: callers serialise."""

    failure_threshold: int = 5
    cooldown: float = 30.0
    state: CircuitState = CircuitState.CLOSED
    failures: int = 0  # consecutive unavailable outcomes
    opened_at: float | None = None
    trial_started_at: float | None = None  # half-open: when the trial call was let through

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if self.cooldown < 0:
            raise ValueError("cooldown must not be negative")

    def _cooled(self, since: float | None, now: float) -> bool:
        return since is None or now - since >= self.cooldown

    def current(self, now: float) -> CircuitState:
        """The state as of `now` (an open circuit whose cool-down passed reads as half-open)."""
        if self.state is CircuitState.OPEN and self._cooled(self.opened_at, now):
            return CircuitState.HALF_OPEN
        return self.state

    def can_route(self, now: float) -> bool:
        """Whether routing should pick this PSP now (reserves nothing)."""
        return self.current(now) is not CircuitState.OPEN

    def retry_in(self, now: float) -> float:
        """Seconds until an open circuit lets a trial through (0 when it would now)."""
        if self.state is not CircuitState.OPEN or self.opened_at is None:
            return 0.0
        return max(0.0, self.cooldown - (now - self.opened_at))

    def allow(self, now: float) -> bool:
        """Whether a call may go out now. In half-open, only one trial at a time: a trial whose
        outcome never came back (a crashed call) stops blocking after one more cool-down."""
        state = self.current(now)
        if state is CircuitState.CLOSED:
            return True
        if state is CircuitState.OPEN:
            return False
        if self.state is CircuitState.OPEN:  # cool-down just passed: this call is the trial
            self.state = CircuitState.HALF_OPEN
            self.trial_started_at = now
            return True
        if self._cooled(self.trial_started_at, now):
            self.trial_started_at = now
            return True
        return False

    def record(self, outcome: Outcome, now: float) -> CircuitState:
        """Feed one call's outcome; returns the state after it."""
        if outcome == "success":
            self.state = CircuitState.CLOSED
            self.failures = 0
            self.opened_at = self.trial_started_at = None
        elif outcome == "unavailable":
            self.failures += 1
            if self.state is CircuitState.HALF_OPEN or (
                self.state is CircuitState.CLOSED and self.failures >= self.failure_threshold
            ):
                self.state = CircuitState.OPEN
                self.opened_at = now
                self.trial_started_at = None
            elif self.state is CircuitState.OPEN:
                # a call that went out before the circuit opened, failing late: restart the cool-down
                self.opened_at = now
        elif self.state is CircuitState.HALF_OPEN:
            # neutral: the trial told us nothing; let the next call try
            self.trial_started_at = None
        return self.state
