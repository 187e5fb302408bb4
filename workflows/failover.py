"""Authorize with PSP failover: the checkout saga's authorize step when a payment has a route.

The API computes the route (the merchant's rules, restricted to the PSPs holding a token for the
card). Here, for each candidate in turn:

1. `choose_psp` (an activity, so the decision is in the history) skips candidates whose circuit
   is open in the worker;
2. authorize there. A candidate that is not the last gets a few single-attempt calls driven from
   here, so that every attempt's outcome is seen: only when every attempt is KNOWN not to have
   charged (PSPUnavailable: connection refused, 5xx/429 before processing; CircuitOpen: nothing
   sent) does the payment fail over to the next candidate, with a timeline note and the payment's
   psp updated. Anything else (PSPAmbiguous: a timeout or reset after the request went out; an
   activity timeout; a refusal) is handed back to the saga unchanged: the money may be held at
   this PSP, so it must be resolved there, never by charging somewhere else too.
3. The last candidate is called like a single-PSP payment: the PSP preset, with its retries that
   look the payment up before asking again.

Fewer than two candidates: one authorize at the payment's PSP, the same commands as before routing
existed (histories of older workflows replay unchanged).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

# passed through the sandbox, helpers included: see workflows/__init__.py
with workflow.unsafe.imports_passed_through():
    from workflows import options
    from workflows.contracts import (
        Act,
        AuthorizeInput,
        CheckoutInput,
        ChoosePspInput,
        ChoosePspResult,
        PSPResult,
    )
    from workflows.saga import run_shielded

# ApplicationError types that prove the PSP did not act on the attempt.
UNAVAILABLE = "PSPUnavailable"
CIRCUIT_OPEN = "CircuitOpen"
KNOWN_NOT_CHARGED = frozenset({UNAVAILABLE, CIRCUIT_OPEN})

# Attempts at a candidate that has a successor, and the waits between them: a blip is retried,
# an outage fails over within seconds instead of the PSP preset's minute and a half.
ATTEMPTS_BEFORE_FAILOVER = 3
BACKOFF = (timedelta(seconds=1), timedelta(seconds=2))

# One attempt per activity: a retry inside the activity would hide an earlier attempt's outcome
# (an ambiguous first attempt followed by a 503 would end as "unavailable").
SINGLE_ATTEMPT: options.ActivityOptions = {
    "start_to_close_timeout": options.PSP["start_to_close_timeout"],
    "retry_policy": RetryPolicy(maximum_attempts=1),
}

# choose_psp reads in-memory state: it only fails if the worker does; retry until it answers.
ROUTING: options.ActivityOptions = {
    "start_to_close_timeout": timedelta(seconds=10),
    "retry_policy": RetryPolicy(
        initial_interval=timedelta(milliseconds=200),
        maximum_interval=timedelta(seconds=5),
        maximum_attempts=0,
    ),
}

_MAX_NOTE = 200


@dataclass
class RoutingHooks:
    """What failover needs from the saga."""

    # A shielded authorize activity whose answer the saga records (psp_payment_id, PSP status).
    authorize: Callable[[AuthorizeInput, options.ActivityOptions], Awaitable[PSPResult]]
    # Point the saga's later steps (authenticate, capture, void, refund, lookup) at this PSP;
    # in_flight: an authorize may be held there (the void undo must look it up first).
    use_psp: Callable[[str, bool], None]
    # A timeline note that also moves payments.psp to the given PSP.
    note: Callable[[str, str], Awaitable[None]]


class _NotCharged(Exception):
    """Every attempt at this PSP is known not to have charged."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def token_for(inp: CheckoutInput, psp: str) -> str | None:
    return inp.psp_token if psp == inp.psp else inp.psp_tokens.get(psp)


def routed_candidates(inp: CheckoutInput) -> list[str]:
    """The route's PSPs that hold a token for the card, without duplicates, order kept."""
    return [psp for psp in dict.fromkeys(inp.route) if token_for(inp, psp)]


