"""Payments: create (Update-with-Start of the CheckoutWorkflow), read, list, and the follow-up
actions that are Updates on the payment's workflow (authenticate, capture, cancel, review).

The API never decides a payment's fate: it starts or talks to the workflow, by name (it does not
import workflows.checkout), and then answers with the payment as the workflow wrote it to the
database before answering the Update.
"""

from __future__ import annotations

import asyncio
import html
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import structlog
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col, select
from temporalio.client import (
    WithStartWorkflowOperation,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from api import idempotency as idem
from api.auth import Principal, any_principal, merchant_id_of, merchant_principal, operator_principal
from api.deps import Page, run_db, sessions_of, settings_of, temporal_of, unix
from api.errors import API_ERROR, CARD_ERROR, INVALID_REQUEST, ApiError, conflict, invalid, not_found
from api.routes.customers import get_customer
from api.routes.payment_methods import get_payment_method, routing_for
from api.schemas import (
    AuthenticateCreate,
    CancelCreate,
    CaptureCreate,
    ListPublic,
    NextActionPublic,
    PaymentCreate,
    PaymentErrorPublic,
    PaymentPublic,
    ReviewCreate,
    TimelineEntry,
)
from core.ids import new_id
from core.tables import Payment, PaymentEvent, PaymentMethod
from domain.states import TERMINAL, PaymentStatus
from workflows.contracts import (
    CHECKOUT_WORKFLOW,
    RECHECK_UPDATE,
    SA_AMOUNT_MINOR,
    SA_CURRENCY,
    SA_MERCHANT_ID,
    SA_PAYMENT_STATUS,
    AuthenticateRequest,
    CancelRequest,
    CaptureRequest,
    CheckoutInput,
    CheckoutResult,
    PaymentState,
    ReviewRequest,
    Upd,
    checkout_workflow_id,
)

router = APIRouter(prefix="/v1", tags=["payments"])
log = structlog.get_logger("api.payments")

_TERMINAL = {s.value for s in TERMINAL}
_STATUSES = {s.value for s in PaymentStatus}

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    402: {"description": "The card was declined: error shape with `decline_code` and `payment`"},
    409: {"description": "Out of stock, idempotency key in use, or the payment's state forbids it"},
    503: {"description": "The PSP or the workflow service is unavailable (`api_error`)"},
}


# ---- reading ----------------------------------------------------------------------------------


def payment_public(row: Payment, events: Sequence[PaymentEvent]) -> PaymentPublic:
    action = row.next_action or None
    next_action = None
    if action and action.get("type") in ("otp", "redirect_to_url"):
        next_action = NextActionPublic(type=action["type"], url=action.get("url"))
    error = None
    if row.failure_code:
        error = PaymentErrorPublic(
            code=row.failure_code, decline_code=row.decline_code, message=row.failure_message
        )
    return PaymentPublic(
        id=row.id,
        amount=row.amount,
        amount_capturable=row.amount_capturable,
        amount_received=row.amount_received,
        currency=row.currency,
        status=row.status,
        capture_method=row.capture_method,
        customer=row.customer_id,
        payment_method=row.payment_method_id,
        order=row.order_id,
        description=row.description,
        metadata=dict(row.metadata_ or {}),
        next_action=next_action,
        last_payment_error=error,
        workflow_id=row.workflow_id,
        timeline=[TimelineEntry(status=e.status, time=unix(e.created), reason=e.reason) for e in events],
        created=unix(row.created),
    )


def read_payment(session: Session, payment_id: str, merchant_id: str | None) -> PaymentPublic | None:
    """The payment as the API shows it; None if missing or (merchant_id set) not this merchant's."""
    row = session.get(Payment, payment_id)
    if row is None or (merchant_id is not None and row.merchant_id != merchant_id):
        return None
    events = session.exec(
        select(PaymentEvent).where(col(PaymentEvent.payment_id) == payment_id).order_by(col(PaymentEvent.id))
    ).all()
    return payment_public(row, events)


