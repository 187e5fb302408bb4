"""StripePSP: the psp.base.PSP adapter for Stripe's PaymentIntents API (official `stripe` SDK).

How it talks to Stripe: one StripeClient per adapter, with the SDK's httpx-based HTTPXClient and its
`*_async` methods, so calls run on the caller's event loop (the Temporal worker's), are cancelled
with the activity and need no thread pool. The SDK's own retries are off (max_network_retries=0):
Temporal retries activities, and a hidden retry would hide an ambiguous answer from us.

How a payment maps onto Stripe: one PaymentIntent per payment, capture_method=manual, our payment
id in metadata["paysaga_payment_id"]. Authorize = create (key "<key>:create") then confirm (key
"<key>:confirm") as two steps, so a duplicated create never charges. Correctness does not rest on
Stripe's idempotency keys alone (they expire after 24 h, and localstripe ignores them): authorize
first looks the reference up and resumes the PaymentIntent it finds; capture, void and authenticate
read the intent first and answer a repeated call with the current state; a refund carries its key in
metadata and is looked up before a new one is created.

Statuses: requires_action -> requires_action (next_action redirect_to_url with its URL, or otp where
our authenticate call completes the challenge), requires_capture -> authorized, succeeded -> captured
(refunded once fully refunded), canceled -> canceled, requires_payment_method after a decline or a
failed 3-D Secure -> failed with a decline_code. requires_confirmation and processing have no
PSPStatus: the outcome is not settled yet.

Errors: a card decline is a result (status "failed"), never an exception. Connection failures before
the request went out -> PSPUnavailable; a POST whose answer was lost (read timeout, dropped
connection) -> PSPAmbiguous; 429 and 5xx -> PSPUnavailable; 4xx refusals -> PSPRejected.

localstripe_compat=True adapts to localstripe, the fake Stripe server the tests use: it has no search
API (lookups list and filter instead), refuses parameters it does not know (description), and
completes 3-D Secure through its test-only `_authenticate` endpoint, where our otp "123456" passes
and any other code fails. With real Stripe the customer completes 3-D Secure on Stripe's page
(redirect_to_url, which needs a return_url); authenticate then only reads the outcome.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Mapping
from typing import Any, Literal, TypeVar

import httpx
import stripe

from core.config import Settings
from psp.base import (
    AuthorizeRequest,
    CardDetails,
    CardToken,
    MethodDetails,
    MethodToken,
    PSPAmbiguous,
    PSPDispute,
    PSPError,
    PSPNextAction,
    PSPPayment,
    PSPRefund,
    PSPRejected,
    PSPStatus,
    PSPUnavailable,
)
from psp.sandbox.client import parse_retry_after

log = logging.getLogger(__name__)

DEFAULT_API_BASE = "https://api.stripe.com"
REFERENCE_KEY = "paysaga_payment_id"  # PaymentIntent and Refund metadata: our payment id
REFUND_KEY = "paysaga_refund_key"  # Refund metadata: our idempotency key for that refund
LOCALSTRIPE_OTP = "123456"  # the same test code as the sandbox PSP's
_EXPAND_CHARGE = ["latest_charge"]  # amounts captured/refunded live on the charge
_PAGE = 100

# Stripe error codes without a decline_code, mapped onto the decline codes our API reports.
_DECLINE_CODES = {
    "card_declined": "generic_decline",
    "payment_intent_authentication_failure": "authentication_failed",
}
# httpx errors raised before the request could reach Stripe: nothing was sent.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol)

T = TypeVar("T")


class _NoRequestBodies(logging.Filter):
    """The SDK logs every POST body at DEBUG ("Post details"): PaymentMethod creation carries the card
    number and CVC, so those records never leave the "stripe" logger, whatever the log level."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Post details" not in record.getMessage()


_stripe_logger = logging.getLogger("stripe")
if not any(isinstance(f, _NoRequestBodies) for f in _stripe_logger.filters):
    _stripe_logger.addFilter(_NoRequestBodies())


# ---- mapping Stripe objects onto psp.base types ----


def _dict(obj: Any) -> dict[str, Any]:
    if isinstance(obj, stripe.StripeObject):
        return obj.to_dict()
    return dict(obj)