def authorize_input(inp: CheckoutInput, psp: str) -> AuthorizeInput:
    token = token_for(inp, psp)
    assert token is not None  # routed_candidates keeps only PSPs with a token
    return AuthorizeInput(
        payment_id=inp.payment_id,
        psp=psp,
        psp_token=token,
        amount=inp.amount,
        currency=inp.currency,
        description=inp.description,
    )


def _failure(err: ActivityError) -> tuple[str | None, str]:
    cause = err.cause
    if isinstance(cause, ApplicationError):
        return cause.type, cause.message
    return None, str(cause or err)


async def _choose(payment_id: str, candidates: list[str]) -> ChoosePspResult:
    result: ChoosePspResult = await run_shielded(
        workflow.execute_activity(
            Act.CHOOSE_PSP,
            ChoosePspInput(payment_id=payment_id, candidates=candidates),
            result_type=ChoosePspResult,
            **ROUTING,
        )
    )
    return result


async def _until_known(hooks: RoutingHooks, arg: AuthorizeInput) -> PSPResult:
    """Authorize at a PSP that has a successor. Raises _NotCharged when every attempt is known
    not to have charged; any other failure propagates (the saga resolves it at this PSP)."""
    for attempt in range(1, ATTEMPTS_BEFORE_FAILOVER + 1):
        hooks.use_psp(arg.psp, True)
        try:
            return await hooks.authorize(arg, SINGLE_ATTEMPT)
        except ActivityError as err:
            kind, message = _failure(err)
            if kind not in KNOWN_NOT_CHARGED:
                raise
            hooks.use_psp(arg.psp, False)  # nothing is held there: no lookup needed on undo
            if kind == CIRCUIT_OPEN or attempt == ATTEMPTS_BEFORE_FAILOVER:
                reason = "circuit open" if kind == CIRCUIT_OPEN else f"{attempt} attempts: {message}"
                raise _NotCharged(reason[:_MAX_NOTE]) from err
        await workflow.sleep(BACKOFF[attempt - 1], summary="failover_backoff")
    raise AssertionError("unreachable")  # pragma: no cover


async def authorize_with_failover(inp: CheckoutInput, hooks: RoutingHooks) -> PSPResult:
    """Authorize the payment at the first PSP of its route that takes it; see the module doc.
    Raises the saga's usual ActivityError when the authorize fails for good."""
    candidates = routed_candidates(inp)
    if len(candidates) < 2:
        psp = candidates[0] if candidates else inp.psp
        if psp != inp.psp:
            await hooks.note(f"routing: authorizing at {psp}", psp)
        hooks.use_psp(psp, True)
        return await hooks.authorize(authorize_input(inp, psp), options.PSP)

    recorded = inp.psp  # the PSP on the payment row (create_payment wrote it)
    remaining = candidates
    left: list[str] = []  # why earlier candidates were passed over, for the timeline
    while True:
        choice = await _choose(inp.payment_id, remaining)
        left += [f"{psp} skipped ({why})" for psp, why in choice.skipped.items()]
        # Every circuit open: one call at the first candidate, the last one. It fails fast
        # (CircuitOpen) unless its cool-down ended meanwhile and this call is its trial.
        chosen = choice.psp or remaining[0]
        remaining = remaining[remaining.index(chosen) + 1 :] if choice.psp else []
        if chosen != recorded or left:
            if choice.psp is None:
                note = f"routing: {', '.join(left)}; every circuit is open, trying {chosen}"
            elif left:
                note = f"routing: {', '.join(left)}, failing over to {chosen}"
            else:
                note = f"routing: authorizing at {chosen}"
            await hooks.note(note, chosen)
            recorded = chosen
            left = []
        arg = authorize_input(inp, chosen)
        if not remaining:
            hooks.use_psp(chosen, True)
            return await hooks.authorize(arg, options.PSP)
        try:
            return await _until_known(hooks, arg)
        except _NotCharged as e:
            workflow.logger.warning("payment %s: %s unavailable (%s)", inp.payment_id, chosen, e.reason)
            left.append(f"{chosen} unavailable ({e.reason})")
