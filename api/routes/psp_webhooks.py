"""PSP webhooks: POST /v1/psp/{psp}/webhooks. The signature is the authentication (no API key).

Each event is verified (HMAC-SHA256 over "t.body", 300 s tolerance, constant-time compare),
deduplicated by its event id (psp_events) and turned into a signal for the workflow that owns the
object: dispute.* -> the DisputeWorkflow (started by dispute.created, signalled with the outcome by
dispute.closed), payment.* / refund.* -> the payment's CheckoutWorkflow, if it still runs.

Order, so that an event is never lost and never applied twice:
1. A read-only look at psp_events: a redelivered event answers 200 at once and does nothing.
2. Temporal first: start (or signal-with-start) the DisputeWorkflow, or signal the checkout.
   Every one of these is idempotent. The dispute's id, and so its workflow id, is derived from the
   PSP's dispute (psp, dispute id, created), so a redelivery reaches the same workflow; the start
   uses USE_EXISTING and REJECT_DUPLICATE (a finished dispute is never started again); the outcome
   signal is applied once by the workflow; the checkout's handler keeps only the newest event.
3. Then ONE database transaction: the psp_events row, with the disputes row for dispute events.
If step 2 fails nothing was recorded: the answer is 503 and the PSP's redelivery redoes it all.
If step 3 fails after step 2 the answer is 5xx too and the redelivery repeats step 2 harmlessly.
Committing the dedup row first would be the one unsafe order: an event marked seen whose workflow
never started is lost, since every redelivery would be dropped as a duplicate. The Temporal call is
not made inside the open transaction either: on SQLite that would hold the database's write lock
(BEGIN IMMEDIATE) across a network call, stalling every worker activity meanwhile. The workflow's
first activity creates the disputes row itself if step 3 has not committed it, so the workflow
never depends on this request finishing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col, select
from temporalio.client import Client
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from api.deps import run_db, sessions_of, settings_of, temporal_of
from api.errors import API_ERROR, ApiError, invalid, not_found
from core.config import Settings
from core.ids import derived_id
from core.ledger_store import write_transaction
from core.tables import Dispute, Payment, PspEvent, utcnow
from domain.money import MoneyError, normalize_currency
from domain.states import TERMINAL, PaymentStatus
from psp.base import PSPError, PSPRejected
from psp.signing import SignatureError, verify_header
from psp.stripe_webhooks import StripeEvent, WebhookPayloadError, parse_event
from workflows.contracts import (
    DISPUTE_WORKFLOW,
    PSP_EVENT_SIGNAL,
    SA_AMOUNT_MINOR,
    SA_CURRENCY,
    SA_MERCHANT_ID,
    DisputeInput,
    DisputeOutcome,
    DisputeUpd,
    PSPEvent,
    checkout_workflow_id,
    dispute_workflow_id,
)

router = APIRouter(prefix="/v1/psp", tags=["psp webhooks"])
log = structlog.get_logger("api.psp_webhooks")

TOLERANCE_S = 300
MAX_BODY_BYTES = 256 * 1024
DEFAULT_EVIDENCE_WINDOW = timedelta(days=7)


@dataclass(frozen=True)
class Receiver:
    header: str
    secret: Callable[[Settings], str]


# psp name -> how its webhooks are signed. Stripe's adapter adds ("Stripe-Signature", its secret).
RECEIVERS: dict[str, Receiver] = {
    "sandbox": Receiver("Paysaga-Signature", lambda s: s.sandbox_webhook_secret),
    # the second sandbox instance (failover) signs with the same secret
    "sandbox_b": Receiver("Paysaga-Signature", lambda s: s.sandbox_webhook_secret),
    # Stripe signs the same way (t=..., v1=HMAC of "t.body"); its events are translated below
    "stripe": Receiver("Stripe-Signature", lambda s: s.stripe_webhook_secret),
}


# ---- the event ----


class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore")


class EventData(_Loose):
    object: dict[str, Any]


class WebhookEvent(_Loose):
    id: StrictStr = Field(min_length=1, max_length=100)
    type: StrictStr = Field(min_length=1, max_length=60)
    created: StrictInt = 0
    data: EventData


def from_stripe(ev: StripeEvent) -> WebhookEvent:
    """A verified Stripe event in the shape of our PSP events: dispute.created / dispute.closed /
    dispute.updated with the dispute, payment.<status> with our payment id as the reference. Other
    events keep Stripe's type and are only recorded (deduplicated)."""
    obj: dict[str, Any] = {"id": ev.object_id}
    kind = ev.type
    if ev.dispute is not None:
        d = ev.dispute
        kind = (
            "dispute.created"
            if ev.type.endswith("dispute.created")
            else "dispute.closed"
            if d.status in ("won", "lost")
            else "dispute.updated"
        )
        obj = {
            "id": d.id,
            "payment": d.payment_id,
            "amount": d.amount,
            "currency": d.currency,
            "status": d.status,
            "reason": d.reason,
            "evidence_due_by": d.evidence_due_by,
            "created": d.created,
        }
    elif ev.reference is not None and ev.payment is not None:
        kind = f"payment.{ev.payment.status}"
        obj = {"id": ev.payment.id, "reference": ev.reference, "status": ev.payment.status}
    if not ev.id:
        raise WebhookPayloadError("event without id")
    return WebhookEvent(id=ev.id, type=kind, created=ev.created, data=EventData(object=obj))