def _amounts(intent: Mapping[str, Any]) -> tuple[int, int]:
    """(amount_captured, amount_refunded) of a PaymentIntent whose latest_charge is expanded."""
    charge = intent.get("latest_charge")
    if isinstance(charge, Mapping):
        refunded = int(charge.get("amount_refunded") or 0)
        if "amount_captured" in charge:
            return int(charge.get("amount_captured") or 0), refunded
        # localstripe's charges have no amount_captured: a captured charge was captured in full
        # (it models a partial capture as a full one plus a refund of the rest).
        captured = charge.get("captured") and charge.get("status") == "succeeded"
        return (int(charge.get("amount") or 0) if captured else 0), refunded
    # latest_charge not expanded (webhook payloads): amount_received is what was captured
    return int(intent.get("amount_received") or 0), 0


def _next_action(intent: Mapping[str, Any], otp_challenges: bool) -> PSPNextAction:
    action = intent.get("next_action") or {}
    if action.get("type") == "redirect_to_url":
        redirect = action.get("redirect_to_url") or {}
        return PSPNextAction(type="redirect_to_url", url=redirect.get("url"))
    # use_stripe_sdk (no return_url was given) and the like: no URL to send the customer to.
    return PSPNextAction(type="otp" if otp_challenges else "redirect_to_url", url=None)


def payment_from_intent(intent: Mapping[str, Any], *, otp_challenges: bool = False) -> PSPPayment | None:
    """A PaymentIntent as a PSPPayment; None while it has no settled outcome (requires_confirmation,
    processing). otp_challenges: 3-D Secure challenges are completed through authenticate (localstripe)."""
    status = intent.get("status")
    captured, refunded = _amounts(intent)
    mapped: PSPStatus
    decline_code: str | None = None
    message: str | None = None
    next_action: PSPNextAction | None = None
    if status == "requires_action":
        mapped, next_action = "requires_action", _next_action(intent, otp_challenges)
    elif status == "requires_capture":
        mapped = "authorized"
    elif status == "succeeded":
        mapped = "refunded" if captured > 0 and refunded >= captured else "captured"
    elif status == "canceled":
        mapped = "canceled"
    elif status == "requires_payment_method":
        # after a decline or a failed authentication; our intents are always created with a method
        mapped = "failed"
        error = intent.get("last_payment_error") or {}
        code = error.get("code")
        decline_code = error.get("decline_code") or (_DECLINE_CODES.get(code, code) if code else None)
        message = error.get("message") or "The payment has no usable payment method."
    else:
        return None
    metadata = intent.get("metadata") or {}
    return PSPPayment(
        id=str(intent["id"]),
        reference=str(metadata.get(REFERENCE_KEY, "")),
        status=mapped,
        amount=int(intent["amount"]),
        currency=str(intent["currency"]).lower(),
        amount_captured=captured,
        amount_refunded=refunded,
        decline_code=decline_code,
        message=message,
        next_action=next_action,
    )


def _refund(data: Mapping[str, Any], psp_payment_id: str) -> PSPRefund:
    raw = data.get("status")
    status: Literal["pending", "succeeded", "failed"]
    if raw == "succeeded":
        status = "succeeded"
    elif raw in ("failed", "canceled"):
        status = "failed"
    else:  # pending, requires_action
        status = "pending"
    return PSPRefund(
        id=str(data["id"]),
        payment_id=str(data.get("payment_intent") or psp_payment_id),
        amount=int(data["amount"]),
        status=status,
    )


_DISPUTE_STATUSES: dict[str, Literal["needs_response", "under_review", "won", "lost"]] = {
    "warning_needs_response": "needs_response",
    "needs_response": "needs_response",
    "warning_under_review": "under_review",
    "under_review": "under_review",
    "won": "won",
    "warning_closed": "won",  # an inquiry closed without becoming a chargeback
    "prevented": "won",
    "lost": "lost",
    "charge_refunded": "lost",  # closed because the money went back to the customer
}


def dispute_from_stripe(data: Mapping[str, Any]) -> PSPDispute:
    status = _DISPUTE_STATUSES.get(str(data.get("status")))
    if status is None:
        raise PSPAmbiguous(f"stripe dispute {data.get('id')} has an unknown status {data.get('status')!r}")
    due = (data.get("evidence_details") or {}).get("due_by")
    return PSPDispute(
        id=str(data["id"]),
        payment_id=str(data.get("payment_intent") or data.get("charge") or ""),
        amount=int(data["amount"]),
        currency=str(data["currency"]).lower(),
        status=status,
        reason=data.get("reason"),
        evidence_due_by=int(due) if due is not None else None,
        created=int(data.get("created") or 0),
    )