def find_payment(
    sessions: sessionmaker[Session], payment_id: str, merchant_id: str | None
) -> PaymentPublic | None:
    with sessions() as session:
        return read_payment(session, payment_id, merchant_id)


def load_payment(sessions: sessionmaker[Session], payment_id: str, merchant_id: str | None) -> PaymentPublic:
    found = find_payment(sessions, payment_id, merchant_id)
    if found is None:
        raise not_found("payment", payment_id)
    return found


def pending_payment(inp: CheckoutInput, state: PaymentState | None = None) -> PaymentPublic:
    """The answer while the workflow has not written its row yet (accepted, still processing)."""
    now = int(datetime.now(UTC).timestamp())
    status = state.status if state is not None else PaymentStatus.PROCESSING.value
    return PaymentPublic(
        id=inp.payment_id,
        amount=inp.amount,
        amount_capturable=state.amount_capturable if state else 0,
        amount_received=state.amount_received if state else 0,
        currency=inp.currency,
        status=status,
        capture_method=inp.capture_method,
        customer=inp.customer_id,
        payment_method=inp.payment_method_id,
        order=inp.order_id,
        description=inp.description,
        metadata=dict(inp.metadata),
        next_action=(
            NextActionPublic(type=state.next_action.type, url=state.next_action.url)
            if state is not None and state.next_action is not None
            else None
        ),
        last_payment_error=(
            PaymentErrorPublic(
                code=state.failure_code, decline_code=state.decline_code, message=state.message
            )
            if state is not None and state.failure_code
            else None
        ),
        workflow_id=checkout_workflow_id(inp.payment_id),
        timeline=[TimelineEntry(status=status, time=now, reason=None)],
        created=now,
    )


# ---- answers ----------------------------------------------------------------------------------


def failure_error(payment: PaymentPublic) -> ApiError:
    """The error a request that ended in a failed payment answers with, the payment attached."""
    body = payment.model_dump(mode="json")
    err = payment.last_payment_error
    code = err.code if err else "payment_failed"
    message = err.message if err and err.message else None
    if code == "out_of_stock":
        return ApiError(
            409, INVALID_REQUEST, "out_of_stock", message or "An item is out of stock.", payment=body
        )
    if code == "psp_unavailable":
        return ApiError(
            503,
            API_ERROR,
            "psp_unavailable",
            message or "The payment processor was not available; the payment failed.",
            payment=body,
        )
    return ApiError(
        402,
        CARD_ERROR,
        code,
        message or "Your card was declined.",
        decline_code=err.decline_code if err else None,
        payment=body,
    )


def answer(payment: PaymentPublic) -> tuple[int, dict[str, Any]]:
    if payment.status == PaymentStatus.FAILED:
        error = failure_error(payment)
        return error.status, error.body()
    return 200, payment.model_dump(mode="json")


def _unavailable(what: str = "The workflow service") -> ApiError:
    return ApiError(503, API_ERROR, "service_unavailable", f"{what} is not available. Retry shortly.")


def _workflow_gone(exc: RPCError) -> bool:
    """The workflow already finished (or never existed): Temporal's words for it."""
    return exc.status in (RPCStatusCode.NOT_FOUND, RPCStatusCode.ALREADY_EXISTS) or (
        "already completed" in exc.message.lower() or "already finished" in exc.message.lower()
    )


# ---- starting the CheckoutWorkflow (POST /v1/payments and cart checkout) ----------------------


def start_operation(inp: CheckoutInput, task_queue: str) -> WithStartWorkflowOperation[Any, Any]:
    return WithStartWorkflowOperation(
        CHECKOUT_WORKFLOW,
        inp,
        id=checkout_workflow_id(inp.payment_id),
        task_queue=task_queue,
        # A retry (same payment id) attaches to the running workflow; a finished one is never
        # started a second time for the same payment.
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
        result_type=CheckoutResult,
        search_attributes=TypedSearchAttributes(
            [
                SearchAttributePair(SA_PAYMENT_STATUS, PaymentStatus.PROCESSING.value),
                SearchAttributePair(SA_MERCHANT_ID, inp.merchant_id),
                SearchAttributePair(SA_AMOUNT_MINOR, inp.amount),
                SearchAttributePair(SA_CURRENCY, inp.currency),
            ]
        ),
    )