class PspDisputeObject(_Loose):
    id: StrictStr = Field(min_length=1, max_length=100)
    payment: StrictStr = Field(min_length=1, max_length=100)
    amount: StrictInt = Field(gt=0)
    currency: StrictStr
    status: StrictStr
    reason: StrictStr | None = Field(default=None, max_length=40)
    evidence_due_by: StrictInt | None = None
    created: StrictInt = 0


# ---- deterministic dispute ids ----


def dispute_id_for(psp: str, psp_dispute_id: str, created: int) -> str:
    """Our dispute id for a PSP dispute, derived from the PSP's creation time (s) and its id."""
    return derived_id("dp", created * 1000, f"{psp}:{psp_dispute_id}")


def dispute_row(inp: DisputeInput) -> Dispute:
    """The disputes row for a workflow input; activities.disputes.new_dispute_row builds the same
    one when the workflow gets there first (the API does not import activities)."""
    now = utcnow()
    due = (
        datetime.fromtimestamp(inp.evidence_due_by, UTC)
        if inp.evidence_due_by > 0
        else now + DEFAULT_EVIDENCE_WINDOW
    )
    return Dispute(
        id=inp.dispute_id,
        merchant_id=inp.merchant_id,
        payment_id=inp.payment_id,
        psp=inp.psp,
        psp_dispute_id=inp.psp_dispute_id,
        amount=inp.amount,
        currency=inp.currency,
        reason=inp.reason,
        status="needs_response",
        evidence={},
        evidence_due_by=due,
        workflow_id=dispute_workflow_id(inp.dispute_id),
        created=now,
        updated=now,
    )


# ---- database ----


def _seen(sessions: sessionmaker[Session], event_id: str) -> bool:
    with sessions() as session:
        return session.get(PspEvent, event_id) is not None


def _payment_by_psp_id(sessions: sessionmaker[Session], psp: str, psp_payment_id: str) -> Payment | None:
    with sessions() as session:
        return session.exec(
            select(Payment).where(col(Payment.psp) == psp, col(Payment.psp_payment_id) == psp_payment_id)
        ).first()


def _payment_by_id(sessions: sessionmaker[Session], payment_id: str) -> Payment | None:
    with sessions() as session:
        return session.get(Payment, payment_id)


async def payment_for(request: Request, psp: str, psp_payment_id: str) -> Payment | None:
    """Our payment for the PSP's payment id: by the id we stored, else by asking the PSP for the
    payment's reference (our payment id). The second path is needed because a payment's row does
    not always hold the PSP's id (an automatic capture writes no status of its own)."""
    sessions = sessions_of(request)
    found = await run_db(_payment_by_psp_id, sessions, psp, psp_payment_id)
    if found is not None:
        return found
    adapter = request.app.state.psps.get(psp)
    if adapter is None:
        return None
    try:
        remote = await adapter.get_payment(psp_payment_id)
    except PSPRejected:
        return None  # the PSP does not know it either
    except PSPError as exc:
        log.warning("psp_unavailable", psp=psp, error=type(exc).__name__)
        raise ApiError(503, API_ERROR, "psp_unavailable", "The payment processor is not available.") from None
    payment = await run_db(_payment_by_id, sessions, remote.reference)
    return payment if payment is not None and payment.psp == psp else None


