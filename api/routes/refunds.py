"""Refunds: POST /v1/refunds, GET /v1/refunds/{id}, GET /v1/refunds?payment=.

Creating a refund is one database transaction that locks the payment row (SELECT ... FOR UPDATE
on PostgreSQL, SQLite's write lock via BEGIN IMMEDIATE), computes refundable = captured - refunded
- pending and inserts the refund as pending only if it fits (core.refunds.reserve_refund).
Concurrent refunds of one payment therefore queue on that lock and can never add up to more than
was captured; an over-refund answers 400 amount_too_large and writes nothing. Then the
RefundWorkflow (refund:{id}) is started and the request waits a few seconds for it; the answer is
the refund as the database has it (pending if the PSP is slow; poll GET /v1/refunds/{id}).

A refund of a payment that was authorized but not captured (requires_capture, requires_action)
cancels the payment instead: the authorization is voided at the PSP and the answer is the canceled
PAYMENT object (object = "payment"). Nothing was charged, so there is no Refund object and no
ledger posting, as in Stripe since API version 2025-03-31 ("basil"), where canceling a payment no
longer creates a Refund. Only the full amount can be "refunded" that way.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy.orm import sessionmaker
from sqlmodel import Session, col, select
from temporalio.client import (
    WorkflowFailureError,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from api import idempotency as idem
from api.auth import Principal, any_principal, merchant_id_of, merchant_principal
from api.deps import Page, run_db, sessions_of, settings_of, temporal_of, unix
from api.errors import API_ERROR, INVALID_REQUEST, ApiError, conflict, invalid, not_found
from api.routes.payments import load_payment
from api.schemas import ListPublic, PaymentPublic, RefundCreate, RefundPublic
from core.ids import new_id
from core.ledger_store import write_transaction
from core.refunds import RefundRejected, reserve_refund
from core.tables import Payment, Refund
from domain.refunds import UNCAPTURED_STATUSES
from domain.states import PaymentStatus
from workflows.contracts import (
    REFUND_WORKFLOW,
    CancelRequest,
    PaymentState,
    RefundWorkflowInput,
    RefundWorkflowResult,
    Upd,
    refund_workflow_id,
)

router = APIRouter(prefix="/v1", tags=["refunds"])
log = structlog.get_logger("api.refunds")

# How long POST /v1/refunds waits for the workflow before answering "pending" (capped by
# UPDATE_WAIT_SECONDS): long enough for a healthy PSP, short enough not to hold the client.
REFUND_WAIT_SECONDS = 5.0

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "amount_too_large, charge_already_refunded, charge_disputed, invalid parameters"},
    404: {"description": "No such payment (or refund)"},
    409: {"description": "The payment's state forbids a refund, or the idempotency key is in use"},
    503: {"description": "The workflow service is unavailable (`api_error`)"},
}


# ---- reading ----------------------------------------------------------------------------------


def refund_public(row: Refund) -> RefundPublic:
    return RefundPublic(
        id=row.id,
        amount=row.amount,
        currency=row.currency,
        payment=row.payment_id,
        status=row.status,  # type: ignore[arg-type]  # pending | succeeded | failed, by construction
        reason=row.reason,
        failure_reason=row.failure_reason,
        return_=row.return_id,
        workflow_id=row.workflow_id,
        created=unix(row.created),
        metadata=dict(row.metadata_ or {}),
    )


def dump(refund: RefundPublic) -> dict[str, Any]:
    return refund.model_dump(mode="json", by_alias=True)


def find_refund(session: Session, refund_id: str, merchant_id: str | None) -> RefundPublic | None:
    row = session.get(Refund, refund_id)
    if row is None or (merchant_id is not None and row.merchant_id != merchant_id):
        return None
    return refund_public(row)


def load_refund(sessions: sessionmaker[Session], refund_id: str, merchant_id: str | None) -> RefundPublic:
    with sessions() as session:
        found = find_refund(session, refund_id, merchant_id)
    if found is None:
        raise not_found("refund", refund_id)
    return found


def _scope(principal: Principal) -> str | None:
    """Operators may read any refund; a merchant only its own."""
    return None if principal.is_operator else principal.merchant_id


# ---- running the workflow ---------------------------------------------------------------------


def _unavailable() -> ApiError:
    return ApiError(
        503, API_ERROR, "service_unavailable", "The workflow service is not available. Retry shortly."
    )


async def run_refund(request: Request, inp: RefundWorkflowInput) -> RefundPublic:
    """Start (or re-attach to) refund:{id} and wait briefly for it; answer from the database.
    Raises ApiError 503 when the workflow cannot be started (the refund stays pending: a retry with
    the same Idempotency-Key re-attaches to it)."""
    settings = settings_of(request)
    client = temporal_of(request)
    try:
        handle = await client.start_workflow(
            REFUND_WORKFLOW,
            inp,
            id=refund_workflow_id(inp.refund_id),
            task_queue=settings.task_queue,
            result_type=RefundWorkflowResult,
            # a retried request attaches to the running workflow; a finished one never runs again
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
        )
    except WorkflowAlreadyStartedError:
        handle = None  # it already finished: its row is the answer
    except RPCError as exc:
        log.warning("temporal_unavailable", refund_id=inp.refund_id, error=exc.message)
        raise _unavailable() from None
    if handle is not None:
        try:
            async with asyncio.timeout(min(REFUND_WAIT_SECONDS, settings.update_wait_seconds)):
                await handle.result()
        except TimeoutError:
            pass  # still at the PSP: answer pending
        except WorkflowFailureError as exc:
            # the refund stays pending (reserved) for an operator; the client sees it as it is
            log.error("refund_workflow_failed", refund_id=inp.refund_id, cause=str(exc.cause))
        except RPCError as exc:
            log.warning("refund_wait_failed", refund_id=inp.refund_id, error=exc.message)
    return await run_db(load_refund, sessions_of(request), inp.refund_id, None)


# ---- POST /v1/refunds -------------------------------------------------------------------------


def _payment_of(sessions: sessionmaker[Session], merchant_id: str, payment_id: str) -> Payment:
    with sessions() as session:
        row = session.get(Payment, payment_id)
    if row is None or row.merchant_id != merchant_id:
        raise not_found("payment", payment_id, "payment")
    return row


def _reserve(
    sessions: sessionmaker[Session], merchant_id: str, refund_id: str, body: RefundCreate
) -> RefundWorkflowInput:
    with write_transaction(sessions) as session:
        return reserve_refund(
            session,
            refund_id=refund_id,
            merchant_id=merchant_id,
            payment_id=body.payment,
            amount=body.amount,
            reason=body.reason,
            metadata=dict(body.metadata),
        )


async def _cancel_uncaptured(request: Request, payment: Payment, reason: str | None) -> PaymentPublic:
    """POST /v1/refunds on an authorized, uncaptured payment: cancel it (the PSP voids the hold)."""
    sessions = sessions_of(request)
    timer = asyncio.timeout(settings_of(request).update_wait_seconds)
    try:
        async with timer:
            await (
                temporal_of(request)
                .get_workflow_handle(payment.workflow_id)
                .execute_update(
                    Upd.CANCEL,
                    CancelRequest(reason=reason or "requested_by_customer"),
                    result_type=PaymentState,
                )
            )
    except Exception as exc:
        if timer.expired():
            pass  # the void is under way: answer with what the database says now
        elif isinstance(exc, WorkflowUpdateFailedError):
            cause = exc.cause
            detail = cause.message if isinstance(cause, ApplicationError) else None
            raise conflict(
                "payment_unexpected_state",
                detail or f"This payment is {payment.status}; it cannot be refunded.",
            ) from None
        elif isinstance(exc, RPCError) and exc.status == RPCStatusCode.NOT_FOUND:
            raise conflict("payment_unexpected_state", "This payment can no longer be canceled.") from None
        elif isinstance(exc, RPCError | WorkflowUpdateRPCTimeoutOrCancelledError):
            raise _unavailable() from None
        else:
            raise
    return await run_db(load_payment, sessions, payment.id, payment.merchant_id)


@router.post(
    "/refunds",
    response_model=RefundPublic,
    responses=ERROR_RESPONSES,
    summary="Refund a captured payment (all or part); cancels an uncaptured one",
)
async def create_refund(
    body: RefundCreate,
    request: Request,
    principal: Principal = Depends(merchant_principal),
    idempotency_key: str | None = Depends(idem.idempotency_key_header),
) -> JSONResponse:
    merchant_id = merchant_id_of(principal)
    sessions = sessions_of(request)
    req_hash = idem.request_hash("POST", "/v1/refunds", body.model_dump(mode="json"))
    if idempotency_key:
        replay = await run_db(idem.precheck, sessions, merchant_id, idempotency_key, req_hash)
        if replay is not None:
            return replay.response()
    payment = await run_db(_payment_of, sessions, merchant_id, body.payment)
    uncaptured = PaymentStatus(payment.status) in UNCAPTURED_STATUSES
    if uncaptured and body.amount is not None and body.amount != payment.amount:
        raise invalid(
            "amount_invalid",
            "This payment is not captured: a refund cancels it in full. To keep part of it, capture "
            "that amount instead.",
            "amount",
        )

    refund_id = new_id("re")
    if idempotency_key:
        got = await run_db(
            idem.claim, sessions, merchant_id, idempotency_key, "POST /v1/refunds", req_hash, refund_id
        )
        if isinstance(got, idem.Replay):
            return got.response()
        refund_id = got.resource_id

    try:
        if uncaptured:
            canceled = await _cancel_uncaptured(request, payment, body.reason)
            status, payload = 200, canceled.model_dump(mode="json")
            final = canceled.status == PaymentStatus.CANCELED
        else:
            try:
                inp = await run_db(_reserve, sessions, merchant_id, refund_id, body)
            except RefundRejected as exc:
                # a business answer: stored under the key like a success (nothing was written)
                error = ApiError(exc.status, INVALID_REQUEST, exc.code, exc.message, exc.param)
                if idempotency_key:
                    await run_db(
                        idem.complete, sessions, merchant_id, idempotency_key, error.status, error.body()
                    )
                return error.response()
            refund = await run_refund(request, inp)
            status, payload = 200, dump(refund)
            final = refund.status != "pending"
    except Exception:
        if idempotency_key:
            await run_db(idem.release, sessions, merchant_id, idempotency_key)
        raise
    if idempotency_key:
        if final:
            await run_db(idem.complete, sessions, merchant_id, idempotency_key, status, payload)
        else:
            # not an answer to keep forever: a retry with the key re-attaches to the same refund
            await run_db(idem.release, sessions, merchant_id, idempotency_key)
    return JSONResponse(payload, status_code=status)


# ---- reads ------------------------------------------------------------------------------------


@router.get("/refunds/{refund_id}", response_model=RefundPublic, summary="Retrieve a refund")
async def read_refund_route(
    refund_id: str, request: Request, principal: Principal = Depends(any_principal)
) -> JSONResponse:
    refund = await run_db(load_refund, sessions_of(request), refund_id, _scope(principal))
    return JSONResponse(dump(refund))


def _list(
    sessions: sessionmaker[Session],
    merchant_id: str | None,
    payment_id: str | None,
    limit: int,
    starting_after: str | None,
) -> tuple[list[RefundPublic], bool]:
    with sessions() as session:
        query = select(Refund)
        if merchant_id is not None:
            query = query.where(col(Refund.merchant_id) == merchant_id)
        if payment_id is not None:
            query = query.where(col(Refund.payment_id) == payment_id)
        if starting_after is not None:
            query = query.where(col(Refund.id) < starting_after)
        rows = session.exec(query.order_by(col(Refund.id).desc()).limit(limit + 1)).all()
    return [refund_public(r) for r in rows[:limit]], len(rows) > limit


@router.get("/refunds", response_model=ListPublic[RefundPublic], summary="List refunds (of one payment)")
async def list_refunds(
    request: Request,
    page: Page = Depends(),
    payment: str | None = Query(None, max_length=64, description="only this payment's refunds"),
    principal: Principal = Depends(any_principal),
) -> JSONResponse:
    page.check_prefix("re")
    data, has_more = await run_db(
        _list, sessions_of(request), _scope(principal), payment, page.limit, page.starting_after
    )
    return JSONResponse(
        {"object": "list", "data": [dump(r) for r in data], "has_more": has_more, "url": "/v1/refunds"}
    )