async def _workflow_exists(client: Any, workflow_id: str) -> bool:
    # Asked of the server: after a timeout the operation's own start future can hold a
    # CancelledError, which says nothing about whether the start reached the server.
    try:
        async with asyncio.timeout(3):
            await client.get_workflow_handle(workflow_id).describe()
        return True
    except Exception:
        return False


def _drain(op: WithStartWorkflowOperation[Any, Any]) -> None:
    """Consume the operation's start outcome: after a failed or cancelled call the SDK leaves an
    exception in it, which asyncio would otherwise log as "never retrieved" at garbage collection."""
    future = getattr(op, "_workflow_handle", None)  # SDK internal; skipped if it ever moves
    if isinstance(future, asyncio.Future) and future.done() and not future.cancelled():
        future.exception()


async def run_checkout(request: Request, inp: CheckoutInput) -> PaymentPublic:
    """Start (or re-attach to) the payment's workflow and wait, bounded, for its first stable
    status. Answers with the payment row; while the workflow is still busy, with a processing
    payment. Raises ApiError 503 if the workflow service cannot be reached."""
    settings = settings_of(request)
    client = temporal_of(request)
    sessions = sessions_of(request)
    workflow_id = checkout_workflow_id(inp.payment_id)
    op = start_operation(inp, settings.task_queue)
    timer = asyncio.timeout(settings.update_wait_seconds)
    state: PaymentState | None = None
    timed_out = False
    try:
        async with timer:
            state = await client.execute_update_with_start_workflow(
                Upd.WAIT_FOR_STABLE, start_workflow_operation=op, result_type=PaymentState
            )
    except Exception as exc:
        _drain(op)
        if timer.expired():
            timed_out = True
        elif isinstance(exc, WorkflowAlreadyStartedError):
            pass  # finished earlier (REJECT_DUPLICATE): its row is the answer
        elif isinstance(exc, WorkflowUpdateFailedError):
            log.warning("wait_for_stable_failed", payment_id=inp.payment_id, cause=type(exc.cause).__name__)
        elif isinstance(exc, RPCError) and _workflow_gone(exc):
            pass
        elif isinstance(exc, RPCError | WorkflowUpdateRPCTimeoutOrCancelledError):
            log.warning("temporal_unavailable", payment_id=inp.payment_id, error=type(exc).__name__)
            raise _unavailable() from None
        else:
            raise
    payment = await run_db(find_payment, sessions, inp.payment_id, None)
    if payment is not None:
        return payment
    if timed_out:
        if await _workflow_exists(client, workflow_id):
            return pending_payment(inp)
        raise _unavailable()
    if state is not None:
        return pending_payment(inp, state)
    log.error("payment_row_missing", payment_id=inp.payment_id)
    raise _unavailable("The payment")


# ---- POST /v1/payments ------------------------------------------------------------------------


def _charge_refs(
    sessions: sessionmaker[Session], merchant_id: str, customer_id: str, pm_id: str
) -> PaymentMethod:
    with sessions() as session:
        get_customer(session, merchant_id, customer_id, param="customer")
        pm = get_payment_method(session, merchant_id, pm_id, param="payment_method")
        if pm.customer_id != customer_id:
            # a card saved for another customer is not this customer's: as if it did not exist
            raise not_found("payment_method", pm_id, "payment_method")
        return pm