def _record(
    sessions: sessionmaker[Session], psp: str, event: WebhookEvent, dispute: DisputeInput | None
) -> bool:
    """The dedup row (+ the disputes row) in one transaction. False: recorded by someone else."""
    for attempt in range(2):
        try:
            with write_transaction(sessions) as session:
                if session.get(PspEvent, event.id) is not None:
                    return False
                session.add(PspEvent(id=event.id, psp=psp, type=event.type))
                if dispute is not None and session.get(Dispute, dispute.dispute_id) is None:
                    session.add(dispute_row(dispute))
                return True
        except IntegrityError:
            # A concurrent delivery of the same event, or the workflow's first activity inserting
            # the same dispute row: the second turn sees the winner's rows.
            if attempt == 1:
                raise
    return False  # unreachable


# ---- Temporal ----


def _temporal_down(exc: Exception) -> ApiError:
    log.warning("temporal_unavailable", error=type(exc).__name__)
    return ApiError(503, API_ERROR, "service_unavailable", "The workflow service is not available.")


def _dispute_input(psp: str, obj: PspDisputeObject, payment: Payment) -> DisputeInput:
    return DisputeInput(
        dispute_id=dispute_id_for(psp, obj.id, obj.created),
        payment_id=payment.id,
        merchant_id=payment.merchant_id,
        psp=psp,
        psp_dispute_id=obj.id,
        amount=obj.amount,
        currency=normalize_currency(obj.currency),
        reason=obj.reason,
        evidence_due_by=obj.evidence_due_by or 0,
    )


async def start_dispute(
    client: Client, task_queue: str, inp: DisputeInput, outcome: DisputeOutcome | None = None
) -> None:
    """Start the dispute's workflow (idempotent), with the outcome signal if there is one."""
    kwargs: dict[str, Any] = {
        "id": dispute_workflow_id(inp.dispute_id),
        "task_queue": task_queue,
        # a finished dispute is never started again
        "id_reuse_policy": WorkflowIDReusePolicy.REJECT_DUPLICATE,
        "search_attributes": TypedSearchAttributes(
            [
                SearchAttributePair(SA_MERCHANT_ID, inp.merchant_id),
                SearchAttributePair(SA_AMOUNT_MINOR, inp.amount),
                SearchAttributePair(SA_CURRENCY, inp.currency),
            ]
        ),
    }
    try:
        if outcome is None:
            await client.start_workflow(
                DISPUTE_WORKFLOW, inp, id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING, **kwargs
            )
        else:
            # signal-with-start: signals the running workflow, or starts it (an outcome that
            # overtook dispute.created) with the signal already in its history
            await client.start_workflow(
                DISPUTE_WORKFLOW, inp, start_signal=DisputeUpd.OUTCOME, start_signal_args=[outcome], **kwargs
            )
    except WorkflowAlreadyStartedError:
        pass  # the dispute's workflow already finished: this event has nothing left to change


async def signal_owner(client: Client, workflow_id: str, event: PSPEvent) -> bool:
    """Signal a running workflow; False if it is not running (never existed, or finished)."""
    try:
        await client.get_workflow_handle(workflow_id).signal(PSP_EVENT_SIGNAL, event)
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            return False
        raise
    return True


# ---- dispatch ----


async def _dispute_event(request: Request, psp: str, event: WebhookEvent) -> DisputeInput:
    try:
        obj = PspDisputeObject.model_validate(event.data.object)
        normalize_currency(obj.currency)
    except (ValidationError, MoneyError):
        raise invalid(
            "parameter_invalid", "The event's dispute object is malformed.", "data.object"
        ) from None
    payment = await payment_for(request, psp, obj.payment)
    if payment is None:
        # Not recorded: the PSP redelivers, by when a payment being written may be there.
        log.warning("psp_dispute_unknown_payment", psp=psp, event_id=event.id, psp_payment=obj.payment)
        raise not_found("payment", obj.payment, "data.object.payment")
    inp = _dispute_input(psp, obj, payment)
    outcome = None
    if event.type == "dispute.closed" and obj.status in ("won", "lost"):
        outcome = DisputeOutcome(status="won" if obj.status == "won" else "lost", event_id=event.id)
    try:
        await start_dispute(temporal_of(request), settings_of(request).task_queue, inp, outcome)
    except RPCError as exc:
        raise _temporal_down(exc) from None
    return inp


