"""PSP activities: authorize, authenticate, capture, void, refund and look up, through psp.base.PSP.

Every call carries an idempotency key derived from our payment id and the step, never a random
one: Temporal retries an activity whose answer was lost, and the PSP must see the retry as the
same request. A decline is a result (PSPResult status "failed"); transport trouble is a retryable
ApplicationError; a request the PSP refuses is a non-retryable one.

Every call's outcome feeds the PSP's circuit breaker (activities/routing.py). Only a new charge
(authorize, after a retry's look-up found nothing) is refused while the circuit is open, with the
non-retryable "CircuitOpen": nothing was sent, so routing may fail over. Captures, voids, refunds
and look-ups always go out: they settle money already moved, and their successes are what closes
the circuit again.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.routing import Circuits
from psp.base import PSP, AuthorizeRequest, PSPAmbiguous, PSPError, PSPPayment, PSPRejected, PSPUnavailable
from workflows.contracts import (
    Act,
    AuthenticateInput,
    AuthorizeInput,
    CaptureInput,
    LookupInput,
    NextAction,
    PSPResult,
    RefundInput,
    VoidInput,
)

# Statuses that mean the PSP holds or moved money for the reference; preferred by lookups.
_LIVE = ("requires_action", "authorized", "captured", "refunded")
# The ApplicationError type of an authorize refused by an open circuit: known not to have charged.
CIRCUIT_OPEN = "CircuitOpen"


def to_result(payment: PSPPayment) -> PSPResult:
    action = payment.next_action
    return PSPResult(
        psp_payment_id=payment.id,
        status=payment.status,
        amount=payment.amount,
        amount_captured=payment.amount_captured,
        amount_refunded=payment.amount_refunded,
        decline_code=payment.decline_code,
        message=payment.message,
        next_action=NextAction(type=action.type, url=action.url) if action else None,
    )


def to_application_error(err: PSPError) -> ApplicationError:
    if isinstance(err, PSPRejected):
        return ApplicationError(str(err), {"code": err.code}, type="PSPRejected", non_retryable=True)
    if isinstance(err, PSPUnavailable):
        delay = timedelta(seconds=err.retry_after) if err.retry_after else None
        return ApplicationError(str(err), type="PSPUnavailable", next_retry_delay=delay)
    if isinstance(err, PSPAmbiguous):
        return ApplicationError(str(err), type="PSPAmbiguous")
    return ApplicationError(str(err), type=type(err).__name__)


class PspActivities:
    def __init__(self, psps: Mapping[str, PSP], circuits: Circuits | None = None) -> None:
        self._psps = psps
        self.circuits = circuits or Circuits()

    @contextmanager
    def _observed(self, name: str) -> Iterator[None]:
        """Feed the PSP's breaker with the outcome of the calls inside."""
        try:
            yield
        except PSPUnavailable:
            self.circuits.record(name, "unavailable")
            raise
        except PSPRejected:
            self.circuits.record(name, "success")  # it answered: it is up
            raise
        except BaseException:
            self.circuits.record(name, "neutral")
            raise
        else:
            self.circuits.record(name, "success")

    def _psp(self, name: str) -> PSP:
        try:
            return self._psps[name]
        except KeyError:
            raise ApplicationError(f"unknown PSP {name!r}", type="UnknownPSP", non_retryable=True) from None

    async def _lookup(self, psp: PSP, payment_id: str) -> PSPResult | None:
        found = await psp.find_payments(payment_id)
        if not found:
            return None
        # One reference normally has one PSP payment (stable keys); if not, the live one wins so a
        # charge is never mistaken for a failure.
        live = [p for p in found if p.status in _LIVE]
        return to_result((live or found)[-1])

    @activity.defn(name=Act.AUTHORIZE_PAYMENT)
    async def authorize_payment(self, inp: AuthorizeInput) -> PSPResult:
        psp = self._psp(inp.psp)
        try:
            if activity.info().attempt > 1:
                # An earlier attempt may have charged and lost the answer: ask before asking again
                # (whatever the circuit says: this is about money that may already be held).
                with self._observed(inp.psp):
                    existing = await self._lookup(psp, inp.payment_id)
                if existing is not None:
                    activity.logger.info("authorize %s: found at the PSP on retry", inp.payment_id)
                    return existing
            # A new charge: refused while the circuit is open, so the payment can go elsewhere.
            if not self.circuits.allow(inp.psp):
                raise ApplicationError(
                    f"PSP {inp.psp} is unavailable: circuit open, next trial in "
                    f"{self.circuits.retry_in(inp.psp):.0f} s; nothing was sent",
                    type=CIRCUIT_OPEN,
                    non_retryable=True,
                )
            with self._observed(inp.psp):
                payment = await psp.authorize(
                    AuthorizeRequest(
                        reference=inp.payment_id,
                        token=inp.psp_token,
                        amount=inp.amount,
                        currency=inp.currency,
                        idempotency_key=f"{inp.payment_id}:authorize",
                        description=inp.description,
                    )
                )
        except PSPError as e:
            raise to_application_error(e) from e
        return to_result(payment)

    @activity.defn(name=Act.AUTHENTICATE_PAYMENT)
    async def authenticate_payment(self, inp: AuthenticateInput) -> PSPResult:
        psp = self._psp(inp.psp)
        try:
            with self._observed(inp.psp):
                payment = await psp.authenticate(
                    inp.psp_payment_id, inp.otp, idempotency_key=f"{inp.payment_id}:authenticate"
                )
        except PSPError as e:
            raise to_application_error(e) from e
        return to_result(payment)

    @activity.defn(name=Act.CAPTURE_PAYMENT)
    async def capture_payment(self, inp: CaptureInput) -> PSPResult:
        psp = self._psp(inp.psp)
        try:
            with self._observed(inp.psp):
                payment = await psp.capture(
                    inp.psp_payment_id, inp.amount, idempotency_key=f"{inp.payment_id}:capture"
                )
        except PSPError as e:
            raise to_application_error(e) from e
        return to_result(payment)

    @activity.defn(name=Act.VOID_PAYMENT)
    async def void_payment(self, inp: VoidInput) -> PSPResult:
        psp = self._psp(inp.psp)
        try:
            with self._observed(inp.psp):
                payment = await psp.void(inp.psp_payment_id, idempotency_key=f"{inp.payment_id}:void")
        except PSPError as e:
            raise to_application_error(e) from e
        return to_result(payment)

    @activity.defn(name=Act.REFUND_PAYMENT)
    async def refund_payment(self, inp: RefundInput) -> PSPResult:
        psp = self._psp(inp.psp)
        try:
            with self._observed(inp.psp):
                refund = await psp.refund(inp.psp_payment_id, inp.amount, idempotency_key=inp.idempotency_key)
                payment = None if refund.status == "failed" else await psp.get_payment(inp.psp_payment_id)
        except PSPError as e:
            raise to_application_error(e) from e
        if payment is None:
            raise ApplicationError(
                f"refund {refund.id} failed at the PSP", type="PSPRefundFailed", non_retryable=True
            )
        return to_result(payment)

    @activity.defn(name=Act.LOOKUP_PSP_PAYMENT)
    async def lookup_psp_payment(self, inp: LookupInput) -> PSPResult | None:
        psp = self._psp(inp.psp)
        try:
            with self._observed(inp.psp):
                return await self._lookup(psp, inp.payment_id)
        except PSPError as e:
            raise to_application_error(e) from e

    def activities(self) -> list[Any]:
        return [
            self.authorize_payment,
            self.authenticate_payment,
            self.capture_payment,
            self.void_payment,
            self.refund_payment,
            self.lookup_psp_payment,
        ]