@router.post(
    "/payments",
    response_model=PaymentPublic,
    responses=ERROR_RESPONSES,
    summary="Create and confirm a payment",
)
async def create_payment(
    body: PaymentCreate,
    request: Request,
    principal: Principal = Depends(merchant_principal),
    idempotency_key: str | None = Depends(idem.idempotency_key_header),
) -> JSONResponse:
    merchant_id = merchant_id_of(principal)
    sessions = sessions_of(request)
    req_hash = idem.request_hash("POST", "/v1/payments", body.model_dump(mode="json"))
    if idempotency_key:
        replay = await run_db(idem.precheck, sessions, merchant_id, idempotency_key, req_hash)
        if replay is not None:
            return replay.response()
    pm = await run_db(_charge_refs, sessions, merchant_id, body.customer, body.payment_method)
    payment_id = new_id("pay")
    if idempotency_key:
        got = await run_db(
            idem.claim, sessions, merchant_id, idempotency_key, "POST /v1/payments", req_hash, payment_id
        )
        if isinstance(got, idem.Replay):
            return got.response()
        payment_id = got.resource_id
    # which PSPs, in which order: the merchant's routing rules and the card's tokens
    routing = await routing_for(request, merchant_id, pm, body.currency, body.amount)
    inp = CheckoutInput(
        payment_id=payment_id,
        merchant_id=merchant_id,
        customer_id=body.customer,
        payment_method_id=pm.id,
        psp=routing.psp,
        psp_token=routing.psp_token,
        psp_tokens=routing.psp_tokens,
        route=routing.route,
        amount=body.amount,
        currency=body.currency,
        capture_method=body.capture_method,
        description=body.description,
        metadata=dict(body.metadata),
        idempotency_key=idempotency_key,
    )
    try:
        payment = await run_checkout(request, inp)
    except Exception:
        if idempotency_key:
            await run_db(idem.release, sessions, merchant_id, idempotency_key)
        raise
    status, payload = answer(payment)
    if idempotency_key:
        if payment.status == PaymentStatus.PROCESSING:
            # not an answer a retry should get forever: let the retry re-attach instead
            await run_db(idem.release, sessions, merchant_id, idempotency_key)
        else:
            await run_db(idem.complete, sessions, merchant_id, idempotency_key, status, payload)
    return JSONResponse(payload, status_code=status)


# ---- reads ------------------------------------------------------------------------------------


def _scope(principal: Principal) -> str | None:
    """Operators may read any payment; a merchant only its own."""
    return None if principal.is_operator else principal.merchant_id


@router.get("/payments/{payment_id}", response_model=PaymentPublic, summary="Retrieve a payment")
async def read_payment_route(
    payment_id: str, request: Request, principal: Principal = Depends(any_principal)
) -> PaymentPublic:
    return await run_db(load_payment, sessions_of(request), payment_id, _scope(principal))


def _list(
    sessions: sessionmaker[Session],
    merchant_id: str | None,
    customer: str | None,
    status: str | None,
    limit: int,
    starting_after: str | None,
) -> tuple[list[PaymentPublic], bool]:
    with sessions() as session:
        query = select(Payment)
        if merchant_id is not None:
            query = query.where(col(Payment.merchant_id) == merchant_id)
        if customer is not None:
            query = query.where(col(Payment.customer_id) == customer)
        if status is not None:
            query = query.where(col(Payment.status) == status)
        if starting_after is not None:
            query = query.where(col(Payment.id) < starting_after)
        rows = session.exec(query.order_by(col(Payment.id).desc()).limit(limit + 1)).all()
        page = rows[:limit]
        events: dict[str, list[PaymentEvent]] = defaultdict(list)
        if page:
            for event in session.exec(
                select(PaymentEvent)
                .where(col(PaymentEvent.payment_id).in_([r.id for r in page]))
                .order_by(col(PaymentEvent.id))
            ).all():
                events[event.payment_id].append(event)
        return [payment_public(r, events[r.id]) for r in page], len(rows) > limit