async def _payment_event(request: Request, psp: str, event: WebhookEvent) -> None:
    obj = event.data.object
    object_id, status = obj.get("id"), obj.get("status")
    payment_id: str | None = None
    payment: Payment | None = None
    if event.type.startswith("payment."):
        reference = obj.get("reference")
        if isinstance(reference, str):
            payment_id = reference
            payment = await run_db(_payment_by_id, sessions_of(request), reference)
    else:  # refund.*: the refund names the PSP's payment
        psp_payment = obj.get("payment")
        if isinstance(psp_payment, str):
            payment = await payment_for(request, psp, psp_payment)
            payment_id = payment.id if payment is not None else None
    if payment_id is None or not isinstance(object_id, str):
        log.info("psp_event_without_owner", psp=psp, event_id=event.id, type=event.type)
        return
    if payment is not None and PaymentStatus(payment.status) in TERMINAL:
        # The saga has nothing left to learn from the PSP (it settles before it records a final
        # status), so no signal: most webhooks arrive after that, and each signal cost the
        # Temporal server a workflow task or a lookup.
        log.info("psp_event_after_final_status", psp=psp, event_id=event.id, payment=payment_id)
        return
    signal = PSPEvent(
        id=event.id,
        type=event.type,
        psp=psp,
        object_id=object_id,
        status=status if isinstance(status, str) else None,
        created=event.created,
    )
    try:
        delivered = await signal_owner(temporal_of(request), checkout_workflow_id(payment_id), signal)
    except RPCError as exc:
        raise _temporal_down(exc) from None
    if not delivered:
        log.info("psp_event_owner_not_running", psp=psp, event_id=event.id, payment=payment_id)


@router.post("/{psp}/webhooks", summary="Receive a signed PSP webhook event")
async def receive_webhook(psp: str, request: Request) -> JSONResponse:
    receiver = RECEIVERS.get(psp)
    if receiver is None:
        raise not_found("psp", psp, "psp")
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise invalid("request_too_large", "The webhook body is too large.", status=413)
    header = request.headers.get(receiver.header)
    if not header:
        raise invalid("signature_missing", f"The {receiver.header} header is missing.", receiver.header)
    secret = receiver.secret(settings_of(request))
    if not secret:
        raise not_found("psp", psp, "psp")  # a PSP we take no webhooks from (not configured)
    try:
        if psp == "stripe":
            event = from_stripe(parse_event(body, header, secret, tolerance=TOLERANCE_S))
        else:
            verify_header(body, header, secret, tolerance=TOLERANCE_S)
            event = WebhookEvent.model_validate(json.loads(body))
    except SignatureError as exc:
        log.warning("psp_webhook_bad_signature", psp=psp, reason=str(exc))
        raise invalid("signature_invalid", f"Invalid webhook signature: {exc}.", receiver.header) from None
    except ValueError:  # bad JSON or a malformed event (ValidationError, WebhookPayloadError)
        raise invalid("parameter_invalid", "The body is not a webhook event.") from None

    sessions = sessions_of(request)
    if await run_db(_seen, sessions, event.id):
        return JSONResponse({"received": True, "duplicate": True})
    dispute: DisputeInput | None = None
    if event.type.startswith("dispute."):
        dispute = await _dispute_event(request, psp, event)
    elif event.type.startswith(("payment.", "refund.")):
        await _payment_event(request, psp, event)
    recorded = await run_db(_record, sessions, psp, event, dispute)
    log.info("psp_webhook", psp=psp, event_id=event.id, type=event.type, duplicate=not recorded)
    return JSONResponse({"received": True, "duplicate": not recorded})