def _retry_after(err: stripe.StripeError) -> float | None:
    headers = err.headers or {}
    value = headers.get("Retry-After") or headers.get("retry-after")
    return parse_retry_after(value)


def map_error(err: stripe.StripeError, what: str, *, mutating: bool) -> PSPError:
    """Stripe SDK errors -> PSPError by whether Stripe may have acted. CardError is handled by callers
    where it concerns the intent (a decline is a result); elsewhere it is a refusal."""
    if isinstance(err, stripe.APIConnectionError):
        cause = err.__cause__
        name = type(cause).__name__ if cause is not None else "connection error"
        if not mutating or isinstance(cause, _NOT_SENT):
            return PSPUnavailable(f"{what}: {name}")
        # the request may have reached Stripe and only the answer was lost
        return PSPAmbiguous(f"{what}: {name}")
    if isinstance(err, stripe.RateLimitError):
        return PSPUnavailable(f"{what}: rate limited", retry_after=_retry_after(err))
    if isinstance(err, stripe.IdempotencyError):
        return PSPRejected(
            f"{what}: {err.user_message or 'idempotency key reused'}", code="idempotency_key_reused"
        )
    status = err.http_status
    if isinstance(err, stripe.APIError) and (status is None or status >= 500 or status == 409):
        # Stripe stores a request's result once execution has begun, 5xx included, and a 409 means a
        # request with the same key is still running: on a money-moving call the outcome is unknown
        # (look it up before anything else, never fail over); on a read, nothing happened.
        if mutating:
            return PSPAmbiguous(f"{what}: HTTP {status}")
        return PSPUnavailable(f"{what}: HTTP {status}", retry_after=_retry_after(err))
    code = getattr(err, "code", None)
    return PSPRejected(f"{what}: HTTP {status} {err.user_message or ''}".rstrip(), code=code)