@router.get("/payments", response_model=ListPublic[PaymentPublic], summary="List payments")
async def list_payments(
    request: Request,
    page: Page = Depends(),
    customer: str | None = Query(None, max_length=64, description="only this customer's payments"),
    status: str | None = Query(None, max_length=24, description="only payments in this status"),
    principal: Principal = Depends(any_principal),
) -> ListPublic[PaymentPublic]:
    if status is not None and status not in _STATUSES:
        raise invalid(
            "parameter_invalid", f"status must be one of: {', '.join(sorted(_STATUSES))}.", "status"
        )
    page.check_prefix("pay")
    data, has_more = await run_db(
        _list, sessions_of(request), _scope(principal), customer, status, page.limit, page.starting_after
    )
    return ListPublic[PaymentPublic](data=data, has_more=has_more, url="/v1/payments")


# ---- follow-up actions: Updates on the payment's workflow ------------------------------------


def _unexpected_state(payment: PaymentPublic, action: str, detail: str | None = None) -> ApiError:
    message = detail or f"This payment has status {payment.status}; it cannot be {action}."
    return conflict("payment_unexpected_state", message)


async def _update(
    request: Request,
    principal: Principal,
    payment_id: str,
    update: str,
    arg: Any,
    action: str,
    *,
    check: Callable[[PaymentPublic], None] | None = None,
    failure_is_error: bool = True,
) -> JSONResponse:
    sessions = sessions_of(request)
    scope = _scope(principal)
    before = await run_db(load_payment, sessions, payment_id, scope)
    if before.status in _TERMINAL:
        raise _unexpected_state(before, action)
    if check is not None:
        check(before)
    client = temporal_of(request)
    timer = asyncio.timeout(settings_of(request).update_wait_seconds)
    try:
        async with timer:
            await client.get_workflow_handle(before.workflow_id).execute_update(
                update, arg, result_type=PaymentState
            )
    except Exception as exc:
        if timer.expired():
            pass  # still working on it: answer with what the database says now
        elif isinstance(exc, WorkflowUpdateFailedError):
            cause = exc.cause
            detail = cause.message if isinstance(cause, ApplicationError) and cause.message else None
            if isinstance(cause, ApplicationError) and cause.type == "InvalidRequest":
                # the validator refused the request's values, not the payment's state
                raise invalid("parameter_invalid", detail or "Invalid request.") from None
            raise _unexpected_state(before, action, detail) from None
        elif isinstance(exc, RPCError) and _workflow_gone(exc):
            after = await run_db(load_payment, sessions, payment_id, scope)
            raise _unexpected_state(after, action) from None
        elif isinstance(exc, RPCError | WorkflowUpdateRPCTimeoutOrCancelledError):
            log.warning(
                "temporal_unavailable", payment_id=payment_id, update=update, error=type(exc).__name__
            )
            raise _unavailable() from None
        else:
            raise
    after = await run_db(load_payment, sessions, payment_id, scope)
    if failure_is_error and after.status == PaymentStatus.FAILED and before.status != PaymentStatus.FAILED:
        return failure_error(after).response()
    return JSONResponse(after.model_dump(mode="json"))


@router.post(
    "/payments/{payment_id}/authenticate",
    response_model=PaymentPublic,
    responses=ERROR_RESPONSES,
    summary="Complete the customer authentication (OTP)",
)
async def authenticate_payment(
    payment_id: str,
    body: AuthenticateCreate,
    request: Request,
    principal: Principal = Depends(merchant_principal),
) -> JSONResponse:
    return await _update(
        request, principal, payment_id, Upd.AUTHENTICATE, AuthenticateRequest(otp=body.otp), "authenticated"
    )


@router.post(
    "/payments/{payment_id}/capture",
    response_model=PaymentPublic,
    responses=ERROR_RESPONSES,
    summary="Capture an authorized payment (all or part)",
)
async def capture_payment(
    payment_id: str,
    request: Request,
    body: CaptureCreate | None = None,
    principal: Principal = Depends(merchant_principal),
) -> JSONResponse:
    amount = body.amount if body is not None else None

    def check(payment: PaymentPublic) -> None:
        if (
            amount is not None
            and payment.status == PaymentStatus.REQUIRES_CAPTURE
            and amount > payment.amount_capturable
        ):
            raise invalid(
                "amount_too_large",
                f"The amount to capture exceeds the capturable amount ({payment.amount_capturable}).",
                "amount",
            )

    return await _update(
        request, principal, payment_id, Upd.CAPTURE, CaptureRequest(amount=amount), "captured", check=check
    )


