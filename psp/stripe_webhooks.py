"""Stripe webhooks: verify the `Stripe-Signature` header and parse the event into a typed StripeEvent.

Stripe signs "<t>.<raw body>" with HMAC-SHA256 under the endpoint's secret (whsec_...) and sends
`Stripe-Signature: t=<unix>,v1=<hex>[,v1=<hex>...]`: the scheme of psp.signing, which does the
constant-time comparison and the 300 s tolerance. Verify against the raw bytes, before any JSON
parsing (a re-serialized body no longer matches).

An event is a hint, not the truth: Stripe delivers at least once, late, and in no guaranteed order.
Dedupe by event id, and read the payment (StripePSP.get_payment) before acting on it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from psp.base import PSPAmbiguous, PSPDispute, PSPPayment
from psp.signing import SignatureError, verify_header
from psp.stripe import REFERENCE_KEY, dispute_from_stripe, payment_from_intent

SIGNATURE_HEADER = "Stripe-Signature"

__all__ = ["SIGNATURE_HEADER", "SignatureError", "StripeEvent", "WebhookPayloadError", "parse_event"]


class WebhookPayloadError(ValueError):
    """The body is correctly signed but is not a Stripe event we can read."""


@dataclass(frozen=True)
class StripeEvent:
    id: str  # evt_...: the dedupe key
    type: str  # payment_intent.succeeded, charge.refunded, charge.dispute.created, ...
    created: int
    object_type: str  # data.object.object: payment_intent, charge, refund, dispute, ...
    object_id: str
    psp_payment_id: str | None  # the PaymentIntent the event is about, when there is one
    reference: str | None  # our payment id, from metadata["paysaga_payment_id"]
    payment: PSPPayment | None = None  # payment_intent events with a settled status
    dispute: PSPDispute | None = None  # dispute events
    data: dict[str, Any] = field(default_factory=dict, repr=False)  # data.object as sent


def parse_event(
    payload: bytes,
    header: str | None,
    secret: str,
    *,
    tolerance: int = 300,
    now: int | None = None,
    otp_challenges: bool = False,
) -> StripeEvent:
    """Verify and parse one webhook delivery. Raises SignatureError (refuse with 400, Stripe retries)
    or WebhookPayloadError. otp_challenges: as StripePSP's localstripe_compat, for next_action."""
    if not secret:
        raise SignatureError("no webhook secret configured")
    if not header:
        raise SignatureError(f"missing {SIGNATURE_HEADER} header")
    verify_header(payload, header, secret, tolerance=tolerance, now=now)
    try:
        event = json.loads(payload)
    except ValueError as e:
        raise WebhookPayloadError("the body is not JSON") from e
    if not isinstance(event, dict) or event.get("object", "event") != "event":
        raise WebhookPayloadError("the body is not an event")
    data = event.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    if not isinstance(obj, dict):
        raise WebhookPayloadError("the event has no data.object")
    try:
        event_id, event_type, created = str(event["id"]), str(event["type"]), int(event["created"])
        object_type, object_id = str(obj["object"]), str(obj["id"])
    except (KeyError, TypeError, ValueError) as e:
        raise WebhookPayloadError(f"the event misses a field: {e}") from e

    payment: PSPPayment | None = None
    dispute: PSPDispute | None = None
    try:
        if object_type == "payment_intent":
            payment = payment_from_intent(obj, otp_challenges=otp_challenges)
        elif object_type == "dispute":
            dispute = dispute_from_stripe(obj)
    except (KeyError, TypeError, ValueError, PSPAmbiguous) as e:
        raise WebhookPayloadError(f"unreadable {object_type} in event {event_id}: {e}") from e

    intent = obj.get("payment_intent")
    if object_type == "payment_intent":
        psp_payment_id: str | None = object_id
    elif isinstance(intent, str):
        psp_payment_id = intent
    elif isinstance(intent, Mapping):
        psp_payment_id = str(intent.get("id"))
    else:
        psp_payment_id = None
    metadata = obj.get("metadata")
    reference = metadata.get(REFERENCE_KEY) if isinstance(metadata, Mapping) else None
    return StripeEvent(
        id=event_id,
        type=event_type,
        created=created,
        object_type=object_type,
        object_id=object_id,
        psp_payment_id=psp_payment_id,
        reference=str(reference) if reference is not None else None,
        payment=payment,
        dispute=dispute,
        data=obj,
    )
