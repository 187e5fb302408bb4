"""PSP routing in the worker: one circuit breaker per PSP (fed by every PSP call of PspActivities)
and the `choose_psp` activity that picks the first candidate whose circuit is not open.

The circuit state is this worker process's view: each worker learns on its own that a PSP is down
(after a few failed calls) and back (after a successful one). It is an activity, not workflow code,
so the decision is recorded in the workflow's history and replays the same.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection
from typing import Any

from temporalio import activity

from domain.routing import CircuitBreaker, CircuitState, Outcome
from workflows.contracts import Act, ChoosePspInput, ChoosePspResult

log = logging.getLogger(__name__)

DEFAULT_FAILURE_THRESHOLD = 5
DEFAULT_COOLDOWN_S = 30.0


class Circuits:
    """The breakers of one worker, by PSP name. Thread-safe (the lock is held for microseconds):
    PSP activities run on the event loop, but tests and other callers may use threads."""

    def __init__(
        self,
        *,
        failure_threshold: int = DEFAULT_FAILURE_THRESHOLD,
        cooldown_s: float = DEFAULT_COOLDOWN_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._threshold = failure_threshold
        self._cooldown = cooldown_s
        self._clock = clock
        self._lock = threading.Lock()
        self._breakers: dict[str, CircuitBreaker] = {}

    def _get(self, psp: str) -> CircuitBreaker:
        breaker = self._breakers.get(psp)
        if breaker is None:
            breaker = self._breakers[psp] = CircuitBreaker(self._threshold, self._cooldown)
        return breaker

    def allow(self, psp: str) -> bool:
        """Whether a new charge may be sent to this PSP now (in half-open: takes the trial)."""
        with self._lock:
            return self._get(psp).allow(self._clock())

    def can_route(self, psp: str) -> bool:
        with self._lock:
            return self._get(psp).can_route(self._clock())

    def retry_in(self, psp: str) -> float:
        with self._lock:
            return self._get(psp).retry_in(self._clock())

    def state(self, psp: str) -> CircuitState:
        with self._lock:
            return self._get(psp).current(self._clock())

    def record(self, psp: str, outcome: Outcome) -> None:
        with self._lock:
            breaker = self._get(psp)
            before = breaker.state
            after = breaker.record(outcome, self._clock())
            failures = breaker.failures
        if after is not before:
            log.warning("circuit of PSP %s: %s -> %s (%d failures in a row)", psp, before, after, failures)


class RoutingActivities:
    def __init__(self, circuits: Circuits, configured: Collection[str]) -> None:
        self._circuits = circuits
        self._configured = frozenset(configured)

    @activity.defn(name=Act.CHOOSE_PSP)
    async def choose_psp(self, inp: ChoosePspInput) -> ChoosePspResult:
        """The first candidate this worker can call, with why each earlier one was passed over."""
        skipped: dict[str, str] = {}
        for psp in inp.candidates:
            if psp not in self._configured:
                skipped[psp] = "not configured on this worker"
            elif not self._circuits.can_route(psp):
                skipped[psp] = f"circuit open, next trial in {self._circuits.retry_in(psp):.0f} s"
            else:
                return ChoosePspResult(psp=psp, skipped=skipped)
        return ChoosePspResult(psp=None, skipped=skipped)

    def activities(self) -> list[Any]:
        return [self.choose_psp]