@router.post(
    "/payments/{payment_id}/cancel",
    response_model=PaymentPublic,
    responses=ERROR_RESPONSES,
    summary="Cancel a payment that is not captured yet",
)
async def cancel_payment(
    payment_id: str,
    request: Request,
    body: CancelCreate | None = None,
    principal: Principal = Depends(merchant_principal),
) -> JSONResponse:
    reason = (body.cancellation_reason if body is not None else None) or "requested_by_customer"
    return await _update(request, principal, payment_id, Upd.CANCEL, CancelRequest(reason=reason), "canceled")


@router.post(
    "/payments/{payment_id}/review",
    response_model=PaymentPublic,
    responses=ERROR_RESPONSES,
    summary="Operator decision on a payment held for manual review",
)
async def review_payment(
    payment_id: str,
    body: ReviewCreate,
    request: Request,
    principal: Principal = Depends(operator_principal),
) -> JSONResponse:
    assert principal.operator_id is not None
    return await _update(
        request,
        principal,
        payment_id,
        Upd.REVIEW,
        ReviewRequest(decision=body.decision, operator_id=principal.operator_id),
        "reviewed",
        # a rejection is the operator's own decision, not an error for the operator
        failure_is_error=False,
    )


# ---- the customer's way back from a wallet or bank page --------------------------------------


def _return_page(payment_id: str, status: str) -> HTMLResponse:
    text = {
        "succeeded": "Thank you: your payment went through.",
        "requires_capture": "Thank you: your payment is authorized.",
        "requires_action": "Your payment is still waiting for your confirmation.",
        "processing": "Your payment is being processed.",
        "failed": "Your payment did not go through.",
        "canceled": "Your payment was canceled.",
    }.get(status, f"Your payment is {status}.")
    body = (
        "<!doctype html><html><head><meta charset='utf-8'><title>Payment</title></head><body>"
        f"<p>{html.escape(text)}</p><p>Payment {html.escape(payment_id)}: {html.escape(status)}</p>"
        "</body></html>"
    )
    return HTMLResponse(body)


@router.get(
    "/payments/{payment_id}/return",
    summary="Return URL of a wallet or bank page (no API key): re-check the payment, show its status",
    response_model=None,
)
async def payment_return(payment_id: str, request: Request) -> Response:
    """The PSP's page sends the customer's browser here after the decision. No API key: it only
    makes the payment's workflow look the payment up at the PSP now (the webhook may be late or
    lost), then shows the payment's status and nothing else. The workflow accepts the nudge only
    while it waits for the PSP, so reloading this page cannot grow its history."""
    sessions = sessions_of(request)
    if not payment_id.startswith("pay_") or len(payment_id) > 64:
        raise not_found("payment", payment_id)
    payment = await run_db(load_payment, sessions, payment_id, None)
    if payment.status in (PaymentStatus.REQUIRES_ACTION, PaymentStatus.PROCESSING):
        handle = temporal_of(request).get_workflow_handle(payment.workflow_id)
        try:
            async with asyncio.timeout(min(settings_of(request).update_wait_seconds, 10.0)):
                await handle.execute_update(RECHECK_UPDATE, result_type=PaymentState)
        except (
            TimeoutError,
            WorkflowUpdateFailedError,
            WorkflowUpdateRPCTimeoutOrCancelledError,
            RPCError,
        ) as exc:
            # not waiting for the PSP (any more), gone, or slow: the page shows what is known now
            log.info("payment_return_recheck_skipped", payment_id=payment_id, error=type(exc).__name__)
        payment = await run_db(load_payment, sessions, payment_id, None)
    if "text/html" in request.headers.get("accept", ""):
        return _return_page(payment.id, payment.status)
    return JSONResponse({"object": "payment_return", "id": payment.id, "status": payment.status})