class StripePSP:
    name = "stripe"

    def __init__(
        self,
        api_key: str,
        *,
        api_base: str = DEFAULT_API_BASE,
        timeout: float = 30.0,
        return_url: str | None = None,
        localstripe_compat: bool = False,
        http_client: stripe.HTTPClient | None = None,
    ) -> None:
        if not api_key:
            raise ValueError("StripePSP needs an API key (STRIPE_API_KEY)")
        if stripe.log == "debug" or os.environ.get("STRIPE_LOG") == "debug":
            # the SDK would print request bodies, card numbers included, to stderr
            raise ValueError("STRIPE_LOG=debug prints request bodies (card data); refused")
        # http_client: another transport for the SDK (tests); it must support the async methods
        self._http = http_client or stripe.HTTPXClient(timeout=timeout)
        self._client = stripe.StripeClient(
            api_key,
            base_addresses={"api": (api_base or DEFAULT_API_BASE).rstrip("/")},
            http_client=self._http,
            max_network_retries=0,
        )
        self._return_url = return_url
        self._compat = localstripe_compat
        # real Stripe has the search API; localstripe answers 404 for it
        self._search = not localstripe_compat

    @classmethod
    def from_settings(cls, settings: Settings) -> StripePSP:
        api_base = settings.stripe_api_base or DEFAULT_API_BASE
        return cls(
            settings.stripe_api_key,
            api_base=api_base,
            return_url=settings.stripe_return_url or None,
            # anything but Stripe's own API is taken to be localstripe (tests, local runs)
            localstripe_compat=api_base.rstrip("/") != DEFAULT_API_BASE,
        )

    async def aclose(self) -> None:
        await self._http.close_async()

    # ---- transport ----

    async def _call(self, what: str, call: Awaitable[T], *, mutating: bool) -> T:
        try:
            return await call
        except stripe.StripeError as e:
            raise map_error(e, what, mutating=mutating) from e

    async def _declinable(self, what: str, call: Awaitable[Any]) -> dict[str, Any] | None:
        """A call that may decline the card: None on a CardError (the intent records the decline)."""
        try:
            return _dict(await call)
        except stripe.CardError as e:
            log.info("%s: declined (%s)", what, e.code)
            return None
        except stripe.StripeError as e:
            raise map_error(e, what, mutating=True) from e

    async def _retrieve(self, psp_payment_id: str) -> dict[str, Any]:
        intent = await self._call(
            f"stripe GET payment_intent {psp_payment_id}",
            self._client.v1.payment_intents.retrieve_async(psp_payment_id, {"expand": _EXPAND_CHARGE}),
            mutating=False,
        )
        return _dict(intent)

    def _map(self, intent: Mapping[str, Any]) -> PSPPayment:
        payment = payment_from_intent(intent, otp_challenges=self._compat)
        if payment is None:
            raise PSPAmbiguous(
                f"stripe payment_intent {intent.get('id')} is {intent.get('status')}: not settled"
            )
        return payment

    async def _intents_for(self, reference: str) -> list[dict[str, Any]]:
        """Every PaymentIntent carrying this reference in its metadata, oldest first."""
        found: list[dict[str, Any]] | None = await self._search_intents(reference) if self._search else None
        if found is None:
            found = await self._list_intents(reference)
        found.sort(key=lambda i: int(i.get("created") or 0))  # stable: same-second order is kept
        return found

    async def _search_intents(self, reference: str) -> list[dict[str, Any]] | None:
        """Through the search API; None where the server has none (it answers 404)."""
        # Search is eventually consistent (about a minute): a just-created intent may be missing,
        # which the idempotency key of its create covers.
        quoted = reference.replace("\\", "\\\\").replace("'", "\\'")
        query = f"metadata['{REFERENCE_KEY}']:'{quoted}'"
        what = "stripe search payment_intents"
        found: list[dict[str, Any]] = []
        page: str | None = None
        while True:
            params: dict[str, Any] = {"query": query, "limit": _PAGE, "expand": ["data.latest_charge"]}
            if page:
                params["page"] = page
            try:
                result = await self._client.v1.payment_intents.search_async(params)  # type: ignore[arg-type]
            except stripe.InvalidRequestError as e:
                if e.http_status == 404 and not found:
                    log.info("stripe: no search API at this endpoint; listing payment intents instead")
                    self._search = False
                    return None
                raise map_error(e, what, mutating=False) from e
            except stripe.StripeError as e:
                raise map_error(e, what, mutating=False) from e
            found.extend(_dict(item) for item in result.data)
            page = getattr(result, "next_page", None)
            if not result.has_more or not page:
                return found

    async def _list_intents(self, reference: str) -> list[dict[str, Any]]:
        # Only where search is missing (localstripe): this reads every intent of the account.
        found: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            page = await self._call(
                "stripe list payment_intents",
                self._client.v1.payment_intents.list_async(
                    {
                        "limit": _PAGE,
                        "expand": ["data.latest_charge"],
                        **({"starting_after": after} if after else {}),
                    }
                ),
                mutating=False,
            )
            items = [_dict(item) for item in page.data]
            found.extend(i for i in items if (i.get("metadata") or {}).get(REFERENCE_KEY) == reference)
            if not page.has_more or not items:
                return found
            after = str(items[-1]["id"])

    # ---- the protocol ----

    async def tokenize_card(self, card: CardDetails) -> CardToken:
        # A PaymentMethod from raw card details. localstripe accepts raw numbers; real Stripe accepts
        # them only on accounts cleared for raw card data (otherwise use its test tokens, e.g.
        # pm_card_visa, or tokenize client-side with Stripe.js / Elements).
        number = card.number.replace(" ", "").replace("-", "")
        params: dict[str, Any] = {
            "type": "card",
            "card": {
                "number": number,
                "exp_month": card.exp_month,
                "exp_year": card.exp_year,
                "cvc": card.cvc,
            },
        }
        if card.name:
            params["billing_details"] = {"name": card.name}
        method = _dict(
            await self._call(
                "stripe POST payment_methods",
                self._client.v1.payment_methods.create_async(params),  # type: ignore[arg-type]
                mutating=False,  # a lost answer leaves only an unused PaymentMethod: safe to retry
            )
        )
        details = method.get("card") or {}
        return CardToken(
            token=str(method["id"]),
            brand=str(details.get("brand") or "unknown"),
            funding=str(details.get("funding") or "unknown"),
            country=str(details.get("country") or "").upper(),
            last4=str(details.get("last4") or number[-4:]),
            exp_month=int(details.get("exp_month") or card.exp_month),
            exp_year=int(details.get("exp_year") or card.exp_year),
        )

    async def tokenize_method(self, method: MethodDetails) -> MethodToken:
        # Our wallet and netbanking types are the sandbox's; this adapter does not map them onto
        # Stripe's own wallet / bank-redirect methods (yet), so it says so instead of pretending.
        raise PSPRejected(f"unsupported method: {method.type}", code="unsupported_method")

    async def authorize(self, req: AuthorizeRequest) -> PSPPayment:
        intents = await self._intents_for(req.reference)
        # More than one intent per reference should not happen; if it does, the one holding money wins.
        live = [i for i in intents if i.get("status") not in ("canceled", "requires_payment_method")]
        intent = (live or intents)[-1] if intents else None
        if intent is not None:
            if int(intent["amount"]) != req.amount or str(intent["currency"]).lower() != req.currency.lower():
                raise PSPRejected(
                    f"stripe: payment {req.reference} already has intent {intent['id']} "
                    f"for {intent['amount']} {intent['currency']}",
                    code="reference_reused",
                )
            log.info(
                "stripe authorize %s: resuming intent %s (%s)", req.reference, intent["id"], intent["status"]
            )
        else:
            params: dict[str, Any] = {
                "amount": req.amount,
                "currency": req.currency.lower(),
                "payment_method": req.token,
                "payment_method_types": ["card"],
                "capture_method": "manual",
                "metadata": {REFERENCE_KEY: req.reference},
                "expand": _EXPAND_CHARGE,
            }
            if req.description and not self._compat:  # localstripe refuses unknown parameters
                params["description"] = req.description
            intent = _dict(
                await self._call(
                    "stripe POST payment_intents",
                    self._client.v1.payment_intents.create_async(
                        params,  # type: ignore[arg-type]
                        {"idempotency_key": f"{req.idempotency_key}:create"},
                    ),
                    mutating=True,
                )
            )
        if intent.get("status") == "requires_confirmation":
            confirm: dict[str, Any] = {"expand": _EXPAND_CHARGE}
            if self._return_url:
                confirm["return_url"] = self._return_url
            confirmed = await self._declinable(
                f"stripe POST payment_intents/{intent['id']}/confirm",
                self._client.v1.payment_intents.confirm_async(
                    str(intent["id"]),
                    confirm,  # type: ignore[arg-type]
                    {"idempotency_key": f"{req.idempotency_key}:confirm"},
                ),
            )
            intent = confirmed if confirmed is not None else await self._retrieve(str(intent["id"]))
        return self._map(intent)

    async def authenticate(self, psp_payment_id: str, otp: str, *, idempotency_key: str) -> PSPPayment:
        intent = await self._retrieve(psp_payment_id)
        if intent.get("status") != "requires_action" or not self._compat:
            # Done already (a retry), or real Stripe, where the customer authenticates on Stripe's
            # page and we can only read the outcome.
            return self._map(intent)
        what = f"stripe POST payment_intents/{psp_payment_id}/_authenticate"
        try:
            await self._client.raw_request_async(
                "post",
                f"/v1/payment_intents/{psp_payment_id}/_authenticate",
                client_secret=intent["client_secret"],
                success="true" if otp == LOCALSTRIPE_OTP else "false",
                idempotency_key=idempotency_key,
            )
        except stripe.CardError as e:  # authenticated, then the charge was declined
            log.info("%s: declined (%s)", what, e.code)
        except stripe.StripeError as e:
            raise map_error(e, what, mutating=True) from e
        return self._map(await self._retrieve(psp_payment_id))

    async def capture(self, psp_payment_id: str, amount: int, *, idempotency_key: str) -> PSPPayment:
        current = self._map(await self._retrieve(psp_payment_id))
        if current.status in ("captured", "refunded"):
            return current  # a repeated capture: answer with what the first one did
        if current.status != "authorized":
            raise PSPRejected(
                f"stripe: cannot capture {psp_payment_id} with status {current.status}",
                code="payment_unexpected_state",
            )
        intent = await self._call(
            f"stripe POST payment_intents/{psp_payment_id}/capture",
            self._client.v1.payment_intents.capture_async(
                psp_payment_id,
                {"amount_to_capture": amount, "expand": _EXPAND_CHARGE},
                {"idempotency_key": idempotency_key},
            ),
            mutating=True,
        )
        return self._map(_dict(intent))

    async def void(self, psp_payment_id: str, *, idempotency_key: str) -> PSPPayment:
        current = self._map(await self._retrieve(psp_payment_id))
        # Voiding twice is a no-op and a failed payment holds nothing: a saga's undo can always run.
        if current.status in ("canceled", "failed"):
            return current
        if current.status not in ("authorized", "requires_action"):
            raise PSPRejected(
                f"stripe: cannot void {psp_payment_id} with status {current.status}",
                code="payment_unexpected_state",
            )
        intent = await self._call(
            f"stripe POST payment_intents/{psp_payment_id}/cancel",
            self._client.v1.payment_intents.cancel_async(
                psp_payment_id, {"expand": _EXPAND_CHARGE}, {"idempotency_key": idempotency_key}
            ),
            mutating=True,
        )
        return self._map(_dict(intent))

    async def refund(self, psp_payment_id: str, amount: int, *, idempotency_key: str) -> PSPRefund:
        payment = self._map(await self._retrieve(psp_payment_id))
        existing = await self._refunds_of(psp_payment_id)
        for item in existing:
            if (item.get("metadata") or {}).get(REFUND_KEY) == idempotency_key:
                return _refund(item, psp_payment_id)  # this refund was made already
        if payment.status not in ("captured", "refunded"):
            raise PSPRejected(
                f"stripe: cannot refund {psp_payment_id} with status {payment.status}",
                code="payment_unexpected_state",
            )
        refundable = payment.amount_captured - payment.amount_refunded
        if not 0 < amount <= refundable:
            # Stripe refuses this too; localstripe would refund more than was captured
            raise PSPRejected(
                f"stripe: refund {amount} exceeds the refundable {refundable} of {psp_payment_id}",
                code="amount_too_large",
            )
        created = await self._call(
            f"stripe POST refunds for {psp_payment_id}",
            self._client.v1.refunds.create_async(
                {
                    "payment_intent": psp_payment_id,
                    "amount": amount,
                    "metadata": {REFERENCE_KEY: payment.reference, REFUND_KEY: idempotency_key},
                },
                {"idempotency_key": idempotency_key},
            ),
            mutating=True,
        )
        return _refund(_dict(created), psp_payment_id)

    async def _refunds_of(self, psp_payment_id: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            page = await self._call(
                f"stripe list refunds of {psp_payment_id}",
                self._client.v1.refunds.list_async(
                    {
                        "payment_intent": psp_payment_id,
                        "limit": _PAGE,
                        **({"starting_after": after} if after else {}),
                    }
                ),
                mutating=False,
            )
            items = [_dict(item) for item in page.data]
            found.extend(items)
            if not page.has_more or not items:
                return found
            after = str(items[-1]["id"])

    async def get_payment(self, psp_payment_id: str) -> PSPPayment:
        return self._map(await self._retrieve(psp_payment_id))

    async def get_dispute(self, psp_dispute_id: str) -> PSPDispute:
        dispute = await self._call(
            f"stripe GET dispute {psp_dispute_id}",
            self._client.v1.disputes.retrieve_async(psp_dispute_id),
            mutating=False,
        )
        return dispute_from_stripe(_dict(dispute))

    async def submit_dispute_evidence(
        self, psp_dispute_id: str, evidence: dict[str, str], *, idempotency_key: str
    ) -> PSPDispute:
        """Evidence keys are Stripe's (uncategorized_text, product_description, ...). Stripe takes
        evidence once: a dispute no longer waiting for it answers with its current state."""
        current = await self.get_dispute(psp_dispute_id)
        if current.status != "needs_response":
            return current
        dispute = await self._call(
            f"stripe POST disputes/{psp_dispute_id}",
            self._client.v1.disputes.update_async(
                psp_dispute_id,
                {"evidence": evidence, "submit": True},  # type: ignore[arg-type]
                {"idempotency_key": idempotency_key},
            ),
            mutating=True,
        )
        return dispute_from_stripe(_dict(dispute))

    async def find_payments(self, reference: str) -> list[PSPPayment]:
        # Intents not yet confirmed hold no money and are left out: authorize resumes them.
        mapped = (
            payment_from_intent(i, otp_challenges=self._compat) for i in await self._intents_for(reference)
        )
        return [p for p in mapped if p is not None]
